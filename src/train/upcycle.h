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

// The newest complete checkpoint of the dense run `run_dir`, refused (sw::Error naming the
// run and the key) unless that run is dense and its model agrees with cfg's in every key
// the copy needs: model.d_model, n_layers, n_heads, seq_len, pos_emb, activation, d_ff
// (which the experts' width must equal), and moe.shared_experts = 0.
CheckpointMeta upcycle_source(const std::string& run_dir, const Config& cfg);

// Copies the dense checkpoint `source` into `model` (whole, before any expert sharding).
void upcycle(const CheckpointMeta& source, Transformer& model);

}  // namespace sw
