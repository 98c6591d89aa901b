// The run configuration: plain structs that own the defaults, and a table of dotted keys
// ("model.d_model", "moe.n_experts", ...) through which config files and --set overrides
// reach them. Precedence: compiled-in defaults < config file < --set. Every key is typed
// and range-checked here; nothing else in the project parses configuration.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/options.h"

namespace sw {

struct DataConfig {
  std::string path = "data/tinyshakespeare.txt";  // UTF-8 text file
  double val_fraction = 0.1;                      // the last 10 % of characters
  double test_fraction = 0.0;                     // held out after validation, at the end
  std::string cache_dir;                          // prepared token files ("": beside the text)
};

struct ModelConfig {
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t d_ff = 512;    // hidden width of a dense FFN and of each expert
  int64_t seq_len = 64;  // context length in characters
  double dropout = 0.0;
  bool pos_emb = true;  // learned position embedding (labml's Switch has none)
  Activation activation = Activation::Gelu;
};

struct MoeConfig {
  int64_t n_experts = 4;
  int64_t d_expert = 0;          // hidden width of each expert; 0: model.d_ff
  int64_t every = 1;             // 0: no MoE layer (dense); k: layers k-1, 2k-1, ... are MoE layers
  int64_t top_k = 1;             // experts per token: 1 = Switch, 2 = GShard-style
  Score score = Score::Softmax;  // the router's score function
  Balance balance = Balance::AuxLoss;  // the balancing term of the objective
  double bias_rate = 0.001;            // moe.balance = bias: the bias update step
  int64_t shared_experts = 0;          // always-on experts per MoE layer
  Overflow overflow = Overflow::Drop;  // what happens to an assignment over capacity
  double capacity_factor = 1.25;       // training: capacity = int(cf * k * tokens / experts)
  double eval_capacity_factor = 2.0;   // the same in evaluation
  bool drop_tokens = true;
  DropPolicy drop_policy = DropPolicy::Random;  // who keeps a seat in a full expert
  bool is_scale_prob = true;
  DroppedOutput dropped = DroppedOutput::Pass;  // what a dropped assignment outputs
  Strategy strategy = Strategy::Grouped;        // how the experts are computed
  double alpha = 0.01;                          // weight of the load-balancing loss
  double z_loss = 0.001;                        // weight of the router z-loss
  double jitter = 0.0;      // multiplicative router-input noise in training: x * U(1-j, 1+j)
  double init_scale = 1.0;  // expert and router weights ~ N(0, init_scale / fan_in)
};

struct TrainConfig {
  int64_t steps = 3000;
  int64_t batch_size = 16;
  double lr = 2e-3;
  double min_lr = 2e-4;
  int64_t warmup = 100;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // 0 disables clipping
  int64_t eval_every = 250;
  int64_t eval_batches = 20;
  int64_t log_every = 10;
  int64_t checkpoint_every = 500;
  int64_t keep_checkpoints = 2;
  int64_t seed = 1337;
  int64_t threads = 0;  // 0: all cores
  // The batch (each rank's share) is split into this many micro-batches: each is its own
  // routing group (capacity, dropping and the load-balancing loss are per micro-batch) and
  // they run at once, one per thread; results do not depend on the thread count.
  int64_t micro_batches = 2;
  OnNonfinite on_nonfinite = OnNonfinite::Stop;  // a non-finite loss or gradient
};

// Several processes (ranks, from RANK / WORLD_SIZE or switch-train --nproc): every rank
// trains on its share of each batch (data parallelism) and, with expert parallelism, holds
// only its slice of every MoE layer's experts.
struct DistConfig {
  int64_t expert_parallel = 0;  // ranks sharing one set of experts: 0 = all, 1 = none
  bool overlap = true;          // expert parallel: micro-batches at once on their own lanes
  int64_t spin_us = 10000;      // polling a collective before sleeping on it
  double timeout_s = 300;       // rendezvous and collective timeout
};

struct Config {
  DataConfig data;
  ModelConfig model;
  MoeConfig moe;
  TrainConfig train;
  DistConfig dist;

  // True when layer i (0-based) has a SwitchFeedForward instead of a dense one.
  bool is_moe_layer(int64_t i) const { return moe.every > 0 && i % moe.every == moe.every - 1; }
  int64_t n_moe_layers() const;
  // The hidden width of each expert: moe.d_expert, or model.d_ff when that is 0.
  int64_t expert_width() const { return moe.d_expert > 0 ? moe.d_expert : model.d_ff; }
};

enum class Kind { Int, Float, Bool, String, Choice };

// One configurable key: its dotted name, type and texts. The default is what Config{} holds.
struct KeyInfo {
  std::string key;
  Kind kind;
  std::string help;  // one line, for --list-keys (a Choice key's ends with its names)
  std::string doc;   // the longer text of docs/config.md (a Choice key's values follow it)
  std::vector<std::pair<std::string, std::string>> choices;  // Kind::Choice: name, meaning
  bool resumable = false;  // may change when a run is resumed (it steers the loop only)
};
const std::vector<KeyInfo>& config_keys();

// `switch-train --list-keys`: a line per key with its default and help.
std::string keys_text();
// docs/config.md, generated from the same table (`switch-train --list-keys --markdown`).
std::string keys_markdown();

// Nested JSON ({"model": {"d_model": 128}, ...}) with every key.
nlohmann::json to_json(const Config& c);

// Applies a (nested) JSON object on top of `c`. `source` names where it came from for
// error messages. Throws sw::Error on unknown keys (with a did-you-mean), wrong types.
void apply_json(Config& c, const nlohmann::json& j, const std::string& source);

// Reads a JSON config file and applies it; malformed JSON is reported with line and column.
void apply_file(Config& c, const std::string& path);

// Applies one "key=value" override, the value parsed according to the key's type.
void apply_override(Config& c, const std::string& assignment);

// Range and consistency checks; throws sw::Error naming the key and what is accepted.
void validate(const Config& c);

// The checks that depend on the number of ranks: dist.expert_parallel is 0, 1 or
// `world_size`; train.batch_size (the global batch) and, with expert parallelism,
// moe.n_experts are divisible by it. Throws sw::Error naming the key.
void validate_world(const Config& c, int64_t world_size);

// Why a model of config `cfg` cannot start from a trained run of config `dense` by sparse
// upcycling (switch-train --init-from), naming the key, or "" when it can: `dense` must be
// a dense model (moe.every = 0) agreeing in model.d_model, n_layers, n_heads, seq_len,
// pos_emb, activation and d_ff, cfg's experts as wide as its FFN, and no shared experts.
std::string upcycle_mismatch(const Config& dense, const Config& cfg);

// Expert-parallel ranks for a run of `world_size` ranks: 1 (every rank holds every expert)
// or world_size.
int64_t expert_parallel_ranks(const Config& c, int64_t world_size);

// Parses a JSON text, turning a parse error into sw::Error with "source:line:col".
nlohmann::json parse_json_text(const std::string& text, const std::string& source);

// The closest known key to `key`, or "" when none is close.
std::string closest_key(const std::string& key);

}  // namespace sw
