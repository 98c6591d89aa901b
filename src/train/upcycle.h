// Sparse upcycling (switch-train --init-from RUN): a new MoE model starts from a trained
// dense run. Every expert of an MoE layer starts as a copy of that layer's dense FFN, the
// routers start fresh, every other tensor is copied; the new run keeps the dense run's
// vocabulary. With top-1 gates of 1 (sigmoid scores, or moe.is_scale_prob = false) and no
// dropping, the upcycled model computes the dense model's function at step 0.
#pragma once

#include <string>

#include "config/config.h"
#include "model/transformer.h"
#include "train/checkpoint_state.h"

namespace sw {

// A dense checkpoint, read and checked, ready to be copied.
struct UpcycleSource {
  CheckpointMeta meta;
  Transformer dense{nullptr};
};

// The newest complete checkpoint of the dense run `run_dir` (or, with a ckpt-<step>
// folder, that checkpoint), its weights loaded, refused (sw::Error naming the run and the
// key) unless that run is dense and its model agrees with cfg's in every key the copy
// needs (config.h's upcycle_mismatch). Called before anything is written.
UpcycleSource upcycle_source(const std::string& run_dir, const Config& cfg);

// Copies the dense model into `model` (whole, before any expert sharding).
void upcycle(const UpcycleSource& source, Transformer& model);

// A new upcycled run records its source checkpoint in its folder (init_from.json), so
// that resuming it before its first checkpoint upcycles again instead of starting afresh.
void record_upcycle_source(const std::string& run_dir, const UpcycleSource& source);
// The recorded source checkpoint of an upcycled run, or "" for another run.
std::string recorded_upcycle_source(const std::string& run_dir);

}  // namespace sw
