#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "data/dataset.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/schedule.h"
#include "util/error.h"
#include "util/fs.h"

namespace sw {
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

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

// Mean cross-entropy over fixed batches, in eval mode, leaving the training RNG untouched.
double evaluate(Transformer& model, const std::vector<Batch>& batches) {
  torch::NoGradGuard no_grad;
  auto gen = at::detail::getDefaultCPUGenerator();
  const torch::Tensor rng_state = gen.get_state();
  model->eval();
  double sum = 0;
  for (const auto& b : batches) {
    ModelOutput out = model->forward(b.x_BS);
    const int64_t V = out.logits_BSV.size(-1);
    sum += torch::cross_entropy_loss(out.logits_BSV.reshape({-1, V}), b.y_BS.reshape({-1}))
               .item<double>();
  }
  model->train();
  gen.set_state(rng_state);
  return sum / static_cast<double>(batches.size());
}

std::vector<Batch> fixed_batches(const Dataset& data, Split split, const TrainConfig& t,
                                 uint64_t salt) {
  Rng rng(static_cast<uint64_t>(t.seed) ^ salt);
  std::vector<Batch> out;
  for (int64_t i = 0; i < t.eval_batches; ++i)
    out.push_back(data.sample(split, t.batch_size, rng));
  return out;
}

void check_fresh_run_dir(const std::string& dir) {
  if (fs::exists(fs::path(dir) / "config.json") || fs::exists(fs::path(dir) / "metrics.jsonl"))
    throw Error(
        fmt::format("run directory '{}' already holds a run; continue it with "
                    "'switch-train --out {} --resume' or choose another --out",
                    dir, dir));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    throw Error(fmt::format("cannot create run directory '{}': {}", dir,
                            ec ? ec.message() : "not a directory"));
}

}  // namespace

int64_t configure_threads(int64_t requested) {
  int64_t n = requested > 0 ? requested : static_cast<int64_t>(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  torch::set_num_threads(static_cast<int>(n));
  return torch::get_num_threads();
}

std::string default_run_dir() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%d-%H%M%S", &tm);
  return std::string("runs/") + buf;
}

void write_config_file(const std::string& run_dir, const Config& cfg) {
  write_file_atomic((fs::path(run_dir) / "config.json").string(), to_json(cfg).dump(2) + "\n");
}

Config resume_config(const std::string& run_dir) {
  const std::string path = (fs::path(run_dir) / "config.json").string();
  if (!fs::exists(path))
    throw Error(fmt::format("--resume: '{}' is not a run directory (no config.json)", run_dir));
  Config c;
  apply_file(c, path);
  return c;
}

