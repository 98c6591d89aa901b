#include "bench/bench.h"

#include <stdlib.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>
#include <torch/torch.h>

#include "bench/memory.h"
#include "model/attention.h"
#include "model/ffn.h"
#include "model/switch_ffn.h"
#include "train/metrics.h"
#include "train/trainer.h"
#include "util/error.h"

namespace sw {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

namespace {

int64_t grad_bytes(torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters())
    n += p.numel() * static_cast<int64_t>(p.element_size());
  return n;
}

}  // namespace

namespace {

// One layer ready to run forward + backward on its own input.
struct LayerRunner {
  explicit LayerRunner(const LayerCase& c_) : c(c_) {
    if (!c.strategy) {
      dense = DenseFFN(c.d_model, c.d_ff * c.top_k, Activation::Gelu);
      module = dense.get();
    } else {
      MoeConfig moe;
      moe.n_experts = c.experts;
      moe.top_k = c.top_k;
      moe.capacity_factor = c.capacity_factor;
      moe.drop_tokens = c.drop_tokens;
      moe.strategy = *c.strategy;
      moe_layer = SwitchFFN(c.d_model, c.d_ff, moe, Activation::Gelu);
      module = moe_layer.get();
    }
    x = torch::randn({c.tokens, c.d_model}).requires_grad_(true);
    grad_y = torch::randn({c.tokens, c.d_model});
  }

  void zero_grads() {
    module->zero_grad(/*set_to_none=*/true);  // as in training
    x.mutable_grad() = torch::Tensor();
  }

  void step() {
    zero_grads();
    torch::Tensor y;
    if (dense) {
      y = dense->forward(x);
    } else {
      SwitchFFNOutput out = moe_layer->forward(x);
      y = out.y;
      dropped += out.stats.dropped;
    }
    y.backward(grad_y);
  }

  LayerCase c;
  DenseFFN dense{nullptr};
  SwitchFFN moe_layer{nullptr};
  torch::nn::Module* module = nullptr;
  torch::Tensor x, grad_y;
  int64_t dropped = 0;
};

}  // namespace

std::vector<LayerResult> bench_layers(const std::vector<LayerCase>& cases, int reps, int warmup,
                                      uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<LayerRunner> runners;
  for (const auto& c : cases)
    runners.emplace_back(c);
  std::vector<LayerResult> results(cases.size());
  for (size_t i = 0; i < runners.size(); ++i) {
    LayerRunner& r = runners[i];
    for (int w = 0; w < warmup; ++w)
      r.step();
    // Memory of one step: everything allocated from the start of forward to the end of
    // backward, the parameters' new gradients included.
    r.zero_grads();
    MemoryTracker::reset_peak();
    const int64_t before = MemoryTracker::current_bytes();
    r.step();
    results[i].c = r.c;
    results[i].peak_bytes = MemoryTracker::peak_bytes() - before;
    results[i].param_grad_bytes = grad_bytes(*r.module);
    r.dropped = 0;
  }
  // Round robin, so that a slow moment of a shared machine hits every case alike.
  std::vector<std::vector<double>> ms(runners.size());
  for (int rep = 0; rep < reps; ++rep) {
    for (size_t i = 0; i < runners.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      runners[i].step();
      ms[i].push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  for (size_t i = 0; i < runners.size(); ++i) {
    results[i].median_ms = median(ms[i]);
    results[i].min_ms = *std::min_element(ms[i].begin(), ms[i].end());
    results[i].dropped_frac =
        static_cast<double>(runners[i].dropped) /
        static_cast<double>(static_cast<int64_t>(reps) * cases[i].tokens * cases[i].top_k);
  }
  return results;
}

AttentionResult bench_attention(int64_t tokens, int64_t seq_len, int64_t d_model, int64_t n_heads,
                                int reps, int warmup, uint64_t seed) {
  torch::manual_seed(seed);
  CausalSelfAttention attn(d_model, n_heads, seq_len, /*dropout=*/0.0);
  const int64_t B = std::max<int64_t>(1, tokens / seq_len);
  torch::Tensor x = torch::randn({B, seq_len, d_model}).requires_grad_(true);
  torch::Tensor grad_y = torch::randn({B, seq_len, d_model});
  auto step = [&](bool fused) {
    attn->zero_grad(/*set_to_none=*/true);
    x.mutable_grad() = torch::Tensor();
    (fused ? attn->forward(x) : attn->forward_composed(x)).backward(grad_y);
  };
  for (int w = 0; w < warmup; ++w) {
    step(true);
    step(false);
  }
  std::vector<double> fused_ms, composed_ms;
  for (int rep = 0; rep < reps; ++rep) {
    for (bool fused : {true, false}) {
      const auto t0 = std::chrono::steady_clock::now();
      step(fused);
      (fused ? fused_ms : composed_ms)
          .push_back(
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                  .count());
    }
  }
  AttentionResult r;
  r.tokens = B * seq_len;
  r.seq_len = seq_len;
  r.d_model = d_model;
  r.n_heads = n_heads;
  r.fused_ms = median(fused_ms);
  r.composed_ms = median(composed_ms);
  return r;
}

namespace {

// A directory made for this process alone (mkdtemp), removed with what is in it when the
// object goes: nothing of the user's is ever in it.
struct TempDir {
  std::string path;
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl =
        std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/switch-bench-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr)
      throw Error(
          fmt::format("cannot create a temporary directory '{}': {}", tmpl, std::strerror(errno)));
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

}  // namespace

double triad_bandwidth(int reps, int64_t n) {
  const torch::Tensor a = torch::empty({n}), b = torch::rand({n}), c = torch::rand({n});
  float* pa = a.data_ptr<float>();
  const float *pb = b.data_ptr<float>(), *pc = c.data_ptr<float>();
  a.zero_();  // first touch before the timing
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        pa[i] = pb[i] + 3.0f * pc[i];
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 3.0 * 4.0 * static_cast<double>(n) / s);
  }
  return best;
}

