#include "model/switch_ffn.h"

#include <limits>

#include <fmt/format.h>

#include "model/expert_parallel.h"
#include "util/error.h"

namespace sw {

SwitchFFNImpl::SwitchFFNImpl(int64_t d_model, int64_t d_ff, const MoeConfig& moe, Activation act)
    : cfg(moe) {
  router = register_module("router", Router(d_model, moe.n_experts, moe.top_k, moe.jitter,
                                            moe.score, moe.balance == Balance::Bias));
  experts = register_module("experts", Experts(moe.n_experts, d_model, d_ff, act));
  if (moe.shared_experts > 0)
    shared = register_module("shared", DenseFFN(d_model, moe.shared_experts * d_ff, act));
}

void SwitchFFNImpl::update_bias(const torch::Tensor& load_E, double rate) {
  torch::NoGradGuard no_grad;
  const torch::Tensor load = load_E.to(torch::kFloat64);
  const torch::Tensor step = (load.mean() - load).sign() * rate;
  router->expert_bias.add_(step.to(torch::kFloat32));
}

void SwitchFFNImpl::enable_expert_parallel(std::shared_ptr<Comm> c) {
  const int64_t W = c->size(), E = cfg.n_experts;
  if (E % W != 0)
    throw Error(
        fmt::format("moe.n_experts = {} is not divisible by the {} expert-parallel ranks", E, W));
  const int64_t El = E / W, lo = c->rank() * El;
  torch::NoGradGuard no_grad;
  for (torch::Tensor* p : {&experts->w_in, &experts->b_in, &experts->w_out, &experts->b_out})
    p->set_data(p->slice(0, lo, lo + El).clone());
  experts->n_experts = El;
  comm = std::move(c);
}

Routing SwitchFFNImpl::route(const torch::Tensor& x_TD) {
  return router(x_TD);
}

Dispatch SwitchFFNImpl::dispatch(const Routing& r, int64_t tokens) {
  const double cf = is_training() ? cfg.capacity_factor : cfg.eval_capacity_factor;
  const int64_t capacity =
      cfg.drop_tokens ? expert_capacity(cf, tokens, cfg.n_experts, cfg.top_k) : -1;
  torch::Tensor preference_TE;  // by the scores that chose the experts
  if (cfg.overflow == Overflow::Reroute && capacity >= 0) {
    torch::Tensor chosen_by = r.scores_TE.detach();
    if (router->expert_bias.defined()) chosen_by = chosen_by + router->expert_bias;
    preference_TE = chosen_by.argsort(/*dim=*/-1, /*descending=*/true);
  }
  return make_dispatch(r.expert_TK, r.gate_TK, cfg.n_experts, capacity, cfg.drop_policy,
                       random_rank, preference_TE);
}

namespace {

// The seats per expert of the blocks an expert-parallel exchange sends its rows in (the
// counts in their header), or -1 to send the counts first. Every rank decides alike: its
// capacity comes from its token count, the same on every rank (equal shares of the batch,
// equal micro-batches). Blocks while they hold at most twice the assignments (capacity
// factor <= 2); past that their empty seats cost more bytes than one collective saves.
int64_t block_seats(const Dispatch& d, int64_t tokens, const MoeConfig& cfg) {
  if (d.capacity < 0) return -1;
  return cfg.n_experts * d.capacity <= 2 * cfg.top_k * tokens ? d.capacity : -1;
}

}  // namespace

torch::Tensor SwitchFFNImpl::combine(const torch::Tensor& x_TD, const Routing& r,
                                     const Dispatch& d) {
  // Each assignment contributes scale * (expert output, or for a dropped one its input
  // under `pass`, nothing under `zero`). With is_scale_prob the scale is the gate; else
  // gate / gate.detach(), which is 1 but lets gradients reach the router.
  torch::Tensor gate_A = r.gate_TK.reshape({-1});
  // (A rerouted gate may underflow to 0: it then scales by 0, not 0 / 0.)
  torch::Tensor scale_A =
      cfg.is_scale_prob ? gate_A
                        : gate_A / gate_A.detach().clamp_min(std::numeric_limits<float>::min());
  scale_A = scale_A.to(x_TD.scalar_type());

  torch::Tensor token_N = d.token_N();
  torch::Tensor x_ND = x_TD.index_select(0, token_N);
  Comm* lane = comm ? CommLane::current() : nullptr;  // a micro-batch's own, if overlapping
  torch::Tensor y_ND =
      comm ? expert_parallel_ffn(lane ? *lane : *comm, x_ND, d.offsets, experts->w_in,
                                 experts->b_in, experts->w_out, experts->b_out, experts->act,
                                 experts->deferred, block_seats(d, x_TD.size(0), cfg))
           : experts->forward(x_ND, d, cfg.strategy);
  torch::Tensor y_TD = torch::zeros_like(x_TD).index_add(
      0, token_N, y_ND * scale_A.index_select(0, d.order_N).unsqueeze(1));
  if (d.n_dropped() > 0 && cfg.dropped == DroppedOutput::Pass) {
    torch::Tensor token_M = d.token_M();
    y_TD = y_TD.index_add(
        0, token_M,
        x_TD.index_select(0, token_M) * scale_A.index_select(0, d.dropped_M).unsqueeze(1));
  }
  return y_TD;
}

SwitchFFNOutput SwitchFFNImpl::forward(const torch::Tensor& x,
                                       const std::function<void(const torch::Tensor&)>& on_logits) {
  const int64_t D = x.size(-1), E = cfg.n_experts;
  torch::Tensor x_TD = x.reshape({-1, D});
  const int64_t T = x_TD.size(0);

  Routing r = route(x_TD);
  if (on_logits) on_logits(r.logits_TE);
  Dispatch d = dispatch(r, T);
  Routing seated = r;
  if (d.n_rerouted() > 0) {
    // A rerouted assignment's gate is its new expert's score over the token's gate sum.
    torch::Tensor e_TK = d.expert_A.view({T, cfg.top_k});
    seated.expert_TK = e_TK;
    seated.gate_TK = r.scores_TE.gather(1, e_TK);
    if (r.gate_sum_T1.defined()) seated.gate_TK = seated.gate_TK / r.gate_sum_T1;
  }

  SwitchFFNOutput out;
  torch::Tensor y_TD = combine(x_TD, seated, d);
  if (shared) y_TD = y_TD + shared(x_TD);
  out.y = y_TD.view(x.sizes());
  MoeStats& s = out.stats;
  s.tokens = T;
  s.assignments = T * cfg.top_k;
  s.counts_E = d.counts_E;
  s.dropped = d.n_dropped();
  s.rerouted = d.n_rerouted();
  s.probs_TE = r.probs_TE.detach();
  s.prob_max_T = std::get<0>(s.probs_TE.max(-1));
  s.routed_TK = r.expert_TK;
  torch::Tensor prob_sum_E = r.probs_TE.sum(0);
  s.prob_sum_E = prob_sum_E.detach();
  // f_i = counts_i / (T k) (not differentiable), P_i = prob_sum_i / T; balanced gives 1.
  torch::Tensor frac_E = d.counts_E.to(torch::kFloat32) / static_cast<double>(s.assignments);
  s.lb_loss = static_cast<double>(E) * (frac_E * (prob_sum_E / static_cast<double>(T))).sum();
  s.z_loss = torch::logsumexp(r.logits_TE, -1).pow(2).mean();
  switch (cfg.balance) {
    case Balance::AuxLoss:
      s.balance_loss = s.lb_loss;
      break;
    case Balance::Variance:  // over experts, of P_i = prob_sum_i / T
      s.balance_loss = (prob_sum_E / static_cast<double>(T)).var(/*unbiased=*/false);
      break;
    case Balance::Bias:  // balanced by the router's bias, no loss term
    case Balance::None:
      s.balance_loss = torch::zeros({}, torch::kFloat32);
      break;
  }
  return out;
}

}  // namespace sw
