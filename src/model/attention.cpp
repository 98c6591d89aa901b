#include "model/attention.h"

#include <cmath>

namespace sw {

CausalSelfAttentionImpl::CausalSelfAttentionImpl(int64_t d_model, int64_t n_heads_, int64_t max_len,
                                                 double dropout)
    : n_heads(n_heads_) {
  qkv = register_module("qkv", torch::nn::Linear(d_model, 3 * d_model));
  proj = register_module("proj", torch::nn::Linear(d_model, d_model));
  attn_drop = register_module("attn_drop", torch::nn::Dropout(dropout));
  resid_drop = register_module("resid_drop", torch::nn::Dropout(dropout));
  // Not a buffer: it is derived from the shape, so it stays out of the state dict.
  mask_SS = torch::ones({max_len, max_len}, torch::kBool).triu(/*diagonal=*/1);
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x_BSD) {
  const int64_t B = x_BSD.size(0), S = x_BSD.size(1), D = x_BSD.size(2);
  const int64_t Dh = D / n_heads;
  // [B, S, 3D] -> 3 x [B, H, S, Dh]
  auto qkv_parts = qkv(x_BSD).view({B, S, 3, n_heads, Dh}).permute({2, 0, 3, 1, 4}).unbind(0);
  const torch::Tensor &q = qkv_parts[0], &k = qkv_parts[1], &v = qkv_parts[2];
  torch::Tensor att_BHSS = torch::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(Dh));
  att_BHSS = att_BHSS.masked_fill(mask_SS.slice(0, 0, S).slice(1, 0, S),
                                  -std::numeric_limits<float>::infinity());
  att_BHSS = attn_drop(torch::softmax(att_BHSS, -1));
  torch::Tensor y_BSD = torch::matmul(att_BHSS, v).transpose(1, 2).reshape({B, S, D});
  return resid_drop(proj(y_BSD));
}

torch::Tensor CausalSelfAttentionImpl::forward_cached(const torch::Tensor& x_BSD, KVCache& c) {
  const int64_t B = x_BSD.size(0), S = x_BSD.size(1), D = x_BSD.size(2);
  const int64_t Dh = D / n_heads, max_len = mask_SS.size(0);
  TORCH_CHECK(c.len + S <= max_len, "KV cache overflow: ", c.len + S, " > ", max_len);
  auto qkv_parts = qkv(x_BSD).view({B, S, 3, n_heads, Dh}).permute({2, 0, 3, 1, 4}).unbind(0);
  if (!c.k_BHTD.defined()) {
    c.k_BHTD = torch::empty({B, n_heads, max_len, Dh}, x_BSD.options());
    c.v_BHTD = torch::empty({B, n_heads, max_len, Dh}, x_BSD.options());
  }
  c.k_BHTD.narrow(2, c.len, S).copy_(qkv_parts[1]);
  c.v_BHTD.narrow(2, c.len, S).copy_(qkv_parts[2]);
  const int64_t T = c.len + S;
  torch::Tensor k = c.k_BHTD.narrow(2, 0, T), v = c.v_BHTD.narrow(2, 0, T);
  torch::Tensor att_BHST = torch::matmul(qkv_parts[0], k.transpose(-2, -1)) * (1.0 / std::sqrt(Dh));
  att_BHST = att_BHST.masked_fill(mask_SS.slice(0, c.len, T).slice(1, 0, T),
                                  -std::numeric_limits<float>::infinity());
  torch::Tensor y_BSD =
      torch::matmul(torch::softmax(att_BHST, -1), v).transpose(1, 2).reshape({B, S, D});
  c.len = T;
  return proj(y_BSD);
}

}  // namespace sw
