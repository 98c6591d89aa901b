#include "config/config.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <tuple>
#include <type_traits>

#include <fmt/format.h>

#include "util/error.h"
#include "util/fs.h"
#include "util/json_depth.h"

namespace sw {
namespace {

template <typename T>
constexpr Kind kind_of() {
  if constexpr (std::is_enum_v<T>) return Kind::Choice;
  if constexpr (std::is_same_v<T, bool>) return Kind::Bool;
  if constexpr (std::is_same_v<T, int64_t>) return Kind::Int;
  if constexpr (std::is_same_v<T, double>) return Kind::Float;
  return Kind::String;
}

// Reads a JSON value into `out` when its type fits (an integer may be written 3.0).
template <typename T>
bool read_value(const nlohmann::json& v, T& out) {
  if constexpr (std::is_enum_v<T>) {
    if (!v.is_string()) return false;
    const std::optional<T> e = choice_named<T>(v.get<std::string>());
    if (e) out = *e;
    return e.has_value();
  } else if constexpr (std::is_same_v<T, int64_t>) {
    if (v.is_number_integer()) {
      out = v.get<int64_t>();
      return true;
    }
    if (!v.is_number_float()) return false;
    const double d = v.get<double>();
    if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) >= 9e15) return false;
    out = static_cast<int64_t>(d);
    return true;
  } else if constexpr (std::is_same_v<T, double>) {
    if (v.is_number()) out = v.get<double>();
    return v.is_number();
  } else if constexpr (std::is_same_v<T, bool>) {
    if (v.is_boolean()) out = v.get<bool>();
    return v.is_boolean();
  } else {
    if (v.is_string()) out = v.get<std::string>();
    return v.is_string();
  }
}

template <typename T>
nlohmann::json write_value(const T& v) {
  if constexpr (std::is_enum_v<T>)
    return name_of(v);
  else
    return v;
}

// A --set value as the JSON it stands for; null when the text is not of the key's kind.
nlohmann::json parse_text(Kind kind, const std::string& text) {
  size_t used = 0;
  try {
    switch (kind) {
      case Kind::Int: {
        const int64_t v = std::stoll(text, &used);
        return used == text.size() ? nlohmann::json(v) : nlohmann::json();
      }
      case Kind::Float: {
        const double v = std::stod(text, &used);
        return used == text.size() ? nlohmann::json(v) : nlohmann::json();
      }
      case Kind::Bool:
        if (text == "true" || text == "1") return true;
        if (text == "false" || text == "0") return false;
        return nlohmann::json();
      case Kind::String:
      case Kind::Choice:
        return text;
    }
  } catch (const std::exception&) {  // std::stoll / std::stod: not a number, or out of range
  }
  return nlohmann::json();
}

// A key of the table: what it is, and how to read and write its value in a Config.
struct Binding {
  KeyInfo info;
  std::function<nlohmann::json(const Config&)> get;
  std::function<bool(Config&, const nlohmann::json&)> set;  // false: the value's type is wrong

  Binding&& doc(std::string text) && {
    info.doc = std::move(text);
    return std::move(*this);
  }
  Binding&& resumable() && {
    info.resumable = true;
    return std::move(*this);
  }
};

// The key `key` is field `field` of section `section`; its kind follows the field's type.
template <typename S, typename T>
Binding entry(std::string key, S Config::*section, T S::*field, std::string help) {
  Binding b;
  b.info.key = std::move(key);
  b.info.kind = kind_of<T>();
  b.info.help = std::move(help);
  if constexpr (std::is_enum_v<T>) {
    b.info.help += ": " + choice_list<T>();
    for (const auto& c : choices<T>())
      b.info.choices.emplace_back(c.name, c.doc);
  }
  b.get = [section, field](const Config& c) { return write_value(c.*section.*field); };
  b.set = [section, field](Config& c, const nlohmann::json& v) {
    return read_value(v, c.*section.*field);
  };
  return b;
}

using C = Config;
using MC = ModelConfig;
using EC = MoeConfig;
using TC = TrainConfig;

