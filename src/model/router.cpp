#include "model/router.h"

namespace sw {

RouterImpl::RouterImpl(int64_t d_model, int64_t n_experts) {
  proj = register_module("proj", torch::nn::Linear(d_model, n_experts));
}

torch::Tensor RouterImpl::forward(const torch::Tensor& x_TD) {
  torch::Tensor logits_TE = proj(x_TD.to(torch::kFloat32));
  return torch::softmax(logits_TE, /*dim=*/-1);
}

}  // namespace sw
