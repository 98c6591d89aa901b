#include "config/config.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include <fmt/format.h>

#include "util/error.h"
#include "util/fs.h"
#include "util/json_depth.h"

namespace sw {
namespace {

struct Binding {
  KeyInfo info;
  std::function<void*(Config&)> at;  // where the value lives inside a Config
};

template <typename Member>
Binding bind(std::string key, Kind kind, std::string help, Member member) {
  return Binding{{std::move(key), kind, std::move(help)},
                 [member](Config& c) -> void* { return member(c); }};
}

const std::vector<Binding>& bindings() {
  static const std::vector<Binding> table = {
      bind("data.path", Kind::String, "UTF-8 text file to train on",
           [](Config& c) { return &c.data.path; }),
      bind("data.val_fraction", Kind::Float, "fraction of characters (at the end) held out",
           [](Config& c) { return &c.data.val_fraction; }),
      bind("model.d_model", Kind::Int, "model width", [](Config& c) { return &c.model.d_model; }),
      bind("model.n_layers", Kind::Int, "transformer blocks",
           [](Config& c) { return &c.model.n_layers; }),
      bind("model.n_heads", Kind::Int, "attention heads (must divide d_model)",
           [](Config& c) { return &c.model.n_heads; }),
      bind("model.d_ff", Kind::Int, "hidden width of the dense FFN and of each expert",
           [](Config& c) { return &c.model.d_ff; }),
      bind("model.seq_len", Kind::Int, "context length in characters",
           [](Config& c) { return &c.model.seq_len; }),
      bind("model.dropout", Kind::Float, "dropout probability",
           [](Config& c) { return &c.model.dropout; }),
      bind("model.pos_emb", Kind::Bool, "learned position embedding",
           [](Config& c) { return &c.model.pos_emb; }),
      bind("model.activation", Kind::String, "FFN activation: gelu | relu",
           [](Config& c) { return &c.model.activation; }),
      bind("moe.n_experts", Kind::Int, "experts per MoE layer",
           [](Config& c) { return &c.moe.n_experts; }),
      bind("moe.every", Kind::Int, "0: dense model; k: every k-th layer is an MoE layer",
           [](Config& c) { return &c.moe.every; }),
      bind("moe.top_k", Kind::Int, "experts per token (1: Switch, 2: GShard-style)",
           [](Config& c) { return &c.moe.top_k; }),
      bind("moe.capacity_factor", Kind::Float, "capacity = int(cf * top_k * tokens / experts)",
           [](Config& c) { return &c.moe.capacity_factor; }),
      bind("moe.eval_capacity_factor", Kind::Float, "capacity factor in evaluation",
           [](Config& c) { return &c.moe.eval_capacity_factor; }),
      bind("moe.drop_tokens", Kind::Bool, "drop tokens over an expert's capacity",
           [](Config& c) { return &c.moe.drop_tokens; }),
      bind("moe.drop_policy", Kind::String,
           "who keeps a seat in a full expert: random | position | probability",
           [](Config& c) { return &c.moe.drop_policy; }),
      bind("moe.is_scale_prob", Kind::Bool, "scale expert outputs by the router probability",
           [](Config& c) { return &c.moe.is_scale_prob; }),
      bind("moe.dropped", Kind::String, "output of a dropped token: pass | zero",
           [](Config& c) { return &c.moe.dropped; }),
      bind("moe.strategy", Kind::String, "how the experts are computed: loop | capacity | grouped",
           [](Config& c) { return &c.moe.strategy; }),
      bind("moe.alpha", Kind::Float, "load-balancing loss weight",
           [](Config& c) { return &c.moe.alpha; }),
      bind("moe.z_loss", Kind::Float, "router z-loss weight",
           [](Config& c) { return &c.moe.z_loss; }),
      bind("moe.jitter", Kind::Float, "multiplicative router-input noise in training",
           [](Config& c) { return &c.moe.jitter; }),
      bind("moe.init_scale", Kind::Float, "expert and router init: N(0, init_scale / fan_in)",
           [](Config& c) { return &c.moe.init_scale; }),
      bind("train.steps", Kind::Int, "optimizer steps", [](Config& c) { return &c.train.steps; }),
      bind("train.batch_size", Kind::Int, "sequences per step",
           [](Config& c) { return &c.train.batch_size; }),
      bind("train.lr", Kind::Float, "peak learning rate", [](Config& c) { return &c.train.lr; }),
      bind("train.min_lr", Kind::Float, "learning rate at the end of the cosine decay",
           [](Config& c) { return &c.train.min_lr; }),
      bind("train.warmup", Kind::Int, "linear warmup steps",
           [](Config& c) { return &c.train.warmup; }),
      bind("train.beta1", Kind::Float, "AdamW beta1", [](Config& c) { return &c.train.beta1; }),
      bind("train.beta2", Kind::Float, "AdamW beta2", [](Config& c) { return &c.train.beta2; }),
      bind("train.weight_decay", Kind::Float, "AdamW weight decay (matrices only)",
           [](Config& c) { return &c.train.weight_decay; }),
      bind("train.grad_clip", Kind::Float, "max global gradient norm (0: off)",
           [](Config& c) { return &c.train.grad_clip; }),
      bind("train.eval_every", Kind::Int, "steps between evaluations",
           [](Config& c) { return &c.train.eval_every; }),
      bind("train.eval_batches", Kind::Int, "fixed validation batches per evaluation",
           [](Config& c) { return &c.train.eval_batches; }),
      bind("train.log_every", Kind::Int, "steps between train records and progress lines",
           [](Config& c) { return &c.train.log_every; }),
      bind("train.checkpoint_every", Kind::Int, "steps between checkpoints",
           [](Config& c) { return &c.train.checkpoint_every; }),
      bind("train.keep_checkpoints", Kind::Int, "newest checkpoints kept on disk",
           [](Config& c) { return &c.train.keep_checkpoints; }),
      bind("train.seed", Kind::Int, "seed of every random generator",
           [](Config& c) { return &c.train.seed; }),
      bind("train.threads", Kind::Int, "intra-op threads per rank (0: all cores / local ranks)",
           [](Config& c) { return &c.train.threads; }),
      bind("train.micro_batches", Kind::Int,
           "routing groups per batch, run at once on the threads (the batch must divide)",
           [](Config& c) { return &c.train.micro_batches; }),
      bind("train.on_nonfinite", Kind::String,
           "a non-finite loss or gradient: stop (keep the last checkpoint) | skip the step",
           [](Config& c) { return &c.train.on_nonfinite; }),
      bind("dist.expert_parallel", Kind::Int,
           "ranks sharing each layer's experts: 0 = all ranks, 1 = data parallel only",
           [](Config& c) { return &c.dist.expert_parallel; }),
      bind("dist.timeout_s", Kind::Float, "seconds a rank waits for the others before failing",
           [](Config& c) { return &c.dist.timeout_s; }),
  };
  return table;
}

const Binding* find_binding(const std::string& key) {
  for (const auto& b : bindings())
    if (b.info.key == key) return &b;
  return nullptr;
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Int:
      return "an integer";
    case Kind::Float:
      return "a number";
    case Kind::Bool:
      return "true or false";
    case Kind::String:
      return "a string";
  }
  return "?";
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j)
    row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string unknown_key_message(const std::string& source, const std::string& key) {
  std::string msg = fmt::format("{}: unknown config key '{}'", source, key);
  std::string near = closest_key(key);
  if (!near.empty()) msg += fmt::format(" (did you mean '{}'?)", near);
  return msg + "; 'switch-train --list-keys' lists every key";
}

void set_from_json(Config& c, const Binding& b, const nlohmann::json& v,
                   const std::string& source) {
  auto type_error = [&] {
    return Error(fmt::format("{}: {} must be {}, got {}", source, b.info.key,
                             kind_name(b.info.kind), v.dump()));
  };
  void* p = b.at(c);
  switch (b.info.kind) {
    case Kind::Int:
      if (v.is_number_integer()) {
        *static_cast<int64_t*>(p) = v.get<int64_t>();
      } else if (v.is_number_float() && std::isfinite(v.get<double>()) &&
                 v.get<double>() == std::floor(v.get<double>()) &&
                 std::fabs(v.get<double>()) < 9e15) {
        *static_cast<int64_t*>(p) = static_cast<int64_t>(v.get<double>());
      } else {
        throw type_error();
      }
      break;
    case Kind::Float:
      if (!v.is_number()) throw type_error();
      *static_cast<double*>(p) = v.get<double>();
      break;
    case Kind::Bool:
      if (!v.is_boolean()) throw type_error();
      *static_cast<bool*>(p) = v.get<bool>();
      break;
    case Kind::String:
      if (!v.is_string()) throw type_error();
      *static_cast<std::string*>(p) = v.get<std::string>();
      break;
  }
}

void apply_object(Config& c, const nlohmann::json& obj, const std::string& prefix,
                  const std::string& source) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (const Binding* b = find_binding(key)) {
      set_from_json(c, *b, it.value(), source);
    } else if (it.value().is_object()) {
      // A section ("model") or a dotted prefix; only known sections may hold keys.
      bool is_prefix = false;
      for (const auto& bb : bindings())
        if (bb.info.key.rfind(key + ".", 0) == 0) is_prefix = true;
      if (!is_prefix) throw Error(unknown_key_message(source, key));
      apply_object(c, it.value(), key, source);
    } else {
      throw Error(unknown_key_message(source, key));
    }
  }
}

}  // namespace

