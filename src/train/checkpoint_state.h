// A checkpoint's state.json: format version, step, wall time, data-sampler state, best val
// loss, skipped steps, vocabulary and config. Kept apart from the tensors (and from
// LibTorch) so the parser can be fuzzed on its own.
#pragma once

#include <array>
#include <cstdint>
#include <limits>
#include <string>

#include "config/config.h"
#include "data/vocab.h"

namespace sw {

constexpr int kCheckpointFormat = 1;

struct TrainState {
  int64_t step = 0;   // completed optimizer steps
  double time_s = 0;  // wall seconds of training so far
  std::array<uint64_t, 4> data_rng{};
  double best_val_loss = std::numeric_limits<double>::infinity();
  int64_t skipped_steps = 0;  // non-finite steps not applied (train.on_nonfinite = skip)
};

struct CheckpointMeta {
  std::string dir;
  Config config;
  Vocab vocab;
  TrainState state;
};

// The text of state.json for a checkpoint.
std::string checkpoint_state_json(const Config& cfg, const Vocab& vocab, const TrainState& state);

// Parses state.json text (`source` names it in errors). Malformed JSON, a missing or
// mistyped field, another format version, a vocabulary that is not UTF-8 or an invalid
// config are errors naming the file and the field.
CheckpointMeta parse_checkpoint_state(const std::string& text, const std::string& source);

}  // namespace sw
