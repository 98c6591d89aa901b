#include "model/ffn.h"

namespace sw {

torch::Tensor activate(const torch::Tensor& x, Activation a) {
  return a == Activation::Gelu ? torch::gelu(x) : torch::relu(x);
}

DenseFFNImpl::DenseFFNImpl(int64_t d_model, int64_t d_ff, Activation act_) : act(act_) {
  fc_in = register_module("fc_in", torch::nn::Linear(d_model, d_ff));
  fc_out = register_module("fc_out", torch::nn::Linear(d_ff, d_model));
}

torch::Tensor DenseFFNImpl::forward(const torch::Tensor& x) {
  return fc_out(activate(fc_in(x), act));
}

}  // namespace sw
