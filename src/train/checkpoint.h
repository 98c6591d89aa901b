// Checkpoints: one directory per checkpoint, ckpt-<step>/, holding
//   model.pt   the weights as a plain {name: tensor} dict, the file Python's torch.save
//              writes for one (torch.load(path, weights_only=True) reads it),
//   model.safetensors  the same tensors, with the config and vocabulary in its metadata,
//   optim.pt   the AdamW state as a plain {name: tensor} dict (optimizer_dict),
//   rng.pt     the torch CPU generator state (of every rank, in a run of several),
//   state.json format version, step, wall time, data-sampler state, vocabulary, config.
// A checkpoint is written into ckpt-<step>.tmp/, every file flushed, then the directory is
// renamed: a crash leaves either the whole checkpoint or none of it.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "config/config.h"
#include "data/vocab.h"
#include "train/checkpoint_state.h"

namespace sw {

// `rank_rng` ([W, S] uint8, optional): every rank's generator state in a run of W ranks.
void save_checkpoint(const std::string& run_dir, const Config& cfg, const Vocab& vocab,
                     const torch::nn::Module& model, torch::optim::Optimizer& opt,
                     const TrainState& state, const torch::Tensor& rank_rng = {});

// The AdamW state of `opt` as saved in optim.pt: for parameter i (in the order of the
// groups) that has a state, "state.<i>.step" (an int64 scalar), "state.<i>.exp_avg" and
// "state.<i>.exp_avg_sq". Group options are not saved: they come from the config, and
// the learning rate from the schedule at every step.
c10::Dict<std::string, at::Tensor> optimizer_dict(torch::optim::Optimizer& opt);

// The newest complete checkpoint directory of a run, if any.
std::optional<std::string> newest_checkpoint(const std::string& run_dir);
// Every complete checkpoint of a run as (step, directory), oldest first.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& run_dir);

// The number of ranks that wrote a checkpoint (and ran the evaluation of its step): the
// ranks whose generator states rng.pt holds, 1 for a single process.
int64_t checkpoint_world(const std::string& ckpt_dir);

// Reads <ckpt_dir>/state.json (parse_checkpoint_state).
CheckpointMeta read_checkpoint_meta(const std::string& ckpt_dir);

// Loads weights into a model built from the checkpoint's config, from model.pt or, where a
// checkpoint has none, model.safetensors: a missing, extra or mis-shaped tensor is an error
// that names it.
void load_weights(const std::string& ckpt_dir, torch::nn::Module& model);
// Restores the optimizer and, for rank `rank` of `world`, the generator state. Returns
// false when the checkpoint has none for this rank (it was written by another number of
// ranks and this is not rank 0): the caller seeds the generator itself.
bool load_optimizer_and_rng(const std::string& ckpt_dir, torch::optim::Optimizer& opt,
                            int64_t rank = 0, int64_t world = 1);

// Deletes all but the newest `keep` complete checkpoints, and stale *.tmp directories.
void prune_checkpoints(const std::string& run_dir, int64_t keep);

// The weights as a name -> tensor dict, the format of model.pt.
c10::Dict<std::string, at::Tensor> state_dict(const torch::nn::Module& model);

}  // namespace sw
