// A trained run's model read back from one of its checkpoints, for the tools that look at a
// run without training it (switch-sample, switch-eval). They take no lock: the run may still
// be training, and a checkpoint it prunes while it is being read is replaced by its newest.
#pragma once

#include <string>

#include "model/transformer.h"
#include "train/checkpoint.h"

namespace sw {

struct TrainedModel {
  CheckpointMeta meta;  // the checkpoint's directory, config, vocabulary and step
  int64_t world = 1;    // the ranks that wrote it (checkpoint_world), when asked for
  Transformer model{nullptr};
};

// The checkpoint of `step` of `run_dir` (step < 0: its newest complete one), built and in
// eval mode. `use` says what it is for in the message when there is none ("sample from");
// `ranks`: also read how many ranks wrote it (from rng.pt). Throws sw::Error naming the run,
// the step and the steps there are, or a model too large for this machine's memory.
TrainedModel load_trained_model(const std::string& run_dir, int64_t step, const std::string& use,
                                bool ranks = false);

}  // namespace sw