// Every key, in the order --list-keys and docs/config.md list them.
const std::vector<Binding>& bindings() {
  static const std::vector<Binding> table = [] {
    std::vector<Binding> t;
    t.push_back(entry("data.path", &C::data, &DataConfig::path, "UTF-8 text file to train on")
                    .doc("UTF-8 text file to train on (any UTF-8 corpus works)"));
    t.push_back(entry("data.val_fraction", &C::data, &DataConfig::val_fraction,
                      "fraction of characters (at the end) held out")
                    .doc("fraction of characters held out for validation: the end of the text, "
                         "or just before the test part"));
    t.push_back(entry("data.test_fraction", &C::data, &DataConfig::test_fraction,
                      "fraction of characters (at the very end) held out for testing")
                    .doc("fraction of characters, at the very end, held out for testing "
                         "(switch-eval --split test); 0: none"));
    t.push_back(entry("data.cache_dir", &C::data, &DataConfig::cache_dir,
                      "folder for prepared token files (empty: beside the text)")
                    .doc("folder for prepared token files; empty: beside the text, or "
                         "~/.cache/switch/tokens when its folder is read-only"));
    t.push_back(entry("model.d_model", &C::model, &MC::d_model, "model width"));
    t.push_back(entry("model.n_layers", &C::model, &MC::n_layers, "transformer blocks"));
    t.push_back(
        entry("model.n_heads", &C::model, &MC::n_heads, "attention heads (must divide d_model)"));
    t.push_back(entry("model.d_ff", &C::model, &MC::d_ff,
                      "hidden width of the dense FFN and of each expert"));
    t.push_back(entry("model.seq_len", &C::model, &MC::seq_len, "context length in characters"));
    t.push_back(entry("model.dropout", &C::model, &MC::dropout, "dropout probability")
                    .doc("dropout probability (embeddings, attention, residual branches)"));
    t.push_back(entry("model.pos_emb", &C::model, &MC::pos_emb, "learned position embedding")
                    .doc("learned position embedding (labml's Switch has none)"));
    t.push_back(entry("model.activation", &C::model, &MC::activation, "FFN activation"));
    t.push_back(entry("moe.n_experts", &C::moe, &EC::n_experts, "experts per MoE layer"));
    t.push_back(
        entry("moe.d_expert", &C::moe, &EC::d_expert, "hidden width of each expert (0: model.d_ff)")
            .doc("hidden width of each expert apart from the dense FFN's (0: "
                 "`model.d_ff`): fine-grained experts at equal active parameters, e.g. "
                 "E = 16 x 128 top-4 against E = 4 x 512 top-1"));
    t.push_back(entry("moe.every", &C::moe, &EC::every,
                      "0: dense model; k: every k-th layer is an MoE layer")
                    .doc("0: dense model; k: layers k-1, 2k-1, ... are MoE layers (2 = every "
                         "other layer)"));
    t.push_back(
        entry("moe.top_k", &C::moe, &EC::top_k, "experts per token (1: Switch, 2: GShard-style)")
            .doc("experts per token: 1 = Switch; 2 = GShard-style, gates renormalized "
                 "over the k chosen"));
    t.push_back(entry("moe.score", &C::moe, &EC::score, "router score function"));
    t.push_back(entry("moe.capacity_factor", &C::moe, &EC::capacity_factor,
                      "capacity = int(cf * top_k * tokens / experts)")
                    .doc("in training, expert capacity = `int(capacity_factor * top_k * tokens "
                         "/ experts)`"));
    t.push_back(entry("moe.eval_capacity_factor", &C::moe, &EC::eval_capacity_factor,
                      "capacity factor in evaluation")
                    .doc("the same in evaluation"));
    t.push_back(
        entry("moe.drop_tokens", &C::moe, &EC::drop_tokens, "drop tokens over an expert's capacity")
            .doc("drop the assignments over an expert's capacity (false: dropless)"));
    t.push_back(
        entry("moe.drop_policy", &C::moe, &EC::drop_policy, "who keeps a seat in a full expert"));
    t.push_back(entry("moe.is_scale_prob", &C::moe, &EC::is_scale_prob,
                      "scale expert outputs by the router probability")
                    .doc("multiply expert outputs by the gate (else by `gate / gate.detach()`, "
                         "so gradients still reach the router)"));
    t.push_back(entry("moe.dropped", &C::moe, &EC::dropped, "output of a dropped token")
                    .doc("what a dropped assignment outputs"));
    t.push_back(entry("moe.strategy", &C::moe, &EC::strategy, "how the experts are computed")
                    .doc("how the experts are computed (all give the same outputs and gradients; "
                         "see [the model](model.md))"));
    t.push_back(entry("moe.balance", &C::moe, &EC::balance, "how the experts' load is balanced")
                    .doc("how the experts' load is balanced (every mode reports the Switch loss "
                         "as `lb_loss` and the load per expert)"));
    t.push_back(
        entry("moe.bias_rate", &C::moe, &EC::bias_rate, "moe.balance = bias: the bias update step")
            .doc("under `moe.balance = bias`, the step of each expert's bias update "
                 "after every optimizer step"));
    t.push_back(entry("moe.shared_experts", &C::moe, &EC::shared_experts,
                      "always-on experts per MoE layer, added for every token")
                    .doc("always-on experts per MoE layer whose output is added for every "
                         "token (DeepSeek-MoE), computed as one dense FFN of width "
                         "`shared_experts x` the expert width"));
    t.push_back(entry("moe.overflow", &C::moe, &EC::overflow,
                      "what happens to an assignment over its expert's capacity"));
    t.push_back(entry("moe.alpha", &C::moe, &EC::alpha, "load-balancing loss weight")
                    .doc("weight of the load-balancing loss"));
    t.push_back(entry("moe.z_loss", &C::moe, &EC::z_loss, "router z-loss weight")
                    .doc("weight of the router z-loss, `mean_t logsumexp(logits_t)^2`"));
    t.push_back(
        entry("moe.jitter", &C::moe, &EC::jitter, "multiplicative router-input noise in training")
            .doc("multiplicative router-input noise in training, `x * U(1 - j, 1 + j)`"));
    t.push_back(entry("moe.init_scale", &C::moe, &EC::init_scale,
                      "expert and router init: N(0, init_scale / fan_in)")
                    .doc("router and expert weights ~ N(0, init_scale / fan_in) (Switch paper: "
                         "0.1; 1.0 won `tune_router.json` here)"));
    t.push_back(entry("train.steps", &C::train, &TC::steps, "optimizer steps").resumable());
    t.push_back(entry("train.batch_size", &C::train, &TC::batch_size, "sequences per step")
                    .doc("sequences per step (the global batch, split over the ranks)"));
    t.push_back(entry("train.lr", &C::train, &TC::lr, "peak learning rate")
                    .doc("peak learning rate (AdamW)"));
    t.push_back(entry("train.min_lr", &C::train, &TC::min_lr,
                      "learning rate at the end of the cosine decay"));
    t.push_back(entry("train.warmup", &C::train, &TC::warmup, "linear warmup steps"));
    t.push_back(entry("train.beta1", &C::train, &TC::beta1, "AdamW beta1"));
    t.push_back(entry("train.beta2", &C::train, &TC::beta2, "AdamW beta2"));
    t.push_back(entry("train.weight_decay", &C::train, &TC::weight_decay,
                      "AdamW weight decay (matrices only)")
                    .doc("AdamW weight decay, on weight matrices and embeddings only"));
    t.push_back(
        entry("train.grad_clip", &C::train, &TC::grad_clip, "max global gradient norm (0: off)")
            .doc("maximum global gradient norm (0: no clipping)"));
    t.push_back(entry("train.eval_every", &C::train, &TC::eval_every, "steps between evaluations")
                    .resumable());
    t.push_back(entry("train.eval_batches", &C::train, &TC::eval_batches,
                      "fixed validation batches per evaluation")
                    .doc("fixed validation batches per evaluation (the same every time)"));
    t.push_back(entry("train.log_every", &C::train, &TC::log_every,
                      "steps between train records and progress lines")
                    .resumable());
    t.push_back(entry("train.checkpoint_every", &C::train, &TC::checkpoint_every,
                      "steps between checkpoints")
                    .doc("steps between checkpoints (the last step always writes one)")
                    .resumable());
    t.push_back(entry("train.keep_checkpoints", &C::train, &TC::keep_checkpoints,
                      "newest checkpoints kept on disk")
                    .resumable());
    t.push_back(entry("train.seed", &C::train, &TC::seed, "seed of every random generator")
                    .doc("seed of every random generator (data, init, dropping)"));
    t.push_back(entry("train.threads", &C::train, &TC::threads,
                      "intra-op threads per rank (0: all cores / local ranks)")
                    .doc("intra-op threads per rank (0: all cores, shared out over the local "
                         "ranks)")
                    .resumable());
    t.push_back(entry("train.micro_batches", &C::train, &TC::micro_batches,
                      "routing groups per batch, run at once on the threads (the batch must "
                      "divide)")
                    .doc("the batch (each rank's share) is split into this many micro-batches, "
                         "run at once one per thread; each is its own routing group (capacity, "
                         "dropping and the balancing losses per micro-batch); must divide the "
                         "batch"));
    t.push_back(
        entry("train.on_nonfinite", &C::train, &TC::on_nonfinite, "a non-finite loss or gradient")
            .resumable());
    t.push_back(entry("dist.expert_parallel", &C::dist, &DistConfig::expert_parallel,
                      "ranks sharing each layer's experts: 0 = all ranks, 1 = data parallel only")
                    .doc("ranks sharing each layer's experts: 0 = all ranks (expert parallel), "
                         "1 = every rank holds every expert (data parallel only)")
                    .resumable());
    t.push_back(
        entry("dist.overlap", &C::dist, &DistConfig::overlap,
              "expert parallel: micro-batches on threads of their own, hiding the all-to-alls")
            .doc("with expert parallelism and train.micro_batches > 1, the micro-batches run at "
                 "once, each on a thread with its own process group, so that one computes while "
                 "another waits in an all-to-all; false runs them one after another. The same "
                 "bits either way")
            .resumable());
    t.push_back(
        entry("dist.spin_us", &C::dist, &DistConfig::spin_us,
              "microseconds a thread polls a collective before it sleeps on it (0 = at once)")
            .doc("microseconds a rank's thread polls a collective for completion, yielding its "
                 "core to any thread that wants it, before it sleeps on it: a sleeping wait "
                 "costs a wake-up, which on a busy or virtual machine can take longer than the "
                 "exchange; 0 sleeps at once. The same bits either way")
            .resumable());
    t.push_back(entry("dist.timeout_s", &C::dist, &DistConfig::timeout_s,
                      "seconds a rank waits for the others before failing")
                    .doc("seconds a rank waits at rendezvous or in a collective before failing")
                    .resumable());
    for (Binding& b : t)
      if (b.info.doc.empty()) b.info.doc = b.info.help.substr(0, b.info.help.find(": "));
    return t;
  }();
  return table;
}

