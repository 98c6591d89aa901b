#include "model/ffn.h"

namespace sw {

torch::Tensor activate(const torch::Tensor& x, Activation a) {
  switch (a) {
    case Activation::Gelu:
      return torch::gelu(x);
    case Activation::Relu:
      return torch::relu(x);
    case Activation::Swiglu: {
      const auto halves = x.chunk(2, /*dim=*/-1);
      return torch::silu(halves[0]) * halves[1];
    }
  }
  return {};
}

DenseFFNImpl::DenseFFNImpl(int64_t d_model, int64_t d_ff, Activation act_) : act(act_) {
  fc_in = register_module("fc_in", torch::nn::Linear(d_model, input_width(d_ff, act)));
  fc_out = register_module("fc_out", torch::nn::Linear(d_ff, d_model));
}

torch::Tensor DenseFFNImpl::forward(const torch::Tensor& x) {
  return fc_out(activate(fc_in(x), act));
}

}  // namespace sw
