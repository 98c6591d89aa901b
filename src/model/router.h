// The router: a linear map from a token to one logit per expert, computed in float32 with
// optional multiplicative input jitter in training, then scores (moe.score), each token's
// top-k experts and their gates. Enforcing capacity is dispatch's job, not the router's.
// Under moe.balance = bias the router holds a per-expert bias (a buffer, not a parameter)
// that is added to the scores when choosing the experts only: the gates stay unbiased.
#pragma once

#include <torch/torch.h>

#include "config/options.h"

namespace sw {

struct Routing {
  torch::Tensor logits_TE;    // float32
  torch::Tensor probs_TE;     // float32, each row sums to 1: the softmax, or the sigmoid scores
                              // normalised over the experts (what the balancing losses see)
  torch::Tensor scores_TE;    // float32: what the gates are made of (softmax probabilities or
                              // sigmoid scores), unbiased
  torch::Tensor gate_sum_T1;  // float32 [T, 1] or undefined (1): gate = score / gate_sum
  torch::Tensor expert_TK;    // int64: each token's k chosen experts, best first
  torch::Tensor gate_TK;      // float32, differentiable. Softmax: k = 1 the winning probability
                              // (Switch), k > 1 the chosen probabilities renormalized to sum to
                              // 1. Sigmoid: the chosen scores normalised to sum to 1.
};

struct RouterImpl : torch::nn::Module {
  RouterImpl(int64_t d_model, int64_t n_experts, int64_t top_k, double jitter,
             Score score = Score::Softmax, bool with_bias = false);
  Routing forward(const torch::Tensor& x_TD);

  int64_t top_k;
  double jitter;
  Score score;
  torch::nn::Linear proj{nullptr};
  torch::Tensor expert_bias;  // float32 [E], "expert_bias"; undefined unless with_bias
};
TORCH_MODULE(Router);

}  // namespace sw
