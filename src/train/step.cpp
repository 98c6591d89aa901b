#include "train/step.h"

#include <chrono>
#include <cmath>
#include <optional>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include "model/random.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"
#include "train/schedule.h"
#include "util/error.h"
#include "util/parallel.h"

namespace sw {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// One forward's training loss and its parts.
struct StepLoss {
  torch::Tensor ce, total;
  AuxLosses aux;
};
StepLoss step_loss(const ModelOutput& out, const torch::Tensor& y_BS, const Config& cfg) {
  const int64_t V = out.logits_BSV.size(-1);
  StepLoss l;
  l.ce = torch::cross_entropy_loss(out.logits_BSV.reshape({-1, V}), y_BS.reshape({-1}));
  l.aux = total_aux_losses(out.moe);
  l.total = training_loss(cfg.moe, l.ce, l.aux.balance, l.aux.z);
  return l;
}

// The forward and backward passes of a step on this rank: the loss values and how long
// each pass took. Leaves the gradient of the mean loss in every parameter's .grad.
struct Passes {
  double ce = 0, lb = 0, z = 0, balance = 0;  // means over the routing groups
  double forward_s = 0, backward_s = 0;       // summed over the routing groups
  std::vector<std::vector<MoeStats>> moe;     // each routing group's statistics
};

Passes whole_batch(Transformer& model, const torch::Tensor& x_BS, const torch::Tensor& y_BS,
                   const Config& cfg) {
  const auto t0 = Clock::now();
  ModelOutput out = model->forward(x_BS);
  const StepLoss l = step_loss(out, y_BS, cfg);
  const auto t1 = Clock::now();
  model->zero_grad(/*set_to_none=*/true);  // backward then hands over its gradients
  l.total.backward();
  Passes p;
  p.forward_s = std::chrono::duration<double>(t1 - t0).count();
  p.backward_s = seconds_since(t1);
  p.ce = l.ce.item<double>();
  p.lb = l.aux.lb.item<double>();
  p.z = l.aux.z.item<double>();
  p.balance = l.aux.balance.item<double>();
  p.moe.push_back(std::move(out.moe));
  return p;
}

// train.micro_batches routing groups. They run at once, each alone on one thread, except
// with expert parallelism, whose forward and backward hold collectives: there they run at
// once on their own lanes (dist.overlap), else one after another. Each draws from its own
// generator, seeded from the default one, and their gradients are summed in micro-batch
// order, so the step depends neither on the thread count nor on the overlap.
Passes micro_batches(Transformer& model, const torch::Tensor& x_BS, const torch::Tensor& y_BS,
                     const Config& cfg, const Ranks& ranks) {
  const int64_t m = cfg.train.micro_batches;
  const auto n = static_cast<size_t>(m);
  const std::vector<torch::Tensor> xs = x_BS.chunk(m), ys = y_BS.chunk(m);
  const torch::Tensor seeds = torch::empty({m}, torch::kInt64).random_();  // default generator
  const std::vector<torch::Tensor> params = model->parameters();
  std::vector<std::vector<torch::Tensor>> grads(n);
  std::vector<Passes> each(n);
  model->zero_grad(/*set_to_none=*/true);
  auto one = [&](int64_t i) {
    const auto u = static_cast<size_t>(i);
    const auto t0 = Clock::now();
    GeneratorScope scope(
        at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seeds[i].item<int64_t>())));
    const MicroBatchScope tag(i);
    ModelOutput out = model->forward(xs[u]);
    const StepLoss l = step_loss(out, ys[u], cfg);
    const auto t1 = Clock::now();
    grads[u] = torch::autograd::grad({l.total / static_cast<double>(m)}, params,
                                     /*grad_outputs=*/{},
                                     /*retain_graph=*/false, /*create_graph=*/false,
                                     /*allow_unused=*/true);
    each[u].forward_s = std::chrono::duration<double>(t1 - t0).count();
    each[u].backward_s = seconds_since(t1);
    each[u].ce = l.ce.item<double>();
    each[u].lb = l.aux.lb.item<double>();
    each[u].z = l.aux.z.item<double>();
    each[u].balance = l.aux.balance.item<double>();
    each[u].moe.push_back(std::move(out.moe));
  };
  if (ranks.lanes) {
    ranks.lanes->run(one);
  } else if (ranks.expert_parallel) {
    for (int64_t i = 0; i < m; ++i)
      one(i);
  } else {
    sw::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        one(i);
    });
  }
  for (size_t j = 0; j < params.size(); ++j) {
    torch::Tensor g;
    for (size_t i = 0; i < n; ++i) {  // in micro-batch order
      const torch::Tensor& gi = grads[i][j];
      if (gi.defined()) g = g.defined() ? g + gi : gi.contiguous();
    }
    torch::Tensor p = params[j];
    p.mutable_grad() = g;
  }
  Passes r;
  for (Passes& e : each) {
    r.ce += e.ce / static_cast<double>(m);
    r.lb += e.lb / static_cast<double>(m);
    r.z += e.z / static_cast<double>(m);
    r.balance += e.balance / static_cast<double>(m);
    r.forward_s += e.forward_s;
    r.backward_s += e.backward_s;
    r.moe.push_back(std::move(e.moe.front()));
  }
  return r;
}

