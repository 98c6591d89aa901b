// The router: a linear map from a token to one logit per expert, computed in float32 with
// optional multiplicative input jitter in training, then scores (moe.score), each token's
// top-k experts and their gates. Enforcing capacity is dispatch's job, not the router's.
#pragma once

#include <torch/torch.h>

#include "config/options.h"

namespace sw {

struct Routing {
  torch::Tensor logits_TE;  // float32
  torch::Tensor probs_TE;   // float32, each row sums to 1: the softmax, or the sigmoid scores
                            // normalised over the experts (what the balancing losses see)
  torch::Tensor expert_TK;  // int64: each token's k chosen experts, best first
  torch::Tensor gate_TK;    // float32, differentiable. Softmax: k = 1 the winning probability
                            // (Switch), k > 1 the chosen probabilities renormalized to sum to
                            // 1. Sigmoid: the chosen scores normalised to sum to 1.
};

struct RouterImpl : torch::nn::Module {
  RouterImpl(int64_t d_model, int64_t n_experts, int64_t top_k, double jitter,
             Score score = Score::Softmax);
  Routing forward(const torch::Tensor& x_TD);

  int64_t top_k;
  double jitter;
  Score score;
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Router);

}  // namespace sw