int64_t Config::n_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < model.n_layers; ++i)
    n += is_moe_layer(i) ? 1 : 0;
  return n;
}

const std::vector<KeyInfo>& config_keys() {
  static const std::vector<KeyInfo> keys = [] {
    std::vector<KeyInfo> out;
    for (const auto& b : bindings())
      out.push_back(b.info);
    return out;
  }();
  return keys;
}

std::string closest_key(const std::string& key) {
  std::string best;
  size_t best_d = std::string::npos;
  std::string leaf = key.substr(key.rfind('.') == std::string::npos ? 0 : key.rfind('.') + 1);
  for (const auto& b : bindings()) {
    const std::string& k = b.info.key;
    size_t d = edit_distance(key, k);
    // A bare or misplaced leaf name ("n_experts", "model.n_experts") also counts as close.
    std::string kleaf = k.substr(k.rfind('.') + 1);
    if (kleaf == leaf) d = std::min<size_t>(d, 1);
    if (d < best_d) {
      best_d = d;
      best = k;
    }
  }
  return best_d <= std::max<size_t>(2, key.size() / 4) ? best : "";
}

nlohmann::json to_json(const Config& c) {
  nlohmann::json j = nlohmann::json::object();
  Config& mut = const_cast<Config&>(c);  // the accessors are shared with the setters
  for (const auto& b : bindings()) {
    const void* p = b.at(mut);
    nlohmann::json v;
    switch (b.info.kind) {
      case Kind::Int:
        v = *static_cast<const int64_t*>(p);
        break;
      case Kind::Float:
        v = *static_cast<const double*>(p);
        break;
      case Kind::Bool:
        v = *static_cast<const bool*>(p);
        break;
      case Kind::String:
        v = *static_cast<const std::string*>(p);
        break;
    }
    j[nlohmann::json::json_pointer("/" + [&] {
      std::string s = b.info.key;
      std::replace(s.begin(), s.end(), '.', '/');
      return s;
    }())] = v;
  }
  return j;
}

