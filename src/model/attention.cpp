#include "model/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/blas.h"
#include "model/random.h"
#include "util/parallel.h"

namespace sw {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Where head n = b * H + h starts in the fused projection [B, S, 3D] (its q; k is D further,
// v 2D, every row 3D long) and in the heads' output [B, S, D] (rows D long).
struct HeadLayout {
  int64_t B, S, D, H, Dh;
  HeadLayout(const torch::Tensor& qkv_BSE, int64_t n_heads)
      : B(qkv_BSE.size(0)), S(qkv_BSE.size(1)), D(qkv_BSE.size(2) / 3), H(n_heads), Dh(D / H) {}
  int64_t heads() const { return B * H; }
  int64_t qkv_row() const { return 3 * D; }
  int64_t qkv(int64_t n) const { return (n / H) * S * qkv_row() + (n % H) * Dh; }
  int64_t out(int64_t n) const { return (n / H) * S * D + (n % H) * Dh; }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(Dh)); }
};

// Runs fn(n) for every head, the heads shared out across the threads.
template <typename Fn>
void for_each_head(int64_t heads, const Fn& fn) {
  sw::parallel_for(0, heads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n)
      fn(n);
  });
}

// Causal attention of every head at once, from the fused projection [B, S, 3D] to the heads'
// outputs [B, S, D], with a hand-written backward. Each head's q, k and v are strided views
// of the projection (row stride 3D), so the small per-head products run on them in place
// through the BLAS: no permuted copy of q/k/v or of their gradients in either direction, no
// LibTorch call per head. The scale and the causal mask ride in the scores' product (bias +
// scale * q k^T); only the softmax and its backward run as LibTorch ops over all heads.
struct CausalAttentionFunction : torch::autograd::Function<CausalAttentionFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& qkv_BSE,
                               const torch::Tensor& bias_SS, int64_t n_heads) {
    const torch::Tensor qkv = qkv_BSE.contiguous();
    const torch::Tensor bias = bias_SS.to(qkv.scalar_type()).contiguous();
    const HeadLayout L(qkv, n_heads);
    const int64_t S = L.S, E = L.qkv_row();
    TORCH_CHECK(bias.size(0) == S && bias.size(1) == S, "attention bias must be [S, S]");
    torch::Tensor scores_NSS = torch::empty({L.heads(), S, S}, qkv.options());
    torch::Tensor y_BSD = torch::empty({L.B, S, L.D}, qkv.options());
    torch::Tensor p_NSS;
    AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "causal_attention_forward", [&] {
      const auto scale = static_cast<scalar_t>(L.scale());
      const scalar_t* base = qkv.data_ptr<scalar_t>();
      const scalar_t* bias_p = bias.data_ptr<scalar_t>();
      scalar_t* scores = scores_NSS.data_ptr<scalar_t>();
      for_each_head(L.heads(), [&](int64_t n) {  // scores = bias + scale * q k^T
        const scalar_t* q = base + L.qkv(n);
        scalar_t* s = scores + n * S * S;
        std::copy(bias_p, bias_p + S * S, s);
        gemm_rm<scalar_t>(false, true, S, S, L.Dh, scale, q, E, q + L.D, E, 1, s, S);
      });
      p_NSS = torch::softmax(scores_NSS, -1);
      const scalar_t* p = p_NSS.data_ptr<scalar_t>();
      scalar_t* y = y_BSD.data_ptr<scalar_t>();
      for_each_head(L.heads(), [&](int64_t n) {  // y = p v
        gemm_rm<scalar_t>(false, false, S, L.Dh, S, 1, p + n * S * S, S, base + L.qkv(n) + 2 * L.D,
                          E, 0, y + L.out(n), L.D);
      });
    });
    ctx->save_for_backward({qkv, p_NSS});
    ctx->saved_data["n_heads"] = n_heads;
    return y_BSD;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &qkv = saved[0], &p_NSS = saved[1];
    const HeadLayout L(qkv, ctx->saved_data["n_heads"].toInt());
    const int64_t S = L.S, E = L.qkv_row();
    const torch::Tensor gy_BSD = grads[0].contiguous();
    torch::Tensor g_BSE = torch::empty_like(qkv);
    torch::Tensor gp_NSS = torch::empty_like(p_NSS);
    AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "causal_attention_backward", [&] {
      const auto scale = static_cast<scalar_t>(L.scale());
      const scalar_t* base = qkv.data_ptr<scalar_t>();
      const scalar_t* gy = gy_BSD.data_ptr<scalar_t>();
      const scalar_t* p = p_NSS.data_ptr<scalar_t>();
      scalar_t* g = g_BSE.data_ptr<scalar_t>();
      scalar_t* gp = gp_NSS.data_ptr<scalar_t>();
      for_each_head(L.heads(), [&](int64_t n) {  // dv = p^T dy, dp = dy v^T
        const int64_t off = L.qkv(n);
        const scalar_t* gy_n = gy + L.out(n);
        gemm_rm<scalar_t>(true, false, S, L.Dh, S, 1, p + n * S * S, S, gy_n, L.D, 0,
                          g + off + 2 * L.D, E);
        gemm_rm<scalar_t>(false, true, S, S, L.Dh, 1, gy_n, L.D, base + off + 2 * L.D, E, 0,
                          gp + n * S * S, S);
      });
      // d scores = p * (dp - rowsum(dp * p)); masked entries have p = 0. The scale goes
      // into the two products below.
      const torch::Tensor gs_NSS =
          torch::_softmax_backward_data(gp_NSS, p_NSS, -1, p_NSS.scalar_type());
      const scalar_t* gs = gs_NSS.data_ptr<scalar_t>();
      for_each_head(L.heads(), [&](int64_t n) {  // dq = scale * ds k, dk = scale * ds^T q
        const int64_t off = L.qkv(n);
        const scalar_t* gs_n = gs + n * S * S;
        gemm_rm<scalar_t>(false, false, S, L.Dh, S, scale, gs_n, S, base + off + L.D, E, 0, g + off,
                          E);
        gemm_rm<scalar_t>(true, false, S, L.Dh, S, scale, gs_n, S, base + off, E, 0, g + off + L.D,
                          E);
      });
    });
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
    torch::Tensor bias = bias_SS.slice(0, 0, S).slice(1, 0, S);
    return apply_dropout(resid_drop,
                         proj(CausalAttentionFunction::apply(qkv(x_BSD), bias, n_heads)));
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
  att_BHSS = apply_dropout(attn_drop, torch::softmax(att_BHSS, -1));
  torch::Tensor y_BSD = torch::matmul(att_BHSS, v).transpose(1, 2).reshape({B, S, D});
  return apply_dropout(resid_drop, proj(y_BSD));
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
