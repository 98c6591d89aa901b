#include "model/attention.h"

#include <cmath>
#include <limits>

namespace sw {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Causal attention of every head at once, from the fused projection [B, S, 3D] to the heads'
// outputs [B, S, D], with a hand-written backward. Autograd through the composed ops would
// keep a scaled and a masked copy of the scores and, going back, make a pass for each plus a
// gather of q, k and v's gradients from three permuted views; here the scale and the mask
// ride in one baddbmm (bias + scale * q k^T), and the gradients are written straight into
// one [3, B*H, S, Dh] buffer.
struct CausalAttentionFunction : torch::autograd::Function<CausalAttentionFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& qkv_BSE,
                               const torch::Tensor& bias_SS, int64_t n_heads) {
    const int64_t B = qkv_BSE.size(0), S = qkv_BSE.size(1), D = qkv_BSE.size(2) / 3;
    const int64_t H = n_heads, Dh = D / H;
    const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
    // [3, B*H, S, Dh]: one copy puts each head's rows of q, k and v together.
    torch::Tensor qkv_3NSd = qkv_BSE.view({B, S, 3, H, Dh})
                                 .permute({2, 0, 3, 1, 4})
                                 .contiguous()
                                 .view({3, B * H, S, Dh});
    const torch::Tensor q = qkv_3NSd[0], k = qkv_3NSd[1], v = qkv_3NSd[2];
    torch::Tensor p_NSS = torch::softmax(
        torch::baddbmm(bias_SS, q, k.transpose(1, 2), /*beta=*/1.0, /*alpha=*/scale), -1);
    torch::Tensor y_NSd = torch::bmm(p_NSS, v);
    ctx->save_for_backward({qkv_3NSd, p_NSS});
    ctx->saved_data["n_heads"] = n_heads;
    return y_NSd.view({B, H, S, Dh}).permute({0, 2, 1, 3}).reshape({B, S, D});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &qkv_3NSd = saved[0], &p_NSS = saved[1];
    const int64_t H = ctx->saved_data["n_heads"].toInt();
    const int64_t N = qkv_3NSd.size(1), S = qkv_3NSd.size(2), Dh = qkv_3NSd.size(3);
    const int64_t B = N / H, D = H * Dh;
    const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
    const torch::Tensor q = qkv_3NSd[0], k = qkv_3NSd[1], v = qkv_3NSd[2];

    torch::Tensor gy_NSd = grads[0].view({B, S, H, Dh}).permute({0, 2, 1, 3}).reshape({N, S, Dh});
    torch::Tensor g_3NSd = torch::empty_like(qkv_3NSd);
    torch::Tensor gq = g_3NSd[0], gk = g_3NSd[1], gv = g_3NSd[2];
    torch::bmm_out(gv, p_NSS.transpose(1, 2), gy_NSd);
    // d scores = p * (dp - rowsum(dp * p)), then the scale; masked entries have p = 0.
    torch::Tensor gs_NSS = torch::_softmax_backward_data(torch::bmm(gy_NSd, v.transpose(1, 2)),
                                                         p_NSS, -1, p_NSS.scalar_type());
    gs_NSS.mul_(scale);
    torch::bmm_out(gq, gs_NSS, k);
    torch::bmm_out(gk, gs_NSS.transpose(1, 2), q);
    torch::Tensor g_BSE =
        g_3NSd.view({3, B, H, S, Dh}).permute({1, 3, 0, 2, 4}).reshape({B, S, 3 * D});
    return {g_BSE, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

CausalSelfAttentionImpl::CausalSelfAttentionImpl(int64_t d_model, int64_t n_heads_, int64_t max_len,
                                                 double dropout)
    : n_heads(n_heads_) {
  qkv = register_module("qkv", torch::nn::Linear(d_model, 3 * d_model));
  proj = register_module("proj", torch::nn::Linear(d_model, d_model));
  attn_drop = register_module("attn_drop", torch::nn::Dropout(dropout));
  resid_drop = register_module("resid_drop", torch::nn::Dropout(dropout));
  // Not a buffer: it is derived from the shape, so it stays out of the state dict.
  mask_SS = torch::ones({max_len, max_len}, torch::kBool).triu(/*diagonal=*/1);
  bias_SS = torch::zeros({max_len, max_len})
                .masked_fill(mask_SS, -std::numeric_limits<float>::infinity());
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x_BSD) {
  if (!(is_training() && attn_drop->options.p() > 0)) {
    const int64_t S = x_BSD.size(1);
    torch::Tensor bias = bias_SS.slice(0, 0, S).slice(1, 0, S).to(x_BSD.scalar_type());
    return resid_drop(proj(CausalAttentionFunction::apply(qkv(x_BSD), bias, n_heads)));
  }
  return forward_composed(x_BSD);
}

torch::Tensor CausalSelfAttentionImpl::forward_composed(const torch::Tensor& x_BSD) {
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
