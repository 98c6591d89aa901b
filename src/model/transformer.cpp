#include "model/transformer.h"

#include <cmath>

#include <fmt/format.h>

#include "model/random.h"

namespace sw {

BlockImpl::BlockImpl(const Config& c, bool moe) {
  const int64_t D = c.model.d_model;
  ln_attn = register_module("ln_attn", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  attn = register_module("attn",
                         CausalSelfAttention(D, c.model.n_heads, c.model.seq_len, c.model.dropout));
  ln_ffn = register_module("ln_ffn", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  const Activation act = c.model.activation;
  if (moe)
    switch_ = register_module("ffn", SwitchFFN(D, c.expert_width(), c.moe, act));
  else
    dense = register_module("ffn", DenseFFN(D, c.model.d_ff, act));
  ffn_drop = register_module("ffn_drop", torch::nn::Dropout(c.model.dropout));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x_BSD, int64_t index, const BlockPass& pass) {
  auto look = [&](const torch::Tensor& t, const std::string& stage, const std::string& module) {
    if (pass.hook)
      pass.hook(t, fmt::format("block {}: {} (blocks.{}.{})", index, stage, index, module));
  };
  torch::Tensor x =
      x_BSD + (pass.caches ? attn->forward_cached(ln_attn(x_BSD), (*pass.caches)[index])
                           : attn(ln_attn(x_BSD)));
  look(x, "attention", "attn");
  torch::Tensor h = ln_ffn(x);
  torch::Tensor y;
  if (switch_) {
    std::function<void(const torch::Tensor&)> on_logits;
    if (pass.hook)
      on_logits = [&](const torch::Tensor& l) { look(l, "router logits", "ffn.router"); };
    SwitchFFNOutput o = switch_->forward(h, on_logits);
    y = o.y;
    look(y, "experts' output", "ffn.experts");
    if (pass.moe) {
      o.stats.layer = index;
      pass.moe->push_back(std::move(o.stats));
    }
  } else {
    y = dense(h);
    look(y, "feed-forward output", "ffn");
  }
  return x + apply_dropout(ffn_drop, y);
}

TransformerImpl::TransformerImpl(const Config& c, int64_t vocab_size) : cfg(c) {
  const int64_t D = c.model.d_model;
  tok_emb = register_module("tok_emb", torch::nn::Embedding(vocab_size, D));
  if (c.model.pos_emb)
    pos_emb = register_module("pos_emb", torch::nn::Embedding(c.model.seq_len, D));
  emb_drop = register_module("emb_drop", torch::nn::Dropout(c.model.dropout));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.model.n_layers; ++i) {
    block_list.push_back(Block(c, c.is_moe_layer(i)));
    blocks->push_back(block_list.back());
  }
  ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  head = register_module("head", torch::nn::Linear(D, vocab_size));

  // GPT-2 style init: N(0, 0.02), biases zero, residual projections scaled by 1/sqrt(2L);
  // the MoE layers' router and experts as in the Switch paper: N(0, init_scale / fan_in).
  torch::NoGradGuard no_grad;
  const double init_scale = c.moe.init_scale;
  const double resid_std = 0.02 / std::sqrt(2.0 * static_cast<double>(c.model.n_layers));
  for (auto& item : named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor& p = item.value();
    auto ends_with = [&](const std::string& s) {
      return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    if (name.find("ln_") != std::string::npos) continue;  // LayerNorm keeps ones / zeros
    if (ends_with("bias") || ends_with("b_in") || ends_with("b_out")) {
      p.zero_();
    } else if (ends_with("experts.w_in") || ends_with("router.proj.weight")) {
      p.normal_(0.0, std::sqrt(init_scale / static_cast<double>(D)));
    } else if (ends_with("experts.w_out")) {
      p.normal_(0.0, std::sqrt(init_scale / static_cast<double>(c.expert_width())));
    } else if (ends_with("attn.proj.weight") || ends_with("fc_out.weight")) {
      p.normal_(0.0, resid_std);
    } else {
      p.normal_(0.0, 0.02);
    }
  }
}

torch::Tensor TransformerImpl::run(const torch::Tensor& idx_BS, int64_t start,
                                   const BlockPass& pass) {
  const int64_t S = idx_BS.size(1);
  torch::Tensor x = tok_emb(idx_BS);
  if (pos_emb) x = x + pos_emb(torch::arange(start, start + S, idx_BS.options()));
  if (pass.hook) pass.hook(x, "the embeddings (tok_emb, pos_emb)");
  x = apply_dropout(emb_drop, x);
  for (size_t i = 0; i < block_list.size(); ++i)
    x = block_list[i]->forward(x, static_cast<int64_t>(i), pass);
  torch::Tensor logits_BSV = head(ln_f(x));
  if (pass.hook) pass.hook(logits_BSV, "the output head (ln_f, head)");
  return logits_BSV;
}

ModelOutput TransformerImpl::forward(const torch::Tensor& idx_BS) {
  ModelOutput out;
  BlockPass pass;
  pass.moe = &out.moe;
  out.logits_BSV = run(idx_BS, 0, pass);
  return out;
}

torch::Tensor TransformerImpl::forward_cached(const torch::Tensor& idx_BS,
                                              std::vector<KVCache>& caches) {
  caches.resize(block_list.size());
  BlockPass pass;
  pass.caches = &caches;
  return run(idx_BS, caches[0].len, pass);
}

std::string TransformerImpl::first_nonfinite(const torch::Tensor& idx_BS) {
  torch::NoGradGuard no_grad;
  std::string first;
  BlockPass pass;
  pass.hook = [&](const torch::Tensor& t, const std::string& what) {
    if (first.empty() && !torch::isfinite(t).all().item<bool>()) first = what;
  };
  run(idx_BS, 0, pass);
  return first;
}

void TransformerImpl::configure_moe(const std::function<void(MoeConfig&)>& f) {
  f(cfg.moe);
  for (Block& b : block_list)
    if (b->switch_) f(b->switch_->cfg);
}

int64_t TransformerImpl::n_params() const {
  int64_t n = 0;
  for (const auto& p : parameters())
    n += p.numel();
  return n;
}

int64_t TransformerImpl::n_active_params() const {
  int64_t n = n_params();
  for (const auto& b : block_list) {
    if (!b->switch_) continue;
    const auto& ex = b->switch_->experts;
    const int64_t per_expert = ex->w_in.numel() / ex->n_experts + ex->b_in.numel() / ex->n_experts +
                               ex->w_out.numel() / ex->n_experts +
                               ex->b_out.numel() / ex->n_experts;
    n -= per_expert * (ex->n_experts - b->switch_->cfg.top_k);  // top-k experts per token
  }
  return n;
}

AuxLosses total_aux_losses(const std::vector<MoeStats>& stats) {
  AuxLosses a{torch::zeros({}, torch::kFloat32), torch::zeros({}, torch::kFloat32),
              torch::zeros({}, torch::kFloat32)};
  for (const auto& st : stats) {
    a.lb = a.lb + st.lb_loss;
    a.z = a.z + st.z_loss;
    a.balance = a.balance + st.balance_loss;
  }
  return a;
}

}  // namespace sw
