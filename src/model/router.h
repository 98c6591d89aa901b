// The router: a linear map from a token to one logit per expert, computed in float32, and
// its softmax. Choosing experts and enforcing capacity is dispatch's job, not the router's.
#pragma once

#include <torch/torch.h>

namespace sw {

struct RouterImpl : torch::nn::Module {
  RouterImpl(int64_t d_model, int64_t n_experts);
  torch::Tensor forward(const torch::Tensor& x_TD);  // -> probs_TE (float32)

  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Router);

}  // namespace sw
