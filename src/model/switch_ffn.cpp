#include "model/switch_ffn.h"

namespace sw {

SwitchFFNImpl::SwitchFFNImpl(int64_t d_model, int64_t d_ff, const MoeConfig& moe, Activation act)
    : cfg(moe) {
  router = register_module("router", Router(d_model, moe.n_experts));
  experts = register_module("experts", Experts(moe.n_experts, d_model, d_ff, act));
}

SwitchFFNOutput SwitchFFNImpl::forward(const torch::Tensor& x) {
  const int64_t D = x.size(-1), E = cfg.n_experts;
  torch::Tensor x_TD = x.reshape({-1, D});
  const int64_t T = x_TD.size(0);

  torch::Tensor probs_TE = router(x_TD);
  auto [prob_max_T, expert_T] = probs_TE.max(/*dim=*/-1);

  const int64_t capacity = cfg.drop_tokens ? expert_capacity(cfg.capacity_factor, T, E) : -1;
  Dispatch d = dispatch_top1(expert_T, E, capacity, permute);

  torch::Tensor y_ND = experts->forward_loop(x_TD, d);
  torch::Tensor y_TD = torch::zeros_like(x_TD).index_copy(0, d.order_N, y_ND);
  if (d.n_dropped() > 0 && cfg.dropped == "pass")
    y_TD = y_TD.index_copy(0, d.dropped_M, x_TD.index_select(0, d.dropped_M));

  torch::Tensor scale_T = cfg.is_scale_prob ? prob_max_T : prob_max_T / prob_max_T.detach();
  y_TD = y_TD * scale_T.to(y_TD.scalar_type()).unsqueeze(1);

  SwitchFFNOutput out;
  out.y = y_TD.view(x.sizes());
  MoeStats& s = out.stats;
  s.tokens = T;
  s.counts_E = d.counts_E;
  s.dropped = d.n_dropped();
  s.prob_max_T = prob_max_T.detach();
  torch::Tensor prob_sum_E = probs_TE.sum(0);
  s.prob_sum_E = prob_sum_E.detach();
  // f_i = counts_i / T (not differentiable), P_i = prob_sum_i / T.
  torch::Tensor frac_E = d.counts_E.to(torch::kFloat32) / static_cast<double>(T);
  s.lb_loss = static_cast<double>(E) * (frac_E * (prob_sum_E / static_cast<double>(T))).sum();
  return out;
}

}  // namespace sw