const Binding* find_binding(const std::string& key) {
  for (const auto& b : bindings())
    if (b.info.key == key) return &b;
  return nullptr;
}

// What a value of the key must be, e.g. "an integer", "one of loop | capacity | grouped".
std::string expected(const KeyInfo& k) {
  switch (k.kind) {
    case Kind::Int:
      return "an integer";
    case Kind::Float:
      return "a number";
    case Kind::Bool:
      return "true or false";
    case Kind::String:
      return "a string";
    case Kind::Choice: {
      std::string names;
      for (const auto& c : k.choices)
        names += (names.empty() ? "" : " | ") + c.first;
      return "one of " + names;
    }
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

void apply_object(Config& c, const nlohmann::json& obj, const std::string& prefix,
                  const std::string& source) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (const Binding* b = find_binding(key)) {
      if (!b->set(c, it.value()))
        throw Error(fmt::format("{}: {} must be {}, got {}", source, key, expected(b->info),
                                it.value().dump()));
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

[[noreturn]] void fail(const std::string& key, const std::string& value, const std::string& what) {
  throw Error(fmt::format("config: {} = {}: {}", key, value, what));
}

void at_least(const std::string& key, int64_t v, int64_t lo) {
  if (v < lo) fail(key, std::to_string(v), fmt::format("must be >= {}", lo));
}

// v in [lo, hi], with either end open.
void in_range(const std::string& key, double v, double lo, double hi, bool lo_open, bool hi_open) {
  const bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  if (!ok)
    fail(key, fmt::format("{}", v),
         fmt::format("must be in {}{}, {}{}", lo_open ? "(" : "[", lo, hi, hi_open ? ")" : "]"));
}

constexpr double kInf = std::numeric_limits<double>::infinity();

void validate_model(const Config& c) {
  if (c.data.path.empty()) fail("data.path", "''", "must name a UTF-8 text file");
  in_range("data.val_fraction", c.data.val_fraction, 0.0, 1.0, true, true);
  in_range("data.test_fraction", c.data.test_fraction, 0.0, 1.0, false, true);
  if (!(c.data.val_fraction + c.data.test_fraction < 1.0))
    fail("data.test_fraction", fmt::format("{}", c.data.test_fraction),
         fmt::format("must leave characters to train on: data.val_fraction + data.test_fraction = "
                     "{} must be below 1",
                     c.data.val_fraction + c.data.test_fraction));
  at_least("model.d_model", c.model.d_model, 1);
  at_least("model.n_layers", c.model.n_layers, 1);
  at_least("model.n_heads", c.model.n_heads, 1);
  at_least("model.d_ff", c.model.d_ff, 1);
  at_least("model.seq_len", c.model.seq_len, 1);
  in_range("model.dropout", c.model.dropout, 0.0, 1.0, false, true);
  if (c.model.d_model % c.model.n_heads != 0)
    fail("model.d_model", std::to_string(c.model.d_model),
         fmt::format("must be divisible by model.n_heads = {}", c.model.n_heads));
}

void validate_moe(const Config& c) {
  at_least("moe.n_experts", c.moe.n_experts, 1);
  at_least("moe.every", c.moe.every, 0);
  at_least("moe.d_expert", c.moe.d_expert, 0);
  in_range("moe.capacity_factor", c.moe.capacity_factor, 0.0, kInf, true, true);
  in_range("moe.eval_capacity_factor", c.moe.eval_capacity_factor, 0.0, kInf, true, true);
  in_range("moe.alpha", c.moe.alpha, 0.0, kInf, false, true);
  in_range("moe.z_loss", c.moe.z_loss, 0.0, kInf, false, true);
  in_range("moe.jitter", c.moe.jitter, 0.0, 1.0, false, true);
  in_range("moe.init_scale", c.moe.init_scale, 0.0, kInf, true, true);
  in_range("moe.bias_rate", c.moe.bias_rate, 0.0, kInf, false, true);
  at_least("moe.shared_experts", c.moe.shared_experts, 0);
  at_least("moe.top_k", c.moe.top_k, 1);
  if (c.moe.top_k > c.moe.n_experts)
    fail("moe.top_k", std::to_string(c.moe.top_k),
         fmt::format("must be <= moe.n_experts = {}", c.moe.n_experts));
  if (c.moe.every > c.model.n_layers)
    fail("moe.every", std::to_string(c.moe.every),
         fmt::format("leaves no MoE layer among model.n_layers = {} (use 0 for a dense model)",
                     c.model.n_layers));
}

void validate_train(const Config& c) {
  at_least("train.steps", c.train.steps, 1);
  at_least("train.batch_size", c.train.batch_size, 1);
  in_range("train.lr", c.train.lr, 0.0, kInf, true, true);
  in_range("train.min_lr", c.train.min_lr, 0.0, c.train.lr, false, false);
  at_least("train.warmup", c.train.warmup, 0);
  in_range("train.beta1", c.train.beta1, 0.0, 1.0, false, true);
  in_range("train.beta2", c.train.beta2, 0.0, 1.0, false, true);
  in_range("train.weight_decay", c.train.weight_decay, 0.0, kInf, false, true);
  in_range("train.grad_clip", c.train.grad_clip, 0.0, kInf, false, true);
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
  at_least("dist.expert_parallel", c.dist.expert_parallel, 0);
  in_range("dist.timeout_s", c.dist.timeout_s, 0.0, kInf, true, true);
  at_least("dist.spin_us", c.dist.spin_us, 0);
  if (c.dist.spin_us > 1000000)  // a second of polling per collective is a typo
    fail("dist.spin_us", std::to_string(c.dist.spin_us), "must be <= 1000000");
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
  for (const auto& b : bindings()) {
    std::string pointer = "/" + b.info.key;
    std::replace(pointer.begin(), pointer.end(), '.', '/');
    j[nlohmann::json::json_pointer(pointer)] = b.get(c);
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
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error(
        fmt::format("--set '{}': expected key=value, e.g. --set moe.n_experts=8", assignment));
  const std::string key = assignment.substr(0, eq);
  const std::string text = assignment.substr(eq + 1);
  const Binding* b = find_binding(key);
  if (!b) throw Error(unknown_key_message("--set", key));
  const nlohmann::json v = parse_text(b->info.kind, text);
  if (v.is_null() || !b->set(c, v))
    throw Error(fmt::format("--set {}: '{}' is not {}", key, text, expected(b->info)));
}

void validate(const Config& c) {
  validate_model(c);
  validate_moe(c);
  validate_train(c);
}

int64_t expert_parallel_ranks(const Config& c, int64_t world_size) {
  return c.dist.expert_parallel == 1 ? 1 : world_size;
}

std::string upcycle_mismatch(const Config& dense, const Config& cfg) {
  if (dense.n_moe_layers() > 0)
    return fmt::format(
        "that run is not dense (moe.every = {}); upcycling starts from a dense model, "
        "moe.every = 0",
        dense.moe.every);
  const ModelConfig &a = dense.model, &b = cfg.model;
  const std::vector<std::tuple<const char*, std::string, std::string>> keys = {
      {"model.d_model", std::to_string(a.d_model), std::to_string(b.d_model)},
      {"model.n_layers", std::to_string(a.n_layers), std::to_string(b.n_layers)},
      {"model.n_heads", std::to_string(a.n_heads), std::to_string(b.n_heads)},
      {"model.seq_len", std::to_string(a.seq_len), std::to_string(b.seq_len)},
      {"model.pos_emb", a.pos_emb ? "true" : "false", b.pos_emb ? "true" : "false"},
      {"model.activation", name_of(a.activation), name_of(b.activation)},
      {"model.d_ff", std::to_string(a.d_ff), std::to_string(b.d_ff)}};
  for (const auto& [key, there, here] : keys)
    if (there != here)
      return fmt::format(
          "{} is {} there but {} here; the upcycled model copies the dense one's tensors, so "
          "it must agree (set {}={})",
          key, there, here, key, there);
  if (cfg.expert_width() != a.d_ff)
    return fmt::format(
        "moe.d_expert is {} here: the experts start as copies of the dense FFN, of width "
        "model.d_ff = {} (set moe.d_expert=0)",
        cfg.moe.d_expert, a.d_ff);
  if (cfg.moe.shared_experts != 0)
    return fmt::format(
        "moe.shared_experts = {}: upcycling copies the dense FFN into the routed experts and "
        "has nothing to start shared experts from; set moe.shared_experts=0",
        cfg.moe.shared_experts);
  return "";
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
  if (expert_parallel_ranks(c, W) > 1 && c.n_moe_layers() > 0 &&
      c.moe.strategy != Strategy::Grouped)
    throw Error(fmt::format(
        "config: moe.strategy = {}: expert parallelism over {} ranks computes each rank's "
        "experts grouped; use moe.strategy=grouped, or dist.expert_parallel=1 to replicate the "
        "experts",
        name_of(c.moe.strategy), W));
  if (expert_parallel_ranks(c, W) > 1 && c.n_moe_layers() > 0 && c.moe.n_experts % W != 0)
    throw Error(fmt::format(
        "config: moe.n_experts = {}: must be divisible by the {} expert-parallel ranks (or "
        "set dist.expert_parallel = 1 to replicate the experts)",
        c.moe.n_experts, W));
}

}  // namespace sw
