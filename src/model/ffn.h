// The dense position-wise feed-forward network (Linear -> activation -> Linear), and the
// activation shared with the experts so that one expert equals a dense FFN exactly.
#pragma once

#include <torch/torch.h>

#include "config/options.h"

namespace sw {

torch::Tensor activate(const torch::Tensor& x, Activation a);

struct DenseFFNImpl : torch::nn::Module {
  DenseFFNImpl(int64_t d_model, int64_t d_ff, Activation act);
  torch::Tensor forward(const torch::Tensor& x);  // [..., D] -> [..., D]

  torch::nn::Linear fc_in{nullptr}, fc_out{nullptr};
  Activation act;
};
TORCH_MODULE(DenseFFN);

}  // namespace sw
