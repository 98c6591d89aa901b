#include "model/experts.h"

namespace sw {

ExpertsImpl::ExpertsImpl(int64_t n_experts_, int64_t d_model_, int64_t d_ff_, Activation act_)
    : n_experts(n_experts_), d_model(d_model_), d_ff(d_ff_), act(act_) {
  // Same fan-in uniform init as torch::nn::Linear; the transformer re-initialises anyway.
  const double bound_in = 1.0 / std::sqrt(static_cast<double>(d_model));
  const double bound_out = 1.0 / std::sqrt(static_cast<double>(d_ff));
  w_in = register_parameter("w_in",
                            torch::empty({n_experts, d_model, d_ff}).uniform_(-bound_in, bound_in));
  b_in = register_parameter("b_in", torch::empty({n_experts, d_ff}).uniform_(-bound_in, bound_in));
  w_out = register_parameter(
      "w_out", torch::empty({n_experts, d_ff, d_model}).uniform_(-bound_out, bound_out));
  b_out = register_parameter("b_out",
                             torch::empty({n_experts, d_model}).uniform_(-bound_out, bound_out));
}

torch::Tensor ExpertsImpl::forward_loop(const torch::Tensor& x_TD, const Dispatch& d) {
  std::vector<torch::Tensor> outs;
  outs.reserve(static_cast<size_t>(n_experts));
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t lo = d.offsets[e], hi = d.offsets[e + 1];
    if (hi == lo) continue;
    torch::Tensor x_ND = x_TD.index_select(0, d.order_N.slice(0, lo, hi));
    torch::Tensor h_NF = activate(torch::addmm(b_in[e], x_ND, w_in[e]), act);
    outs.push_back(torch::addmm(b_out[e], h_NF, w_out[e]));
  }
  if (outs.empty()) return torch::empty({0, d_model}, x_TD.options());
  return torch::cat(outs);
}

}  // namespace sw
