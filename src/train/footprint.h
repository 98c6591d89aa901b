// Memory before allocation: what one rank of a training run needs (parameters, gradients,
// AdamW moments, one step's activations, evaluation, the corpus), estimated from the
// config alone, and what this process may use (its cgroup's limit, else MemAvailable).
// switch-train refuses a run that cannot fit before it allocates or creates anything.
#pragma once

#include <cstdint>
#include <string>

#include "config/config.h"

namespace sw {

// Parameters of the whole model for a vocabulary of `vocab` characters (the count
// Transformer::n_params() gives once built), and those of its experts alone.
struct ParamCount {
  double total = 0;
  double experts = 0;
};
ParamCount count_params(const Config& c, int64_t vocab);

// Bytes one rank needs, by part. Every figure is an estimate that errs on the high side.
struct MemoryEstimate {
  double params = 0;       // fp32 weights this rank keeps (its expert slice and the rest)
  double grads = 0;        // their gradients
  double moments = 0;      // AdamW's two moments
  double build = 0;        // the whole model, built on every rank before slicing
  double activations = 0;  // one training step's forward and backward, every micro-batch
  double eval = 0;         // one evaluation batch (never alive with the activations)
  double data = 0;         // the corpus in memory and the fixed evaluation batches
  double runtime = 0;      // the process itself (LibTorch, threads)
  double total() const;
  std::string describe() const;  // "1.2 GiB (parameters 10 MiB, ...)"
};
// `world` ranks in all; `corpus_chars` characters of training text.
MemoryEstimate estimate_memory(const Config& c, int64_t vocab, int64_t world, int64_t corpus_chars);

// What this process may allocate: the tightest of its cgroup's limits (v2 memory.max or
// v1 memory.limit_in_bytes, less what the group uses, for its group and each above it)
// and /proc/meminfo's MemAvailable. `root` prefixes /proc and /sys (tests).
struct MemoryLimit {
  double bytes = 0;    // < 0: unknown
  std::string source;  // "MemAvailable", "cgroup memory.max", ...
};
MemoryLimit memory_limit(const std::string& root = "");

// "1.5 GiB", "320 MiB", "2.0 TiB".
std::string human_bytes(double bytes);

// Throws sw::ConfigError (exit 2) naming the estimate, the limit and the keys that drive it
// when `ranks_here` ranks of this estimate cannot fit in `limit`.
void check_fits(const Config& c, const MemoryEstimate& need, int64_t ranks_here,
                const MemoryLimit& limit);

}  // namespace sw
