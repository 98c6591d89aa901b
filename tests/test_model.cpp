// The model around the MoE layer: the fused causal attention against the composed one, the
// transformer's shapes, statistics and parameter counts, and its one traversal of the
// blocks seen through forward, the cached forward and the non-finite probe.
#include <cmath>
#include <limits>

#include <doctest/doctest.h>

#include "helpers.h"
#include "model/attention.h"
#include "model/transformer.h"

namespace {

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

sw::Config small_config() {
  sw::Config c;
  c.model.d_model = 32;
  c.model.n_heads = 4;
  c.model.d_ff = 64;
  c.model.n_layers = 4;
  c.model.seq_len = 16;
  c.moe.n_experts = 4;
  return c;
}

}  // namespace

TEST_CASE("fused causal attention equals the composed one: outputs and every gradient") {
  // In double, so a wrong term in the hand-written backward cannot hide in rounding; at the
  // full context and a shorter one (the masks are slices); and causality: no output depends
  // on a later position.
  torch::manual_seed(3);
  sw::CausalSelfAttention attn(/*d_model=*/24, /*n_heads=*/3, /*max_len=*/10, /*dropout=*/0.0);
  attn->to(torch::kFloat64);
  for (int64_t S : {10, 7}) {
    CAPTURE(S);
    torch::Tensor x = torch::randn({2, S, 24}, torch::kFloat64).requires_grad_(true);
    torch::Tensor g = torch::randn({2, S, 24}, torch::kFloat64);
    auto run = [&](bool fused) {
      attn->zero_grad(/*set_to_none=*/true);
      x.mutable_grad() = torch::Tensor();
      torch::Tensor y = fused ? attn->forward(x) : attn->forward_composed(x);
      y.backward(g);
      std::vector<torch::Tensor> out = {y.detach(), x.grad().clone()};
      for (const auto& p : attn->parameters())
        out.push_back(p.grad().clone());
      return out;
    };
    const auto fused = run(true), composed = run(false);
    REQUIRE(fused.size() == composed.size());
    REQUIRE(fused.size() == 6);  // y, dx, qkv weight and bias, proj weight and bias
    for (size_t i = 0; i < fused.size(); ++i) {
      CAPTURE(i);
      CHECK(composed[i].abs().max().item<double>() > 1e-3);  // nothing vanishes trivially
      CHECK(max_abs_diff(fused[i], composed[i]) < 1e-12);
    }
    // Changing the last position leaves every earlier output unchanged.
    torch::NoGradGuard no_grad;
    torch::Tensor x2 = x.detach().clone();
    x2.select(1, S - 1).add_(1.0);
    torch::Tensor d = (attn->forward(x2) - attn->forward(x.detach())).abs().amax({0, 2});
    CHECK(d.slice(0, 0, S - 1).max().item<double>() == 0.0);
    CHECK(d[S - 1].item<double>() > 1e-3);
  }
}

TEST_CASE("transformer: logits shape, one stats entry per MoE layer, parameter counts") {
  sw::Config c = small_config();
  for (int64_t every : {0, 1, 2}) {
    CAPTURE(every);
    c.moe.every = every;
    sw::Transformer m(c, 11);
    sw::ModelOutput out = m->forward(torch::randint(0, 11, {3, 16}, torch::kInt64));
    CHECK(out.logits_BSV.sizes() == torch::IntArrayRef({3, 16, 11}));
    CHECK(static_cast<int64_t>(out.moe.size()) == c.n_moe_layers());
    for (const auto& s : out.moe) {
      CHECK(s.counts_E.sum().item<int64_t>() == 48);
      CHECK(s.layer % std::max<int64_t>(every, 1) == std::max<int64_t>(every, 1) - 1);
    }
    // Experts not chosen are inactive: each MoE layer has (E - 1) experts' worth fewer.
    const int64_t per_expert = 32 * 64 + 64 + 64 * 32 + 32;
    CHECK(m->n_params() - m->n_active_params() == c.n_moe_layers() * 3 * per_expert);
  }
  // Names follow the module tree.
  sw::Transformer m(c, 11);
  auto names = m->named_parameters();
  CHECK(names.contains("blocks.1.ffn.router.proj.weight"));
  CHECK(names.contains("blocks.1.ffn.experts.w_in"));
  CHECK(names.contains("tok_emb.weight"));
}

TEST_CASE("without position embedding the model has no pos_emb parameters") {
  sw::Config c;
  c.model.pos_emb = false;
  c.model.n_layers = 1;
  sw::Transformer m(c, 5);
  CHECK_FALSE(m->named_parameters().contains("pos_emb.weight"));
}