void apply_json(Config& c, const nlohmann::json& j, const std::string& source) {
  if (!j.is_object())
    throw Error(fmt::format("{}: a config must be a JSON object, got {}", source, j.type_name()));
  apply_object(c, j, "", source);
}

nlohmann::json parse_json_text(const std::string& text, const std::string& source) {
  size_t at = 0;
  if (json_depth(text, &at) > kMaxJsonDepth) {
    const size_t line = 1 + std::count(text.begin(), text.begin() + at, '\n');
    const size_t line_start = text.rfind('\n', at);
    const size_t col = at - (line_start == std::string::npos ? 0 : line_start + 1) + 1;
    throw Error(fmt::format("{}:{}:{}: JSON nested deeper than {} levels", source, line, col,
                            kMaxJsonDepth));
  }
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    size_t pos = std::min<size_t>(e.byte == 0 ? 0 : e.byte - 1, text.size());
    size_t line = 1 + std::count(text.begin(), text.begin() + pos, '\n');
    size_t line_start = text.rfind('\n', pos == 0 ? 0 : pos - 1);
    size_t col = pos - (line_start == std::string::npos ? 0 : line_start + 1) + 1;
    if (pos == 0) col = 1;
    std::string what = e.what();
    // nlohmann's message starts with "[json.exception.parse_error.101] parse error at ...: "
    size_t colon = what.rfind(": ");
    std::string reason = colon == std::string::npos ? what : what.substr(colon + 2);
    throw Error(fmt::format("{}:{}:{}: malformed JSON: {}", source, line, col, reason));
  } catch (const nlohmann::json::exception& e) {  // e.g. a number too large for a double
    std::string what = e.what();
    const size_t bracket = what.find("] ");
    throw Error(fmt::format("{}: malformed JSON: {}", source,
                            bracket == std::string::npos ? what : what.substr(bracket + 2)));
  }
}