// The parameters whose gradients hold a NaN or an infinity, e.g.
// "gradients of blocks.1.ffn.experts.w_in, blocks.1.ffn.router.proj.weight".
std::string nonfinite_gradients(torch::nn::Module& model) {
  std::vector<std::string> names;
  for (const auto& item : model.named_parameters()) {
    const torch::Tensor& gr = item.value().grad();
    if (gr.defined() && !torch::isfinite(gr).all().item<bool>()) names.push_back(item.key());
  }
  if (names.empty()) return "";
  if (names.size() > 4) {
    const size_t more = names.size() - 3;
    names.resize(3);
    names.push_back(fmt::format("and {} more", more));
  }
  return fmt::format("gradients of {}", fmt::join(names, ", "));
}

// "step N: the loss is not finite (...); first non-finite: <where>". Runs a checking
// forward pass on the batch (on every rank: a collective with expert parallelism).
std::string describe_nonfinite(Transformer& model, const torch::Tensor& x_BS, const StepResult& s,
                               int64_t step) {
  std::string where = model->first_nonfinite(x_BS);
  if (where.empty()) where = nonfinite_gradients(*model);
  return fmt::format(
      "step {}: {} (cross-entropy {}, balancing {}, gradient norm {}){}", step + 1,
      std::isfinite(s.loss) ? "the gradients are not finite" : "the loss is not finite", s.ce,
      s.balance, s.grad_norm, where.empty() ? "" : "; first non-finite: " + where);
}

// The global gradient norm and clip factor from this rank's gradients, or, with several
// ranks, from `sum`, which also sums `values` (the losses, then a stop request).
GradNorm combine_over_ranks(StepContext& c, std::optional<GradientSum>& sum,
                            std::vector<double>& values) {
  if (!sum) return sw::grad_norm(c.model->parameters(), c.cfg.train.grad_clip);
  const double grad_sq = sum->finish(values);
  for (size_t i = 0; i + 1 < values.size(); ++i)
    values[i] /= static_cast<double>(c.ranks.world);
  GradNorm g{};
  g.norm = std::sqrt(grad_sq);
  g.clip_scale = std::min(1.0, c.cfg.train.grad_clip / (g.norm + 1e-6));
  return g;
}

// moe.balance = bias: every MoE layer's bias moves by the step's loads, summed over the
// routing groups and, by one all-reduce, over the ranks, so that every rank keeps the same
// biases.
void update_expert_biases(StepContext& c, const std::vector<std::vector<MoeStats>>& groups) {
  if (groups.empty() || groups.front().empty()) return;
  std::vector<torch::Tensor> loads;  // one per MoE layer
  for (const auto& g : groups)
    for (size_t l = 0; l < g.size(); ++l) {
      const torch::Tensor counts = g[l].counts_E.to(torch::kFloat64);
      if (loads.size() <= l)
        loads.push_back(counts);
      else
        loads[l] = loads[l] + counts;
    }
  torch::Tensor load_LE = torch::stack(loads);
  if (c.ranks.comm) c.ranks.comm->all_reduce_sum(load_LE);
  int64_t l = 0;
  for (Block& b : c.model->block_list)
    if (b->switch_) b->switch_->update_bias(load_LE[l++], c.cfg.moe.bias_rate);
}

}  // namespace

void defer_expert_weight_grads(Transformer& model) {
  for (Block& b : model->block_list)
    if (b->switch_ && b->switch_->cfg.strategy == Strategy::Grouped)
      b->switch_->experts->defer_weight_grads(true);
}

