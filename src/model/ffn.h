// The dense position-wise feed-forward network (Linear -> activation -> Linear), and the
// activation shared with the experts so that one expert equals a dense FFN exactly. SwiGLU's
// gate and up projections are one input matrix of twice the hidden width (gate half first),
// so the activation maps [..., 2F] to [..., F] and every FFN keeps two weight matrices.
#pragma once

#include <torch/torch.h>

#include "config/options.h"

namespace sw {

torch::Tensor activate(const torch::Tensor& x, Activation a);

// The width of the input projection for hidden width d_ff: 2 * d_ff for swiglu.
inline int64_t input_width(int64_t d_ff, Activation a) {
  return a == Activation::Swiglu ? 2 * d_ff : d_ff;
}

struct DenseFFNImpl : torch::nn::Module {
  DenseFFNImpl(int64_t d_model, int64_t d_ff, Activation act);
  torch::Tensor forward(const torch::Tensor& x);  // [..., D] -> [..., D]

  torch::nn::Linear fc_in{nullptr}, fc_out{nullptr};
  Activation act;
};
TORCH_MODULE(DenseFFN);

}  // namespace sw
