// The experts of one MoE layer: E feed-forward networks whose weights are stored stacked
// (w_in [E, D, F], b_in [E, F], w_out [E, F, D], b_out [E, D]) whatever strategy computes
// them, so a checkpoint trained with one strategy runs with any other.
//
// Strategies (moe.strategy, config/options.h); all give the same outputs and gradients for the same
// dispatch:
//   loop      the seed's reference: one expert after another;
//   capacity  a padded [E, C, D] buffer and one batched matmul per FFN layer (static shapes);
//   grouped   the kept rows sorted by expert in one buffer and all experts computed by one
//             grouped operation over segment offsets with its own backward (grouped_ffn).
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "model/dispatch.h"
#include "model/ffn.h"

namespace sw {

// All experts' FFN over rows sorted by expert: rows [offsets[e], offsets[e+1]) of x_ND go
// through expert e. One autograd node: the backward writes each expert's gradient slice once
// (experts without rows get zeros, no per-expert full-size gradients), and experts without
// rows cost nothing.
torch::Tensor grouped_ffn(const torch::Tensor& x_ND, const torch::Tensor& w_in,
                          const torch::Tensor& b_in, const torch::Tensor& w_out,
                          const torch::Tensor& b_out, const std::vector<int64_t>& offsets,
                          Activation act);

struct ExpertsImpl : torch::nn::Module {
  ExpertsImpl(int64_t n_experts, int64_t d_model, int64_t d_ff, Activation act);

  // x_ND: the kept assignments' inputs in dispatch order (row i is d.order_N[i]'s token).
  // Returns their expert outputs, row for row.
  torch::Tensor forward(const torch::Tensor& x_ND, const Dispatch& d, Strategy s);
  torch::Tensor forward_loop(const torch::Tensor& x_ND, const Dispatch& d);
  torch::Tensor forward_capacity(const torch::Tensor& x_ND, const Dispatch& d);
  torch::Tensor forward_grouped(const torch::Tensor& x_ND, const Dispatch& d);

  int64_t n_experts, d_model, d_ff;
  Activation act;
  torch::Tensor w_in, b_in, w_out, b_out;
};
TORCH_MODULE(Experts);

}  // namespace sw
