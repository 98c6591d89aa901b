// One optimizer step: the forward and backward passes over this rank's share of a batch
// (whole, or as train.micro_batches routing groups at once on the threads), the gradients
// and the step's values combined over the ranks, the non-finite check
// (train.on_nonfinite) and the AdamW update with clipping folded in.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/dataset.h"
#include "distributed/comm.h"
#include "model/transformer.h"
#include "train/fused_adamw.h"
#include "train/ranks.h"
#include "util/rng.h"

namespace sw {

// The training objective: cross-entropy plus the weighted balancing term (moe.balance) and
// router z-loss; the one definition, for tensors in the forward pass and for the values in
// records.
template <typename T>
T training_loss(const MoeConfig& m, const T& ce, const T& balance, const T& z) {
  return ce + m.alpha * balance + m.z_loss * z;
}

// What one step did, for the train records.
struct StepResult {
  double lr = 0;
  double ce = 0, lb = 0, z = 0, loss = 0;  // means over the ranks (lb: the Switch loss)
  double balance = 0;                      // the balancing term (aux_loss: lb)
  double grad_norm = 0;                    // global, before clipping
  bool applied = true;                     // false: not finite, skipped (train.on_nonfinite)
  bool stop_requested = false;             // on any rank (a signal received)
  double forward_s = 0, backward_s = 0, optimizer_s = 0, step_s = 0;
  CommStats comm;                          // this rank's collectives during the step
  std::vector<std::vector<MoeStats>> moe;  // each routing group's statistics
};

// Decides what a non-finite step does: under train.on_nonfinite = stop, and after
// kMaxConsecutiveSkips skips in a row under skip, it throws sw::Error naming the step, where
// the non-finite values first appear and the checkpoint that is kept.
class NonfiniteGuard {
 public:
  static constexpr int64_t kMaxConsecutiveSkips = 10;
  NonfiniteGuard(OnNonfinite policy, std::string run_dir,
                 std::function<void(const std::string&)> say);
  // `what` describes the step; returns when it may be skipped.
  void skip_or_throw(const std::string& what);
  void passed() { consecutive_ = 0; }

 private:
  OnNonfinite policy_;
  std::string run_dir_;
  std::function<void(const std::string&)> say_;
  int64_t consecutive_ = 0;
};

// What a step works on.
struct StepContext {
  const Config& cfg;
  const Ranks& ranks;
  Transformer& model;
  FusedAdamW& optimizer;
  const ParamSplit& params;
  const Dataset& data;
  Rng& data_rng;  // the global batch stream, the same on every rank
  NonfiniteGuard& nonfinite;
  const std::atomic<int>* stop;  // this process's stop request (a signal number), or null
};

// Makes the grouped experts of a model about to be trained hold back their weight gradients
// of few-row segments for one product per expert per step (ExpertsImpl::defer_weight_grads);
// train_step adds them to .grad after the backward passes.
void defer_expert_weight_grads(Transformer& model);

// Trains 0-based step `step` on the next batch of the stream.
StepResult train_step(StepContext& c, int64_t step);

}  // namespace sw