void apply_file(Config& c, const std::string& path) {
  apply_json(c, parse_json_text(read_file(path, "config file", kMaxJsonFileBytes), path), path);
}

void apply_override(Config& c, const std::string& assignment) {
  size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error(
        fmt::format("--set '{}': expected key=value, e.g. --set moe.n_experts=8", assignment));
  std::string key = assignment.substr(0, eq);
  std::string text = assignment.substr(eq + 1);
  const Binding* b = find_binding(key);
  if (!b) throw Error(unknown_key_message("--set", key));
  void* p = b->at(c);
  auto bad = [&] {
    return Error(fmt::format("--set {}: '{}' is not {}", key, text, kind_name(b->info.kind)));
  };
  switch (b->info.kind) {
    case Kind::Int: {
      size_t used = 0;
      int64_t v = 0;
      try {
        v = std::stoll(text, &used);
      } catch (const std::exception&) {
        throw bad();
      }
      if (used != text.size()) throw bad();
      *static_cast<int64_t*>(p) = v;
      break;
    }
    case Kind::Float: {
      size_t used = 0;
      double v = 0;
      try {
        v = std::stod(text, &used);
      } catch (const std::exception&) {
        throw bad();
      }
      if (used != text.size()) throw bad();
      *static_cast<double*>(p) = v;
      break;
    }
    case Kind::Bool:
      if (text == "true" || text == "1") {
        *static_cast<bool*>(p) = true;
      } else if (text == "false" || text == "0") {
        *static_cast<bool*>(p) = false;
      } else {
        throw bad();
      }
      break;
    case Kind::String:
      *static_cast<std::string*>(p) = text;
      break;
  }
}

