// Evaluation: the mean cross-entropy of a model over fixed batches, the same batches at
// every evaluation of a run, without touching the training generators.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "data/dataset.h"
#include "model/transformer.h"
#include "train/ranks.h"

namespace sw {

// train.eval_batches batches of `split`, drawn from a generator seeded by train.seed ^ salt.
std::vector<Batch> fixed_batches(const Dataset& data, Split split, const TrainConfig& t,
                                 uint64_t salt);
// The salts of the run's evaluation sets: val_loss and train_loss in metrics.jsonl, and the
// test part's (switch-eval --split test).
constexpr uint64_t kValSalt = 0x76616cULL;
constexpr uint64_t kTrainSalt = 0x747261ULL;
constexpr uint64_t kTestSalt = 0x746573ULL;

// Mean cross-entropy over `batches`, in eval mode. The batches run at once, each alone on
// one thread and with a generator of its own, except with expert parallelism, whose forward
// holds collectives. With several ranks each evaluates its share of every batch and the
// means are averaged (collective).
double evaluate(Transformer& model, const std::vector<Batch>& batches, const Ranks& ranks);

// What one MoE layer did over an evaluation, summed over its batches.
struct LayerEval {
  int64_t layer = -1;  // the transformer block
  int64_t assignments = 0, dropped = 0, rerouted = 0;
  torch::Tensor counts_E;  // int64: assignments the router sent to each expert
};

struct EvalResult {
  double loss = 0;     // mean cross-entropy per predicted character
  int64_t tokens = 0;  // characters predicted
  std::vector<LayerEval> layers;
};

// One pass's inputs and output: batch `batch`, routing group `share` of its rows.
using EvalObserver = std::function<void(size_t batch, int64_t share, const torch::Tensor& x_BS,
                                        const ModelOutput& out)>;

// evaluate() in one process, as `world` ranks would have run it: each batch's rows in
// `world` shares, each share its own routing group (capacity and dropping are per share),
// so that a checkpoint written by W ranks gives back the losses they recorded. Batches of
// equal size give evaluate()'s mean of means; otherwise the mean is per character. A batch
// whose rows `world` does not divide is routed whole (it comes to `observe` as share 0). Shares
// run at once; `observe` (optional) sees each from the thread that ran it.
EvalResult evaluate_shares(Transformer& model, const std::vector<Batch>& batches, int64_t world,
                           const EvalObserver& observe = {});

}  // namespace sw
