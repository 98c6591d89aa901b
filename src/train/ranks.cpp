#include "train/ranks.h"

#include <fmt/format.h>

#include "train/fused_adamw.h"
#include "util/error.h"

namespace sw {

namespace {

std::vector<torch::Tensor*> expert_tensors(SwitchFFNImpl& ffn) {
  return {&ffn.experts->w_in, &ffn.experts->b_in, &ffn.experts->w_out, &ffn.experts->b_out};
}

std::vector<SwitchFFNImpl*> switch_layers(Transformer& model) {
  std::vector<SwitchFFNImpl*> out;
  for (auto& b : model->block_list)
    if (b->switch_) out.push_back(b->switch_.get());
  return out;
}

// The whole [E, ...] tensor from each rank's [E/W, ...] slice: zeros elsewhere, summed.
torch::Tensor gather_rows(Comm& comm, const torch::Tensor& local, int64_t E) {
  std::vector<int64_t> shape = local.sizes().vec();
  const int64_t El = shape[0];
  shape[0] = E;
  torch::Tensor full = torch::zeros(shape, local.options());
  full.narrow(0, comm.rank() * El, El).copy_(local);
  comm.all_reduce_sum(full);
  return full;
}

}  // namespace

torch::Tensor Ranks::share(const torch::Tensor& rows) const {
  if (world == 1) return rows;
  const int64_t n = rows.size(0) / world;
  return rows.narrow(0, rank * n, n);
}

ParamSplit split_parameters(Transformer& model, bool expert_parallel) {
  std::vector<const c10::TensorImpl*> experts;
  if (expert_parallel)
    for (SwitchFFNImpl* l : switch_layers(model))
      for (torch::Tensor* t : expert_tensors(*l))
        experts.push_back(t->unsafeGetTensorImpl());
  ParamSplit s;
  for (const auto& p : model->parameters()) {
    const bool sharded =
        std::find(experts.begin(), experts.end(), p.unsafeGetTensorImpl()) != experts.end();
    (sharded ? s.sharded : s.replicated).push_back(p);
  }
  return s;
}

void shard_experts(Transformer& model, torch::optim::Optimizer& opt,
                   const std::shared_ptr<Comm>& comm) {
  torch::NoGradGuard no_grad;
  for (SwitchFFNImpl* l : switch_layers(model)) {
    const int64_t El = l->cfg.n_experts / comm->size(), lo = comm->rank() * El;
    l->enable_expert_parallel(comm);
    for (torch::Tensor* t : expert_tensors(*l))
      if (auto* s = adamw_state(opt, *t)) {
        s->exp_avg(s->exp_avg().narrow(0, lo, El).clone());
        s->exp_avg_sq(s->exp_avg_sq().narrow(0, lo, El).clone());
      }
  }
}

GradientSum::GradientSum(Comm& comm, const ParamSplit& params, const std::vector<double>& values)
    : comm_(comm), params_(params) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts;
  for (const auto& p : params_.replicated) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    parts.push_back(p.grad().reshape({-1}));
  }
  const std::vector<float> tail(values.begin(), values.end());
  parts.push_back(torch::tensor(tail, torch::kFloat32));
  buf_ = torch::cat(parts);
  sum_.emplace(comm_, buf_);
}

double GradientSum::finish(std::vector<double>& values) {
  torch::NoGradGuard no_grad;
  const double W = static_cast<double>(comm_.size());
  double sharded_sq = 0;
  if (!params_.sharded.empty()) {  // the same on every rank: set by the configuration
    torch::Tensor sq = torch::zeros({1}, torch::kFloat64);
    for (const auto& p : params_.sharded)
      if (p.grad().defined()) sq += p.grad().square().sum(torch::kFloat64);
    comm_.all_reduce_sum(sq);
    sharded_sq = sq.item<double>();
  }
  sum_->wait();

  const auto n_values = static_cast<int64_t>(values.size());
  const int64_t n_grad = buf_.numel() - n_values;
  torch::Tensor grads = buf_.narrow(0, 0, n_grad).div_(W);
  int64_t off = 0;
  for (const auto& p : params_.replicated) {
    torch::Tensor g = p.grad();
    g.copy_(grads.narrow(0, off, g.numel()).view_as(g));
    off += g.numel();
  }
  for (const auto& p : params_.sharded)
    if (p.grad().defined()) p.grad().div_(W);
  torch::Tensor t = buf_.narrow(0, n_grad, n_values).to(torch::kFloat64);
  for (int64_t i = 0; i < n_values; ++i)
    values[static_cast<size_t>(i)] = t[i].item<double>();
  const double replicated_sq = grads.pow(2).sum().item<double>();
  return replicated_sq + sharded_sq / (W * W);
}

void with_full_experts(Comm& comm, Transformer& model, torch::optim::Optimizer& opt,
                       const std::function<void()>& f) {
  struct Saved {
    torch::Tensor* param;
    torch::Tensor data, exp_avg, exp_avg_sq;
  };
  std::vector<Saved> saved;
  {
    torch::NoGradGuard no_grad;
    for (SwitchFFNImpl* l : switch_layers(model)) {
      const int64_t E = l->cfg.n_experts;
      for (torch::Tensor* t : expert_tensors(*l)) {
        Saved s{t, t->data(), {}, {}};
        torch::Tensor full = gather_rows(comm, s.data, E);
        if (auto* st = adamw_state(opt, *t)) {
          s.exp_avg = st->exp_avg();
          s.exp_avg_sq = st->exp_avg_sq();
          st->exp_avg(gather_rows(comm, s.exp_avg, E));
          st->exp_avg_sq(gather_rows(comm, s.exp_avg_sq, E));
        }
        t->set_data(full);
        saved.push_back(std::move(s));
      }
    }
  }
  auto restore = [&] {
    for (Saved& s : saved) {
      s.param->set_data(s.data);
      if (auto* st = adamw_state(opt, *s.param); st && s.exp_avg.defined()) {
        st->exp_avg(s.exp_avg);
        st->exp_avg_sq(s.exp_avg_sq);
      }
    }
  };
  try {
    f();
  } catch (...) {
    restore();
    throw;
  }
  restore();
}

torch::Tensor gather_rng_states(Comm& comm) {
  const torch::Tensor mine = at::detail::getDefaultCPUGenerator().get_state();
  torch::Tensor all = torch::zeros({comm.size(), mine.numel()}, torch::kInt32);
  all[comm.rank()].copy_(mine.to(torch::kInt32));
  comm.all_reduce_sum(all);
  return all.to(torch::kUInt8);
}

}  // namespace sw
