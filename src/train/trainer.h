// The training loop: data, model, AdamW with warmup + cosine, gradient clipping, periodic
// evaluation on fixed batches, metrics.jsonl, atomic checkpoints, resume and summary.json.
// The loop is train() in trainer.cpp; one step is train/step.h, the records
// train/progress.h, the run directory train/run_dir.h.
#pragma once

#include <atomic>
#include <string>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "train/run_dir.h"

namespace sw {

struct TrainOptions {
  std::string out_dir;          // the run directory
  bool resume = false;          // continue from the run's newest complete checkpoint
  bool config_changed = false;  // resume with overrides: rewrite the run's config.json
  bool quiet = false;           // no progress output
  bool checkpoints = true;      // false: write no checkpoint (benchmarks)
  std::string init_from;        // a dense run to upcycle from (train/upcycle.h); new runs only
  // When it becomes non-zero (a signal number), training stops after the current step,
  // writes a checkpoint and throws Interrupted.
  const std::atomic<int>* stop = nullptr;
};

// Thrown by train() when opt.stop was raised; the checkpoint of `step` is on disk.
struct Interrupted {
  int signal;
  int64_t step;
  std::string checkpoint_dir;
};

// Trains and returns the summary (also written to <out_dir>/summary.json). For a resumed
// run `cfg` must be the run's own config (see resume_config). When WORLD_SIZE is set this
// process is one rank of a run (RANK, MASTER_ADDR, MASTER_PORT; LOCAL_WORLD_SIZE shares the
// cores): rank 0 prints, writes metrics, checkpoints and the summary.
nlohmann::ordered_json train(const Config& cfg, const TrainOptions& opt);

// Sets LibTorch's intra-op thread count (0: all cores shared by `local_ranks` processes)
// and returns the count in use.
int64_t configure_threads(int64_t requested, int64_t local_ranks = 1);

}  // namespace sw