TEST_CASE("transformer: the cached forward and the probe see what forward computes") {
  sw::Config c = small_config();
  c.moe.every = 2;  // dense and MoE blocks both
  c.moe.drop_policy = sw::DropPolicy::Position;
  sw::Transformer m(c, 11);
  m->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor idx = torch::randint(0, 11, {2, 16}, torch::kInt64);
  const torch::Tensor full = m->forward(idx).logits_BSV;
  std::vector<sw::KVCache> caches;
  const torch::Tensor cached = m->forward_cached(idx, caches);
  CHECK(max_abs_diff(cached, full) < 1e-5);
  CHECK(caches.size() == 4);
  CHECK(m->first_nonfinite(idx).empty());
  // A NaN in one stage is named at that stage, whichever kind of block holds it.
  struct Case {
    std::string param, stage;
  };
  for (const Case& k : std::vector<Case>{
           {"blocks.1.ffn.router.proj.weight", "block 1: router logits (blocks.1.ffn.router)"},
           {"blocks.2.ffn.fc_out.bias", "block 2: feed-forward output (blocks.2.ffn)"},
           {"blocks.0.attn.proj.bias", "block 0: attention (blocks.0.attn)"},
           {"head.bias", "the output head (ln_f, head)"}}) {
    sw::Transformer broken(c, 11);
    broken->eval();
    broken->named_parameters()[k.param].fill_(std::numeric_limits<float>::quiet_NaN());
    CHECK(broken->first_nonfinite(idx) == k.stage);
  }
}

TEST_CASE("moe.d_expert: one expert of that width, top-1, is a dense FFN of that width") {
  sw::Config moe_cfg = small_config();
  moe_cfg.model.n_layers = 2;
  moe_cfg.moe.n_experts = 1;
  moe_cfg.moe.d_expert = 24;  // model.d_ff stays 64
  moe_cfg.moe.drop_tokens = false;
  sw::Config dense_cfg = moe_cfg;
  dense_cfg.moe.every = 0;
  dense_cfg.model.d_ff = 24;
  sw::Transformer moe(moe_cfg, 11), dense(dense_cfg, 11);
  CHECK(moe->named_parameters()["blocks.0.ffn.experts.w_in"].sizes() ==
        torch::IntArrayRef({1, 32, 24}));
  {
    torch::NoGradGuard no_grad;
    auto from = moe->named_parameters();
    for (auto& item : dense->named_parameters()) {
      const std::string& name = item.key();
      const size_t ffn = name.find(".ffn.");
      if (ffn == std::string::npos) {
        item.value().copy_(from[name]);
        continue;
      }
      const std::string block = name.substr(0, ffn + 5);  // "blocks.i.ffn."
      const std::string part = name.substr(ffn + 5);
      if (part == "fc_in.weight") item.value().copy_(from[block + "experts.w_in"][0].t());
      if (part == "fc_in.bias") item.value().copy_(from[block + "experts.b_in"][0]);
      if (part == "fc_out.weight") item.value().copy_(from[block + "experts.w_out"][0].t());
      if (part == "fc_out.bias") item.value().copy_(from[block + "experts.b_out"][0]);
    }
  }
  const torch::Tensor idx = torch::randint(0, 11, {2, 16}, torch::kInt64);
  const double d = max_abs_diff(moe->forward(idx).logits_BSV, dense->forward(idx).logits_BSV);
  MESSAGE("max |one expert of width 24 - dense FFN of width 24| logit difference: " << d);
  CHECK(d < 1e-5);
}

TEST_CASE("moe.init_scale: router and expert weights ~ N(0, init_scale / fan_in), the rest not") {
  sw::Config c = small_config();
  c.model.d_model = 128;
  c.model.d_ff = 256;
  c.moe.n_experts = 8;
  for (double scale : {1.0, 0.1}) {
    CAPTURE(scale);
    c.moe.init_scale = scale;
    torch::manual_seed(7);
    sw::Transformer m(c, 11);
    auto p = m->named_parameters();
    const double w_in = p["blocks.0.ffn.experts.w_in"].std().item<double>();
    const double w_out = p["blocks.0.ffn.experts.w_out"].std().item<double>();
    const double router = p["blocks.0.ffn.router.proj.weight"].std().item<double>();
    // 8 x 128 x 256 draws each for the experts, 8 x 128 for the router.
    CHECK(w_in == doctest::Approx(std::sqrt(scale / 128)).epsilon(0.01));
    CHECK(w_out == doctest::Approx(std::sqrt(scale / 256)).epsilon(0.01));
    CHECK(router == doctest::Approx(std::sqrt(scale / 128)).epsilon(0.05));
    CHECK(p["blocks.0.ffn.experts.b_in"].abs().max().item<double>() == 0);
    // The attention is not the MoE's: its init does not move with the key.
    CHECK(p["blocks.0.attn.qkv.weight"].std().item<double>() ==
          doctest::Approx(0.02).epsilon(0.02));
  }
}

TEST_CASE("model.dropout: random in training, off in evaluation") {
  sw::Config c = small_config();
  c.moe.drop_tokens = false;  // no random drop order: what varies is dropout's alone
  c.model.dropout = 0.5;
  torch::manual_seed(3);
  sw::Transformer with(c, 11);
  c.model.dropout = 0.0;
  torch::manual_seed(3);
  sw::Transformer without(c, 11);
  torch::NoGradGuard no_grad;
  const torch::Tensor idx = torch::randint(0, 11, {2, 16}, torch::kInt64);
  with->train();
  const torch::Tensor a = with->forward(idx).logits_BSV, b = with->forward(idx).logits_BSV;
  CHECK((a - b).abs().max().item<double>() > 1e-3);  // two draws of the masks
  with->eval();
  without->eval();
  // Evaluation uses every unit, unscaled: the same model as without dropout.
  CHECK(torch::equal(with->forward(idx).logits_BSV, without->forward(idx).logits_BSV));
  without->train();
  CHECK(torch::equal(without->forward(idx).logits_BSV, without->forward(idx).logits_BSV));
}
