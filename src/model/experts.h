// The experts of one MoE layer: E feed-forward networks whose weights are stored stacked
// (w_in [E, D, F], b_in [E, F], w_out [E, F, D], b_out [E, D]) whatever strategy computes
// them, so a checkpoint trained with one strategy runs with any other.
#pragma once

#include <torch/torch.h>

#include "model/dispatch.h"
#include "model/ffn.h"

namespace sw {

struct ExpertsImpl : torch::nn::Module {
  ExpertsImpl(int64_t n_experts, int64_t d_model, int64_t d_ff, Activation act);

  // The seed's reference: one expert after another over its slice of the dispatch.
  // Returns y_ND for the kept tokens, in dispatch order (row i belongs to order_N[i]).
  torch::Tensor forward_loop(const torch::Tensor& x_TD, const Dispatch& d);

  int64_t n_experts, d_model, d_ff;
  Activation act;
  torch::Tensor w_in, b_in, w_out, b_out;
};
TORCH_MODULE(Experts);

}  // namespace sw
