// SwitchFeedForward: composes the router, the dispatch and the experts into the Switch
// Transformer's sparse FFN, with the seed's semantics (capacity, dropping, pass-through,
// probability scaling), and returns its routing statistics and load-balancing loss as values.
#pragma once

#include <torch/torch.h>

#include "config/config.h"
#include "model/dispatch.h"
#include "model/experts.h"
#include "model/router.h"

namespace sw {

// What one MoE layer reports for one forward pass.
struct MoeStats {
  int64_t layer = -1;        // index of the transformer block (set by the transformer)
  int64_t tokens = 0;        // T
  torch::Tensor counts_E;    // int64: tokens routed to each expert, before dropping
  torch::Tensor prob_sum_E;  // float: sum over tokens of each expert's routing probability
  int64_t dropped = 0;       // tokens over capacity
  torch::Tensor prob_max_T;  // float: each token's winning probability
  torch::Tensor lb_loss;     // scalar, differentiable: E * sum_i f_i * P_i (before alpha)
};

struct SwitchFFNOutput {
  torch::Tensor y;  // same shape as the input
  MoeStats stats;
};

struct SwitchFFNImpl : torch::nn::Module {
  SwitchFFNImpl(int64_t d_model, int64_t d_ff, const MoeConfig& moe, Activation act);
  SwitchFFNOutput forward(const torch::Tensor& x);  // x: [..., D]

  MoeConfig cfg;
  Router router{nullptr};
  Experts experts{nullptr};
  Permutation permute = random_permutation;  // replaceable for tests
};
TORCH_MODULE(SwitchFFN);

}  // namespace sw