NonfiniteGuard::NonfiniteGuard(OnNonfinite policy, std::string run_dir,
                               std::function<void(const std::string&)> say)
    : policy_(policy), run_dir_(std::move(run_dir)), say_(std::move(say)) {}

void NonfiniteGuard::skip_or_throw(const std::string& what) {
  const bool skip = policy_ == OnNonfinite::Skip;
  if (!skip || consecutive_ >= kMaxConsecutiveSkips) {
    const auto kept = newest_checkpoint(run_dir_);
    throw Error(fmt::format(
        "{}{}. {}; try a lower train.lr{}.", what,
        consecutive_ > 0 ? fmt::format(" ({} steps in a row)", consecutive_ + 1) : "",
        kept ? "The last checkpoint is kept: " + *kept : std::string("No checkpoint yet"),
        skip ? "" : " or train.on_nonfinite=skip"));
  }
  ++consecutive_;
  say_(what + "; step skipped (train.on_nonfinite=skip)");
}

StepResult train_step(StepContext& c, int64_t step) {
  const auto t_step = Clock::now();
  const CommStats comm_before = c.ranks.comm ? c.ranks.comm->stats() : CommStats{};
  StepResult s;
  s.lr = lr_at(c.cfg.train, step);
  set_lr(c.optimizer, s.lr);

  const Batch batch = c.data.sample(Split::Train, c.cfg.train.batch_size, c.data_rng);
  const torch::Tensor x_BS = c.ranks.share(batch.x_BS), y_BS = c.ranks.share(batch.y_BS);
  Passes p = c.cfg.train.micro_batches == 1 ? whole_batch(c.model, x_BS, y_BS, c.cfg)
                                            : micro_batches(c.model, x_BS, y_BS, c.cfg, c.ranks);
  // The values over all ranks: losses averaged, and a stop request from any rank stops
  // every rank after this same step. With several ranks their sum, and the replicated
  // gradients', starts at once; with the experts sharded it runs while the expert weight
  // gradients held back by the backward passes are computed.
  std::vector<double> v = {p.ce, p.lb, p.z, p.balance,
                           static_cast<double>(c.stop ? c.stop->load() : 0)};
  auto flush = [&] {
    for (Block& b : c.model->block_list)
      if (b->switch_) b->switch_->experts->flush_weight_grads();
  };
  std::optional<GradientSum> sum;
  if (!c.ranks.expert_parallel) flush();  // replicated experts: part of the sum
  if (c.ranks.comm) sum.emplace(*c.ranks.comm, c.params, v);
  if (c.ranks.expert_parallel) flush();
  // The step's wall time so far, split between the passes as their own times were (with
  // micro-batches they overlap on the threads).
  const double wall = seconds_since(t_step);
  const double f = p.forward_s / std::max(p.forward_s + p.backward_s, 1e-12);
  s.forward_s = c.cfg.train.micro_batches == 1 ? wall - p.backward_s : wall * f;
  s.backward_s = wall - s.forward_s;
  s.moe = std::move(p.moe);
  const auto t_optimizer = Clock::now();

  const GradNorm g = combine_over_ranks(c, sum, v);
  s.ce = v[0];
  s.lb = v[1];
  s.z = v[2];
  s.balance = v[3];
  s.loss = training_loss(c.cfg.moe, s.ce, s.balance, s.z);
  s.grad_norm = g.norm;
  s.stop_requested = v[4] > 0;
  s.applied = std::isfinite(s.loss) && std::isfinite(s.grad_norm);
  if (!s.applied) {
    c.nonfinite.skip_or_throw(describe_nonfinite(c.model, x_BS, s, step));
    c.model->zero_grad(/*set_to_none=*/true);
  } else {
    c.nonfinite.passed();
    if (c.cfg.train.grad_clip > 0)
      c.optimizer.set_grad_scale(g.clip_scale);  // clipping, applied inside the update
    c.optimizer.step();
    if (c.cfg.moe.balance == Balance::Bias) update_expert_biases(c, s.moe);
  }
  s.optimizer_s = seconds_since(t_optimizer);
  s.step_s = seconds_since(t_step);
  if (c.ranks.comm) s.comm = c.ranks.comm->stats() - comm_before;
  return s;
}

}  // namespace sw
