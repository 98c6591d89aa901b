// Causal multi-head self-attention over [B, S, D] with a fused q/k/v projection.
#pragma once

#include <torch/torch.h>

namespace sw {

struct CausalSelfAttentionImpl : torch::nn::Module {
  CausalSelfAttentionImpl(int64_t d_model, int64_t n_heads, int64_t max_len, double dropout);
  torch::Tensor forward(const torch::Tensor& x_BSD);

  int64_t n_heads;
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
  torch::nn::Dropout attn_drop{nullptr}, resid_drop{nullptr};
  torch::Tensor mask_SS;  // true above the diagonal (future positions)
};
TORCH_MODULE(CausalSelfAttention);

}  // namespace sw
