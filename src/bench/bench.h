// switch-bench's measurements: forward + backward of one MoE layer per expert strategy
// against a dense FFN of the same active width, and full training steps of a model.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"

namespace sw {

// The median of v (the mean of the middle two for an even count); v non-empty.
double median(std::vector<double> v);

struct LayerCase {
  std::optional<Strategy> strategy;  // none: the dense FFN of the same active width
  int64_t experts = 1, tokens = 1024, d_model = 128, d_ff = 512, top_k = 1;
  bool drop_tokens = true;
  double capacity_factor = 1.25;
};

// "dense", or the strategy's name.
std::string layer_name(const LayerCase& c);

struct LayerResult {
  LayerCase c;
  double median_ms = 0, min_ms = 0;
  int64_t peak_bytes = 0;        // most bytes allocated at once during forward + backward
  int64_t param_grad_bytes = 0;  // the parameters' gradients among them (the weights' size)
  double dropped_frac = 0;
};

// Times `reps` forward + backward passes of each case after `warmup` untimed ones, the cases
// taking turns; medians reported. Memory is measured when the tracking allocator is
// installed (MemoryTracker::install).
std::vector<LayerResult> bench_layers(const std::vector<LayerCase>& cases, int reps, int warmup,
                                      uint64_t seed = 0);

struct AttentionResult {
  int64_t tokens = 0, seq_len = 0, d_model = 0, n_heads = 0;
  double fused_ms = 0, composed_ms = 0;  // medians of forward + backward
};

// One causal self-attention layer (projections included), forward + backward on
// tokens / seq_len sequences: the fused operation against the same attention composed from
// LibTorch ops under autograd, taking turns, medians of `reps` after `warmup`.
AttentionResult bench_attention(int64_t tokens, int64_t seq_len, int64_t d_model, int64_t n_heads,
                                int reps, int warmup, uint64_t seed = 0);

// The machine's memory bandwidth as the STREAM triad measures it (a = b + s c on float
// arrays far larger than the caches, every thread taking a share): bytes of the three arrays
// per second, the best of `reps` passes. STREAM's convention: the hardware also reads `a`
// before writing it (write-allocate), so it moves 4/3 of what is counted; the floors count
// the same way (a byte written counts once).
double triad_bandwidth(int reps = 10, int64_t floats_per_array = int64_t{1} << 24);

// The least a training step's phases must move through memory, in bytes, for `params`
// float32 parameters and `micro_batches` forward and backward passes: every weight read
// once per pass, every gradient written once, and AdamW reading and writing every
// parameter, gradient and both moments once (7 floats each). Activations and caches aside.
struct StepBytes {
  double forward = 0, backward = 0, optimizer = 0;
};
StepBytes step_floor_bytes(int64_t params, int64_t micro_batches);

// One MoE layer's forward + backward: the weights of the experts that can receive rows
// read twice, every expert's gradient written once (what a layer must move at least).
double layer_floor_bytes(const LayerCase& c);

struct TrainResult {
  int64_t experts = 0;
  int64_t steps = 0;
  double median_ms = 0;  // median step time, and of its phases:
  double median_forward_ms = 0, median_backward_ms = 0, median_optimizer_ms = 0;
  double ms_per_step = 0, tokens_per_s = 0;  // means over all steps
  int64_t params_total = 0, params_active = 0;
  int64_t micro_batches = 1;
};

// Trains `cfg` for its train.steps in a fresh temporary directory of its own (under $TMPDIR,
// else /tmp; no checkpoints; removed afterwards) and reports the median step time (from
// per-step metrics) and the mean throughput (from its summary).
TrainResult bench_train(const Config& cfg);

// `bandwidth` (bytes/s, triad_bandwidth) turns the floors' bytes into times.
nlohmann::ordered_json to_json(const LayerResult& r, double bandwidth);
nlohmann::ordered_json to_json(const AttentionResult& r);
nlohmann::ordered_json to_json(const TrainResult& r, const Config& cfg, double bandwidth);

}  // namespace sw
