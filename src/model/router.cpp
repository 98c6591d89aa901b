#include "model/router.h"

#include <limits>

#include "model/random.h"

namespace sw {

RouterImpl::RouterImpl(int64_t d_model, int64_t n_experts, int64_t top_k_, double jitter_,
                       Score score_, bool with_bias)
    : top_k(top_k_), jitter(jitter_), score(score_) {
  proj = register_module("proj", torch::nn::Linear(d_model, n_experts));
  if (with_bias)
    expert_bias = register_buffer("expert_bias", torch::zeros({n_experts}, torch::kFloat32));
}

namespace {

// Each token's k best experts by score_TE (plus the bias when there is one) and their
// unbiased scores, best first. `by_max`: top-1 by max (Switch's reference), else topk.
std::pair<torch::Tensor, torch::Tensor> choose(const torch::Tensor& score_TE,
                                               const torch::Tensor& bias_E, int64_t k,
                                               bool by_max) {
  if (!bias_E.defined()) {
    auto [s_TK, e_TK] =
        k == 1 && by_max ? score_TE.max(-1, /*keepdim=*/true) : score_TE.topk(k, -1);
    return {s_TK, e_TK};
  }
  torch::Tensor e_TK = std::get<1>((score_TE.detach() + bias_E).topk(k, -1));
  return {score_TE.gather(-1, e_TK), e_TK};
}

}  // namespace

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
    auto [s_TK, e_TK] = choose(s_TE, expert_bias, top_k, /*by_max=*/false);
    r.scores_TE = s_TE;
    r.gate_sum_T1 = s_TK.sum(-1, /*keepdim=*/true).clamp_min(tiny);
    r.gate_TK = s_TK / r.gate_sum_T1;
    r.expert_TK = e_TK;
    return r;
  }
  r.probs_TE = torch::softmax(r.logits_TE, /*dim=*/-1);
  auto [p_TK, e_TK] = choose(r.probs_TE, expert_bias, top_k, /*by_max=*/true);
  r.scores_TE = r.probs_TE;
  if (top_k > 1) r.gate_sum_T1 = p_TK.sum(-1, /*keepdim=*/true);
  r.gate_TK = top_k == 1 ? p_TK : p_TK / r.gate_sum_T1;
  r.expert_TK = e_TK;
  return r;
}

}  // namespace sw