void validate(const Config& c) {
  auto fail = [](const std::string& key, const std::string& value, const std::string& what) {
    throw Error(fmt::format("config: {} = {}: {}", key, value, what));
  };
  auto at_least = [&](const std::string& key, int64_t v, int64_t lo) {
    if (v < lo) fail(key, std::to_string(v), fmt::format("must be >= {}", lo));
  };
  auto in_range = [&](const std::string& key, double v, double lo, double hi, bool lo_open,
                      bool hi_open) {
    bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
    if (!ok)
      fail(key, fmt::format("{}", v),
           fmt::format("must be in {}{}, {}{}", lo_open ? "(" : "[", lo, hi, hi_open ? ")" : "]"));
  };
  auto one_of = [&](const std::string& key, const std::string& v,
                    const std::vector<std::string>& choices) {
    if (std::find(choices.begin(), choices.end(), v) == choices.end()) {
      std::string list;
      for (const auto& ch : choices)
        list += (list.empty() ? "" : " | ") + ch;
      fail(key, "'" + v + "'", "must be one of " + list);
    }
  };
  const double inf = std::numeric_limits<double>::infinity();

  if (c.data.path.empty()) fail("data.path", "''", "must name a UTF-8 text file");
  in_range("data.val_fraction", c.data.val_fraction, 0.0, 1.0, true, true);

  at_least("model.d_model", c.model.d_model, 1);
  at_least("model.n_layers", c.model.n_layers, 1);
  at_least("model.n_heads", c.model.n_heads, 1);
  at_least("model.d_ff", c.model.d_ff, 1);
  at_least("model.seq_len", c.model.seq_len, 1);
  in_range("model.dropout", c.model.dropout, 0.0, 1.0, false, true);
  one_of("model.activation", c.model.activation, {"gelu", "relu"});
  if (c.model.d_model % c.model.n_heads != 0)
    fail("model.d_model", std::to_string(c.model.d_model),
         fmt::format("must be divisible by model.n_heads = {}", c.model.n_heads));

  at_least("moe.n_experts", c.moe.n_experts, 1);
  at_least("moe.every", c.moe.every, 0);
  in_range("moe.capacity_factor", c.moe.capacity_factor, 0.0, inf, true, true);
  one_of("moe.dropped", c.moe.dropped, {"pass", "zero"});
  in_range("moe.eval_capacity_factor", c.moe.eval_capacity_factor, 0.0, inf, true, true);
  one_of("moe.drop_policy", c.moe.drop_policy, {"random", "position", "probability"});
  one_of("moe.strategy", c.moe.strategy, {"loop", "capacity", "grouped"});
  in_range("moe.alpha", c.moe.alpha, 0.0, inf, false, true);
  in_range("moe.z_loss", c.moe.z_loss, 0.0, inf, false, true);
  in_range("moe.jitter", c.moe.jitter, 0.0, 1.0, false, true);
  in_range("moe.init_scale", c.moe.init_scale, 0.0, inf, true, true);
  at_least("moe.top_k", c.moe.top_k, 1);
  if (c.moe.top_k > c.moe.n_experts)
    fail("moe.top_k", std::to_string(c.moe.top_k),
         fmt::format("must be <= moe.n_experts = {}", c.moe.n_experts));
  if (c.moe.every > c.model.n_layers)
    fail("moe.every", std::to_string(c.moe.every),
         fmt::format("leaves no MoE layer among model.n_layers = {} (use 0 for a dense model)",
                     c.model.n_layers));

  at_least("train.steps", c.train.steps, 1);
  at_least("train.batch_size", c.train.batch_size, 1);
  in_range("train.lr", c.train.lr, 0.0, inf, true, true);
  in_range("train.min_lr", c.train.min_lr, 0.0, c.train.lr, false, false);
  at_least("train.warmup", c.train.warmup, 0);
  in_range("train.beta1", c.train.beta1, 0.0, 1.0, false, true);
  in_range("train.beta2", c.train.beta2, 0.0, 1.0, false, true);
  in_range("train.weight_decay", c.train.weight_decay, 0.0, inf, false, true);
  in_range("train.grad_clip", c.train.grad_clip, 0.0, inf, false, true);
  at_least("train.eval_every", c.train.eval_every, 1);
  at_least("train.eval_batches", c.train.eval_batches, 1);
  at_least("train.log_every", c.train.log_every, 1);
  at_least("train.checkpoint_every", c.train.checkpoint_every, 1);
  at_least("train.keep_checkpoints", c.train.keep_checkpoints, 1);
  at_least("train.seed", c.train.seed, 0);
  at_least("train.threads", c.train.threads, 0);
  if (c.train.threads > 1024)  // each one a thread of its own: more is a typo, not a machine
    fail("train.threads", std::to_string(c.train.threads), "must be <= 1024");
  at_least("train.micro_batches", c.train.micro_batches, 1);
  if (c.train.batch_size % c.train.micro_batches != 0)
    throw Error(fmt::format(
        "config: train.micro_batches = {}: train.batch_size = {} must split evenly into it",
        c.train.micro_batches, c.train.batch_size));
  one_of("train.on_nonfinite", c.train.on_nonfinite, {"stop", "skip"});
  at_least("dist.expert_parallel", c.dist.expert_parallel, 0);
  in_range("dist.timeout_s", c.dist.timeout_s, 0.0, inf, true, true);
}

int64_t expert_parallel_ranks(const Config& c, int64_t world_size) {
  return c.dist.expert_parallel == 1 ? 1 : world_size;
}

void validate_world(const Config& c, int64_t world_size) {
  const int64_t W = world_size;
  const int64_t ep = c.dist.expert_parallel;
  if (ep != 0 && ep != 1 && ep != W)
    throw Error(
        W == 1 ? fmt::format("config: dist.expert_parallel = {}: the run has 1 rank; use 0 or 1, "
                             "or start {} ranks (switch-train --nproc {})",
                             ep, ep, ep)
               : fmt::format("config: dist.expert_parallel = {}: the run has {} ranks; use 0 (all "
                             "ranks), 1 (data parallel only) or {}",
                             ep, W, W));
  if (c.train.batch_size % W != 0)
    throw Error(fmt::format(
        "config: train.batch_size = {}: the global batch must split evenly over {} ranks",
        c.train.batch_size, W));
  if ((c.train.batch_size / W) % c.train.micro_batches != 0)
    throw Error(fmt::format(
        "config: train.micro_batches = {}: each of {} ranks' {} rows must split evenly into it",
        c.train.micro_batches, W, c.train.batch_size / W));
  if (expert_parallel_ranks(c, W) > 1 && c.n_moe_layers() > 0 && c.moe.n_experts % W != 0)
    throw Error(fmt::format(
        "config: moe.n_experts = {}: must be divisible by the {} expert-parallel ranks (or "
        "set dist.expert_parallel = 1 to replicate the experts)",
        c.moe.n_experts, W));
}

}  // namespace sw