StepBytes step_floor_bytes(int64_t params, int64_t micro_batches) {
  const double p = 4.0 * static_cast<double>(params), m = static_cast<double>(micro_batches);
  return {m * p, m * p + p, 7 * p};
}

double layer_floor_bytes(const LayerCase& c) {
  const int64_t F = c.strategy ? c.d_ff : c.d_ff * c.top_k;  // dense: width d_ff * top_k
  const int64_t n = c.strategy ? c.experts : 1;
  const int64_t used = std::min(n, c.tokens * c.top_k);  // experts that can receive rows
  return 4.0 * static_cast<double>((2 * used + n) * (2 * c.d_model * F + F + c.d_model));
}

TrainResult bench_train(const Config& cfg) {
  const TempDir tmp;
  const std::string scratch_dir = tmp.path + "/run";
  TrainOptions opt;
  opt.out_dir = scratch_dir;
  opt.quiet = true;
  opt.checkpoints = false;
  Config c = cfg;
  c.train.log_every = 1;  // one train record per step: per-step times for the median
  nlohmann::ordered_json s = train(c, opt);
  std::vector<double> ms, fwd, bwd, opt_ms;
  const double tokens = static_cast<double>(c.train.batch_size * c.model.seq_len);
  for (const auto& rec : read_metrics(scratch_dir + "/metrics.jsonl")) {
    if (rec["kind"] != "train") continue;
    ms.push_back(1000.0 * tokens / rec["tokens_per_s"].get<double>());
    fwd.push_back(rec["ms_forward"].get<double>());
    bwd.push_back(rec["ms_backward"].get<double>());
    opt_ms.push_back(rec["ms_optimizer"].get<double>());
  }
  TrainResult r;
  r.median_ms = median(ms);
  r.median_forward_ms = median(fwd);
  r.median_backward_ms = median(bwd);
  r.median_optimizer_ms = median(opt_ms);
  r.experts = cfg.n_moe_layers() > 0 ? cfg.moe.n_experts : 0;
  r.steps = cfg.train.steps;
  r.tokens_per_s = s["tokens_per_s"].get<double>();
  r.ms_per_step =
      1000.0 * static_cast<double>(cfg.train.batch_size * cfg.model.seq_len) / r.tokens_per_s;
  r.params_total = s["params_total"].get<int64_t>();
  r.params_active = s["params_active"].get<int64_t>();
  r.micro_batches = cfg.train.micro_batches;
  return r;
}

std::string layer_name(const LayerCase& c) {
  return c.strategy ? name_of(*c.strategy) : "dense";
}

nlohmann::ordered_json to_json(const LayerResult& r, double bandwidth) {
  return {{"kind", "layer"},
          {"strategy", layer_name(r.c)},
          {"experts", r.c.experts},
          {"tokens", r.c.tokens},
          {"d_model", r.c.d_model},
          {"d_ff", r.c.d_ff},
          {"top_k", r.c.top_k},
          {"drop_tokens", r.c.drop_tokens},
          {"capacity_factor", r.c.capacity_factor},
          {"median_ms", r.median_ms},
          {"min_ms", r.min_ms},
          {"peak_bytes", r.peak_bytes},
          {"param_grad_bytes", r.param_grad_bytes},
          {"dropped_frac", r.dropped_frac},
          {"floor_ms", 1000.0 * layer_floor_bytes(r.c) / bandwidth}};
}

nlohmann::ordered_json to_json(const AttentionResult& r) {
  return {{"kind", "attention"},
          {"tokens", r.tokens},
          {"seq_len", r.seq_len},
          {"d_model", r.d_model},
          {"n_heads", r.n_heads},
          {"fused_median_ms", r.fused_ms},
          {"composed_median_ms", r.composed_ms}};
}

nlohmann::ordered_json to_json(const TrainResult& r, const Config& cfg, double bandwidth) {
  const StepBytes floor = step_floor_bytes(r.params_total, r.micro_batches);
  return {{"kind", "train_step"},
          {"strategy", name_of(cfg.moe.strategy)},
          {"experts", r.experts},
          {"tokens", cfg.train.batch_size * cfg.model.seq_len},
          {"d_model", cfg.model.d_model},
          {"d_ff", cfg.model.d_ff},
          {"top_k", cfg.moe.top_k},
          {"median_ms", r.median_ms},
          {"mean_ms", r.ms_per_step},
          {"median_forward_ms", r.median_forward_ms},
          {"median_backward_ms", r.median_backward_ms},
          {"median_optimizer_ms", r.median_optimizer_ms},
          {"tokens_per_s", r.tokens_per_s},
          {"steps", r.steps},
          {"params_total", r.params_total},
          {"params_active", r.params_active},
          {"micro_batches", r.micro_batches},
          {"floor_forward_ms", 1000.0 * floor.forward / bandwidth},
          {"floor_backward_ms", 1000.0 * floor.backward / bandwidth},
          {"floor_optimizer_ms", 1000.0 * floor.optimizer / bandwidth}};
}

}  // namespace sw
