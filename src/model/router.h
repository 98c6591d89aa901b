// The router: a linear map from a token to one logit per expert, computed in float32 with
// optional multiplicative input jitter in training, then each token's top-k experts and
// their gates. Enforcing capacity is dispatch's job, not the router's.
#pragma once

#include <torch/torch.h>

namespace sw {

struct Routing {
  torch::Tensor logits_TE;  // float32
  torch::Tensor probs_TE;   // float32 softmax over experts
  torch::Tensor expert_TK;  // int64: each token's k chosen experts, best first
  torch::Tensor gate_TK;    // float32, differentiable: k = 1 the winning probability (Switch);
                            // k > 1 the chosen probabilities renormalized to sum to 1
};

struct RouterImpl : torch::nn::Module {
  RouterImpl(int64_t d_model, int64_t n_experts, int64_t top_k, double jitter);
  Routing forward(const torch::Tensor& x_TD);

  int64_t top_k;
  double jitter;
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Router);

}  // namespace sw
