#include "model/router.h"

#include <limits>

#include "model/random.h"

namespace sw {

RouterImpl::RouterImpl(int64_t d_model, int64_t n_experts, int64_t top_k_, double jitter_,
                       Score score_)
    : top_k(top_k_), jitter(jitter_), score(score_) {
  proj = register_module("proj", torch::nn::Linear(d_model, n_experts));
}

Routing RouterImpl::forward(const torch::Tensor& x_TD) {
  torch::Tensor x = x_TD.to(torch::kFloat32);
  if (is_training() && jitter > 0)
    x = x * torch::empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter, current_generator());
  Routing r;
  r.logits_TE = torch::linear(x, proj->weight.to(torch::kFloat32), proj->bias.to(torch::kFloat32));
  if (score == Score::Sigmoid) {
    // Scores below ~1e-38 (logits under -87) underflow to 0: the sums are kept positive
    // so that such a token gets zero gates, not 0 / 0.
    const double tiny = std::numeric_limits<float>::min();
    const torch::Tensor s_TE = torch::sigmoid(r.logits_TE);
    r.probs_TE = s_TE / s_TE.sum(-1, /*keepdim=*/true).clamp_min(tiny);
    auto [s_TK, e_TK] = s_TE.topk(top_k, /*dim=*/-1);
    r.gate_TK = s_TK / s_TK.sum(-1, /*keepdim=*/true).clamp_min(tiny);
    r.expert_TK = e_TK;
    return r;
  }
  r.probs_TE = torch::softmax(r.logits_TE, /*dim=*/-1);
  if (top_k == 1) {
    auto [p_T, e_T] = r.probs_TE.max(/*dim=*/-1);
    r.gate_TK = p_T.unsqueeze(1);
    r.expert_TK = e_T.unsqueeze(1);
  } else {
    auto [p_TK, e_TK] = r.probs_TE.topk(top_k, /*dim=*/-1);
    r.gate_TK = p_TK / p_TK.sum(-1, /*keepdim=*/true);
    r.expert_TK = e_TK;
  }
  return r;
}

}  // namespace sw
