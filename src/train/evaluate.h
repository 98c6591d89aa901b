// Evaluation: the mean cross-entropy of a model over fixed batches, the same batches at
// every evaluation of a run, without touching the training generators.
#pragma once

#include <cstdint>
#include <vector>

#include "data/dataset.h"
#include "model/transformer.h"
#include "train/ranks.h"

namespace sw {

// train.eval_batches batches of `split`, drawn from a generator seeded by train.seed ^ salt.
std::vector<Batch> fixed_batches(const Dataset& data, Split split, const TrainConfig& t,
                                 uint64_t salt);

// Mean cross-entropy over `batches`, in eval mode. The batches run at once, each alone on
// one thread and with a generator of its own, except with expert parallelism, whose forward
// holds collectives. With several ranks each evaluates its share of every batch and the
// means are averaged (collective).
double evaluate(Transformer& model, const std::vector<Batch>& batches, const Ranks& ranks);

}  // namespace sw
