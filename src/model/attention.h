// Causal multi-head self-attention over [B, S, D] with a fused q/k/v projection.
#pragma once

#include <torch/torch.h>

namespace sw {

// Keys and values of the positions seen so far, for generation one position at a time.
struct KVCache {
  torch::Tensor k_BHTD, v_BHTD;  // room for max_len positions
  int64_t len = 0;               // positions filled
};

struct CausalSelfAttentionImpl : torch::nn::Module {
  CausalSelfAttentionImpl(int64_t d_model, int64_t n_heads, int64_t max_len, double dropout);
  // Without attention dropout (the default, and always in eval mode) one fused function with
  // its own backward; with it, forward_composed.
  torch::Tensor forward(const torch::Tensor& x_BSD);
  // The same attention from LibTorch ops under autograd, with dropout on the probabilities.
  torch::Tensor forward_composed(const torch::Tensor& x_BSD);
  // x_BSD holds positions cache.len .. cache.len + S - 1: their keys and values join the
  // cache and each attends to every cached position up to its own. Inference only.
  torch::Tensor forward_cached(const torch::Tensor& x_BSD, KVCache& cache);

  int64_t n_heads;
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
  torch::nn::Dropout attn_drop{nullptr}, resid_drop{nullptr};
  torch::Tensor mask_SS;  // true above the diagonal (future positions)
  torch::Tensor bias_SS;  // the same as an additive mask: -inf above the diagonal, else 0
};
TORCH_MODULE(CausalSelfAttention);

}  // namespace sw
