// Training on several ranks. Every rank takes its share of each global batch (data
// parallelism); with expert parallelism it also holds only its slice of every MoE layer's
// experts. Replicated parameters stay identical on every rank because their gradients are
// averaged before the (deterministic) update; expert gradients stay on their owner.
// Checkpoints always hold whole layers, so a run written by W ranks resumes on any number.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include <torch/torch.h>

#include "distributed/comm.h"
#include "model/transformer.h"
#include "train/lanes.h"

namespace sw {

struct Ranks {
  std::shared_ptr<Comm> comm;    // null: a single process
  int64_t rank = 0, world = 1;   // this rank, number of ranks
  bool expert_parallel = false;  // experts sharded over the ranks
  // dist.overlap: one lane per micro-batch, on which they run at once; null: the
  // micro-batches of an expert-parallel step run one after another.
  std::shared_ptr<Lanes> lanes;
  bool root() const { return rank == 0; }
  // This rank's rows [rank*n/W, (rank+1)*n/W) of a global batch of n rows.
  torch::Tensor share(const torch::Tensor& rows) const;
};

// The parameters by how their gradients combine across ranks.
struct ParamSplit {
  std::vector<torch::Tensor> replicated;  // the same on every rank: gradients averaged
  std::vector<torch::Tensor> sharded;     // this rank's experts: gradients stay local
};
ParamSplit split_parameters(Transformer& model, bool expert_parallel);

// Keeps this rank's slice of every MoE layer's experts and narrows their optimizer state
// (if any, e.g. just loaded from a checkpoint) the same way.
void shard_experts(Transformer& model, torch::optim::Optimizer& opt,
                   const std::shared_ptr<Comm>& comm);

// After the backward passes, the gradients combined over the ranks: replicated gradients
// become the mean over ranks, sharded gradients are divided by W (the loss is the mean of W
// ranks' losses, and each of them reaches this rank's experts), and `values` become their
// sums over ranks. The replicated gradients and `values` are summed by an all-reduce that
// the constructor starts, so that it runs while the caller completes the sharded gradients
// (ExpertsImpl::flush_weight_grads); finish() then sums their squared norm (a second,
// one-number all-reduce, only with experts sharded) and waits. Collective.
class GradientSum {
 public:
  GradientSum(Comm& comm, const ParamSplit& params, const std::vector<double>& values);
  GradientSum(const GradientSum&) = delete;
  GradientSum& operator=(const GradientSum&) = delete;
  // Writes the combined gradients and `values`; returns the squared global gradient norm
  // (the same on every rank).
  double finish(std::vector<double>& values);

 private:
  Comm& comm_;
  const ParamSplit& params_;
  torch::Tensor buf_;  // the replicated gradients, then the values
  std::optional<PendingSum> sum_;
};

// Runs `f` with each sharded expert parameter and its AdamW moments replaced by the whole
// [E, ...] tensor gathered from all ranks, then restores this rank's slice (collective).
void with_full_experts(Comm& comm, Transformer& model, torch::optim::Optimizer& opt,
                       const std::function<void()>& f);

// Every rank's CPU generator state, stacked [W, S] as uint8 (collective).
torch::Tensor gather_rng_states(Comm& comm);

}  // namespace sw
