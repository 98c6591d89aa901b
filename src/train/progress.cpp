#include "train/progress.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace sw {

std::string human_count(double v) {
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}k", v / 1e3);
  return fmt::format("{:.0f}", v);
}

std::string human_duration(double s) {
  const int64_t t = static_cast<int64_t>(std::llround(s));
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, (t % 3600) / 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

void Interval::add(const StepResult& s) {
  step_s += s.step_s;
  forward_s += s.forward_s;
  backward_s += s.backward_s;
  optimizer_s += s.optimizer_s;
  comm.all_to_all_calls += s.comm.all_to_all_calls;
  comm.all_to_all_bytes += s.comm.all_to_all_bytes;
  comm.all_reduce_calls += s.comm.all_reduce_calls;
  comm.all_reduce_bytes += s.comm.all_reduce_bytes;
  comm.seconds += s.comm.seconds;
  comm.exposed_seconds += s.comm.exposed_seconds;
  lr = s.lr;
  grad_norm = s.grad_norm;
  if (!s.applied) return;
  ++steps;
  ce += s.ce;
  lb += s.lb;
  z += s.z;
  balance += s.balance;
  for (const auto& group : s.moe)
    routing.add(group);
}

nlohmann::ordered_json train_record(const Interval& in, const MoeConfig& moe, int64_t step,
                                    double time_s, int64_t tokens_per_step, int64_t skipped_steps,
                                    bool comm) {
  const double n = static_cast<double>(in.steps);
  const double ce = in.ce / n, lb = in.lb / n, z = in.z / n, balance = in.balance / n;
  nlohmann::ordered_json rec = {
      {"kind", "train"},
      {"step", step},
      {"time_s", time_s},
      {"lr", in.lr},
      {"loss", training_loss(moe, ce, balance, z)},
      {"ce", ce},
      {"lb_loss", lb},
      {"z_loss", z},
      {"drop_frac", in.routing.drop_fraction()},
      {"tokens_per_s", static_cast<double>(in.steps * tokens_per_step) / in.step_s},
      {"ms_forward", 1000.0 * in.forward_s / n},
      {"ms_backward", 1000.0 * in.backward_s / n},
      {"ms_optimizer", 1000.0 * in.optimizer_s / n},
      {"steps_in_record", in.steps},
      {"layers", in.routing.to_json(moe.overflow == Overflow::Reroute)}};
  if (moe.balance != Balance::AuxLoss) rec["balance_loss"] = balance;  // else it is lb_loss
  rec["grad_norm"] = in.grad_norm;  // of the record's last step, before clipping
  if (skipped_steps > 0) rec["skipped_steps"] = skipped_steps;
  if (comm)
    rec["comm"] = {{"ms", 1000.0 * in.comm.seconds / n},
                   {"exposed_ms", 1000.0 * in.comm.exposed_seconds / n},
                   {"hidden_ms",  // differences of running totals: no -1e-14 for 0
                    1000.0 * std::max(0.0, in.comm.seconds - in.comm.exposed_seconds) / n},
                   {"all_to_all_calls", static_cast<double>(in.comm.all_to_all_calls) / n},
                   {"all_to_all_bytes", static_cast<double>(in.comm.all_to_all_bytes) / n},
                   {"all_reduce_calls", static_cast<double>(in.comm.all_reduce_calls) / n},
                   {"all_reduce_bytes", static_cast<double>(in.comm.all_reduce_bytes) / n}};
  return rec;
}

std::string progress_line(const Interval& in, int64_t step, int64_t steps, int64_t tokens_per_step,
                          double eta_s) {
  const double n = static_cast<double>(in.steps);
  return fmt::format(
      "step {}/{} | loss {:.4f} | lb {:.3f} | drop {:.1f}% | lr {:.2e} | {:.0f} ms | {} tok/s "
      "| eta {}",
      step, steps, in.ce / n, in.lb / n, 100.0 * in.routing.drop_fraction(), in.lr,
      1000.0 * in.step_s / n,
      human_count(static_cast<double>(in.steps * tokens_per_step) / in.step_s),
      human_duration(eta_s));
}

}  // namespace sw