nlohmann::ordered_json train(const Config& cfg, const TrainOptions& opt) {
  validate(cfg);
  auto say = [&](const std::string& line) {
    if (!opt.quiet) std::cout << line << std::endl;
  };
  const int64_t threads = configure_threads(cfg.train.threads);
  say(fmt::format("threads: {} (intra-op)", threads));

  // Where the run starts from.
  std::optional<CheckpointMeta> ckpt;
  if (opt.resume) {
    if (auto dir = newest_checkpoint(opt.out_dir)) {
      ckpt = read_checkpoint_meta(*dir);
      say(fmt::format("resuming {} from step {}", *dir, ckpt->state.step));
    } else {
      say(fmt::format("{} has no complete checkpoint yet: starting it from step 0", opt.out_dir));
    }
  }

  // Data, before anything is written: a resumed run keeps its checkpoint's vocabulary.
  const std::u32string text = Dataset::read_text(cfg.data.path);
  const std::string source = "data file '" + cfg.data.path + "'";
  Dataset data = ckpt ? Dataset(text, ckpt->vocab, cfg.data.val_fraction, cfg.model.seq_len, source)
                      : Dataset(text, cfg.data.val_fraction, cfg.model.seq_len, source);
  const int64_t V = data.vocab().size();
  say(fmt::format("data: {} ({} characters, vocabulary {}, train {} / val {})", cfg.data.path,
                  text.size(), V, data.size(Split::Train), data.size(Split::Val)));

  if (!opt.resume) {
    check_fresh_run_dir(opt.out_dir);
    write_config_file(opt.out_dir, cfg);
  }

  torch::manual_seed(static_cast<uint64_t>(cfg.train.seed));
  Transformer model(cfg, V);
  model->train();
  auto optimizer = make_optimizer(*model, cfg.train);
  say(fmt::format("model: {} layers ({} MoE, {} experts each), {} parameters, {} active per token",
                  cfg.model.n_layers, cfg.n_moe_layers(), cfg.moe.n_experts,
                  human_count(static_cast<double>(model->n_params())),
                  human_count(static_cast<double>(model->n_active_params()))));

  Rng data_rng(static_cast<uint64_t>(cfg.train.seed));
  TrainState state;
  const std::string metrics_path = (fs::path(opt.out_dir) / "metrics.jsonl").string();
  if (ckpt) {
    load_weights(ckpt->dir, *model);
    load_optimizer_and_rng(ckpt->dir, *optimizer);
    state = ckpt->state;
    data_rng.set_state(state.data_rng);
  }
  if (opt.resume) truncate_metrics(metrics_path, state.step);
  MetricsWriter metrics(metrics_path);

  const std::vector<Batch> val_batches = fixed_batches(data, Split::Val, cfg.train, 0x76616cULL);
  const std::vector<Batch> train_eval_batches =
      fixed_batches(data, Split::Train, cfg.train, 0x747261ULL);

  const int64_t tokens_per_step = cfg.train.batch_size * cfg.model.seq_len;
  const auto t_start = Clock::now();
  const double time_offset = state.time_s;
  auto now_s = [&] { return time_offset + seconds_since(t_start); };

  RoutingAccumulator routing;
  double interval_ce = 0, interval_lb = 0, interval_z = 0, interval_step_s = 0;
  double interval_fwd_s = 0, interval_bwd_s = 0, interval_opt_s = 0;  // phases of the steps
  int64_t interval_steps = 0;
  double session_step_s = 0;
  int64_t session_steps = 0;
  double last_val = std::nan(""), last_train = std::nan("");

  for (int64_t step = state.step; step < cfg.train.steps; ++step) {
    const auto t_step = Clock::now();
    const double lr = lr_at(cfg.train, step);
    set_lr(*optimizer, lr);

    Batch batch = data.sample(Split::Train, cfg.train.batch_size, data_rng);
    ModelOutput out = model->forward(batch.x_BS);
    torch::Tensor ce =
        torch::cross_entropy_loss(out.logits_BSV.reshape({-1, V}), batch.y_BS.reshape({-1}));
    AuxLosses aux = total_aux_losses(out.moe);
    torch::Tensor loss = ce + cfg.moe.alpha * aux.lb + cfg.moe.z_loss * aux.z;
    const double loss_v = loss.item<double>();
    if (!std::isfinite(loss_v))
      throw Error(
          fmt::format("step {}: the loss is {} (cross-entropy {}, load-balancing {}); "
                      "try a lower train.lr. The last checkpoint is kept.",
                      step + 1, loss_v, ce.item<double>(), aux.lb.item<double>()));

    const auto t_backward = Clock::now();
    interval_fwd_s += std::chrono::duration<double>(t_backward - t_step).count();
    model->zero_grad(/*set_to_none=*/true);  // backward then hands over its gradients
    loss.backward();
    const auto t_optimizer = Clock::now();
    interval_bwd_s += std::chrono::duration<double>(t_optimizer - t_backward).count();
    double grad_norm = std::nan("");
    if (cfg.train.grad_clip > 0) {
      const GradNorm g = sw::grad_norm(model->parameters(), cfg.train.grad_clip);
      grad_norm = g.norm;
      optimizer->set_grad_scale(g.clip_scale);  // clipping, applied inside the update
    }
    optimizer->step();
    interval_opt_s += seconds_since(t_optimizer);

    const double step_s = seconds_since(t_step);
    interval_step_s += step_s;
    session_step_s += step_s;
    ++session_steps;
    ++interval_steps;
    interval_ce += ce.item<double>();
    interval_lb += aux.lb.item<double>();
    interval_z += aux.z.item<double>();
    routing.add(out.moe);
    state.step = step + 1;

    const bool last = state.step == cfg.train.steps;
    if (state.step % cfg.train.log_every == 0 || last) {
      const double tok_s = static_cast<double>(interval_steps * tokens_per_step) / interval_step_s;
      const double ce_mean = interval_ce / static_cast<double>(interval_steps);
      const double lb_mean = interval_lb / static_cast<double>(interval_steps);
      const double z_mean = interval_z / static_cast<double>(interval_steps);
      const double drop = routing.drop_fraction();
      nlohmann::ordered_json rec = {
          {"kind", "train"},
          {"step", state.step},
          {"time_s", now_s()},
          {"lr", lr},
          {"loss", ce_mean + cfg.moe.alpha * lb_mean + cfg.moe.z_loss * z_mean},
          {"ce", ce_mean},
          {"lb_loss", lb_mean},
          {"z_loss", z_mean},
          {"drop_frac", drop},
          {"tokens_per_s", tok_s},
          {"ms_forward", 1000.0 * interval_fwd_s / static_cast<double>(interval_steps)},
          {"ms_backward", 1000.0 * interval_bwd_s / static_cast<double>(interval_steps)},
          {"ms_optimizer", 1000.0 * interval_opt_s / static_cast<double>(interval_steps)},
          {"steps_in_record", interval_steps},
          {"layers", routing.to_json()}};
      if (std::isfinite(grad_norm)) rec["grad_norm"] = grad_norm;
      metrics.write(rec);
      const double eta = session_step_s / static_cast<double>(session_steps) *
                         static_cast<double>(cfg.train.steps - state.step);
      say(
          fmt::format("step {}/{} | loss {:.4f} | lb {:.3f} | drop {:.1f}% | lr {:.2e} | {:.0f} ms "
                      "| {} tok/s | eta {}",
                      state.step, cfg.train.steps, ce_mean, lb_mean, 100.0 * drop, lr,
                      1000.0 * interval_step_s / static_cast<double>(interval_steps),
                      human_count(tok_s), human_duration(eta)));
      interval_ce = interval_lb = interval_z = interval_step_s = 0;
      interval_fwd_s = interval_bwd_s = interval_opt_s = 0;
      interval_steps = 0;
      routing.reset();
    }
    if (state.step % cfg.train.eval_every == 0 || last) {
      last_val = evaluate(model, val_batches);
      last_train = evaluate(model, train_eval_batches);
      state.best_val_loss = std::min(state.best_val_loss, last_val);
      metrics.write(nlohmann::ordered_json{{"kind", "eval"},
                                           {"step", state.step},
                                           {"time_s", now_s()},
                                           {"val_loss", last_val},
                                           {"train_loss", last_train}});
      say(fmt::format("eval step {} | train {:.4f} | val {:.4f} | best val {:.4f}", state.step,
                      last_train, last_val, state.best_val_loss));
    }
    const int stop_signal = opt.stop ? opt.stop->load() : 0;
    if (opt.checkpoints &&
        (state.step % cfg.train.checkpoint_every == 0 || last || stop_signal != 0)) {
      state.time_s = now_s();
      state.data_rng = data_rng.state();
      save_checkpoint(opt.out_dir, cfg, data.vocab(), *model, *optimizer, state);
      prune_checkpoints(opt.out_dir, cfg.train.keep_checkpoints);
    }
    if (stop_signal != 0 && !last)
      throw Interrupted{stop_signal, state.step,
                        opt.checkpoints ? newest_checkpoint(opt.out_dir).value_or("") : ""};
  }

  if (!std::isfinite(last_val)) {  // resumed a finished run: evaluate what is there
    last_val = evaluate(model, val_batches);
    last_train = evaluate(model, train_eval_batches);
    state.best_val_loss = std::min(state.best_val_loss, last_val);
  }
  const double wall_s = now_s();
  nlohmann::ordered_json summary = {
      {"steps", state.step},
      {"final_train_loss", last_train},
      {"final_val_loss", last_val},
      {"best_val_loss", state.best_val_loss},
      {"wall_s", wall_s},
      {"tokens_per_s", session_steps > 0
                           ? static_cast<double>(session_steps * tokens_per_step) / session_step_s
                           : 0.0},
      {"tokens_trained", state.step * tokens_per_step},
      {"params_total", model->n_params()},
      {"params_active", model->n_active_params()},
      {"threads", threads},
  };
  write_file_atomic((fs::path(opt.out_dir) / "summary.json").string(), summary.dump(2) + "\n");
  say(fmt::format("done: {} steps in {} | val loss {:.4f} (best {:.4f}) | {} tok/s | run in {}",
                  state.step, human_duration(wall_s), last_val, state.best_val_loss,
                  human_count(summary["tokens_per_s"].get<double>()), opt.out_dir));
  return summary;
}

}  // namespace sw
