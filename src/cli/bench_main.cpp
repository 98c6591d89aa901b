// switch-bench: times the expert computation per strategy against a dense FFN of the same
// active width, and full training steps. CLI wiring and table printing only.
#include <functional>
#include <iostream>
#include <map>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "bench/bench.h"
#include "bench/memory.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/main_guard.h"
#include "util/malloc_tuning.h"

namespace {

using Json = nlohmann::ordered_json;
using Print = std::function<void(const std::string&)>;

struct Args {
  std::vector<int64_t> experts = {1, 4, 8, 32, 128}, tokens = {1024, 4096};
  std::vector<int64_t> train_experts = {1, 8, 64};
  std::vector<std::string> strategies;  // "dense" and the moe.strategy names
  int64_t d_model = 128, d_ff = 512, top_k = 1, threads = 0, train_steps = 40;
  int reps = 10, warmup = 3;
  double cf = 1.25;
  int64_t seq_len = 64, n_heads = 4;
  bool json = false, no_layer = false, no_train = false, no_attention = false;
  std::string data = "data/tinyshakespeare.txt";
};

// The layer benchmark's columns: the dense FFN, then every strategy in its table's order.
std::vector<std::string> all_layer_names() {
  std::vector<std::string> names = {"dense"};
  for (const auto& c : sw::choices<sw::Strategy>())
    names.push_back(c.name);
  return names;
}

void add_options(CLI::App& app, Args& a) {
  const auto count = CLI::Range(int64_t{1}, int64_t{1} << 32);
  app.add_option("--experts", a.experts, "expert counts for the layer benchmark")
      ->delimiter(',')
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--tokens", a.tokens, "token counts for the layer benchmark")
      ->delimiter(',')
      ->check(count);
  app.add_option("--strategies", a.strategies,
                 "what to time, of: " + fmt::format("{}", fmt::join(all_layer_names(), ", ")))
      ->delimiter(',');
  app.add_option("--d-model", a.d_model)->capture_default_str()->check(count);
  app.add_option("--d-ff", a.d_ff, "expert width (dense: d_ff * top_k)")
      ->capture_default_str()
      ->check(count);
  app.add_option("--top-k", a.top_k)
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--capacity-factor", a.cf)->capture_default_str()->check(CLI::Range(1e-6, 1e6));
  app.add_option("--seq-len", a.seq_len, "sequence length for the attention benchmark")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--n-heads", a.n_heads, "heads for the attention benchmark")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--reps", a.reps, "timed repetitions (median reported)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  app.add_option("--warmup", a.warmup, "untimed repetitions first")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000000));
  app.add_option("--train-experts", a.train_experts, "expert counts for training steps")
      ->delimiter(',')
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--train-steps", a.train_steps, "training steps per expert count")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  app.add_option("--data", a.data, "text for the training benchmark")->capture_default_str();
  app.add_option("--threads", a.threads, "intra-op threads (0: all cores)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1024}));
  app.add_flag("--no-layer", a.no_layer, "skip the layer benchmark");
  app.add_flag("--no-train", a.no_train, "skip the training benchmark");
  app.add_flag("--no-attention", a.no_attention, "skip the attention benchmark");
  app.add_flag("--json", a.json, "print one JSON array instead of tables");
}

// --strategies as layer cases' strategies (none: dense); throws sw::Error on an unknown name.
std::vector<std::optional<sw::Strategy>> chosen_layers(const std::vector<std::string>& names) {
  std::vector<std::optional<sw::Strategy>> out;
  for (const auto& n : names) {
    if (n == "dense") {
      out.push_back(std::nullopt);
    } else if (auto s = sw::choice_named<sw::Strategy>(n)) {
      out.push_back(*s);
    } else {
      throw sw::Error(fmt::format("--strategies: unknown strategy '{}' ({})", n,
                                  fmt::join(all_layer_names(), " | ")));
    }
  }
  return out;
}

// One row of the layer table: every chosen layer at T tokens and E experts, and the grouped
// strategy without dropping ("dropless").
void layer_row(const Args& a, const std::vector<std::optional<sw::Strategy>>& layers, int64_t T,
               int64_t E, Json& all, const Print& out) {
  std::vector<sw::LayerCase> cases;
  std::vector<std::string> labels;
  auto add = [&](std::optional<sw::Strategy> strategy, bool drop, const std::string& label) {
    sw::LayerCase c;
    c.strategy = strategy;
    c.experts = E;
    c.tokens = T;
    c.d_model = a.d_model;
    c.d_ff = a.d_ff;
    c.top_k = a.top_k;
    c.drop_tokens = drop;
    c.capacity_factor = a.cf;
    cases.push_back(c);
    labels.push_back(label);
  };
  for (const auto& s : layers)
    add(s, true, s ? sw::name_of(*s) : "dense");
  add(sw::Strategy::Grouped, false, "dropless");
  std::map<std::string, sw::LayerResult> row;
  const std::vector<sw::LayerResult> results = sw::bench_layers(cases, a.reps, a.warmup);
  for (size_t i = 0; i < results.size(); ++i) {
    row[labels[i]] = results[i];
    all.push_back(sw::to_json(results[i]));
  }
  auto ms = [&](const std::string& s) {
    return row.count(s) ? fmt::format("{:8.2f}", row[s].median_ms) : std::string(8, '-');
  };
  auto ratio = [&](const std::string& x, const std::string& y) {
    return row.count(x) && row.count(y)
               ? fmt::format("{:9.2f}", row[x].median_ms / row[y].median_ms)
               : std::string(9, '-');
  };
  auto mib = [&](const std::string& s) {
    return row.count(s)
               ? fmt::format("{:7.1f}", (row[s].peak_bytes - row[s].param_grad_bytes) / 1048576.0)
               : std::string(7, '-');
  };
  std::string times;
  for (const auto& name : all_layer_names())
    times += ms(name) + " ";
  out(fmt::format("{:>6} {:>4} | {}{} | {} {} | {} {}", T, E, times, ms("dropless"),
                  ratio("grouped", "dense"), ratio("loop", "grouped"), mib("dense"),
                  mib("dropless")));
}

void layer_table(const Args& a, Json& all, const Print& out) {
  const auto layers = chosen_layers(a.strategies.empty() ? all_layer_names() : a.strategies);
  out(
      fmt::format("\nOne layer, forward + backward, median of {} (ms). d_model {}, d_ff {}, "
                  "top_k {}, capacity factor {}; dense has width d_ff * top_k; 'dropless' is "
                  "grouped with drop_tokens=false. Peak = most MiB allocated during one "
                  "step, parameter gradients excluded.",
                  a.reps, a.d_model, a.d_ff, a.top_k, a.cf));
  std::string head;
  for (const auto& name : all_layer_names())
    head += fmt::format("{:>8} ", name);
  out(fmt::format("{:>6} {:>4} | {}{:>8} | {:>9} {:>9} | {:>7} {:>7}", "tokens", "E", head,
                  "dropless", "grp/dense", "loop/grp", "peak d", "peak dl"));
  for (int64_t T : a.tokens)
    for (int64_t E : a.experts)
      if (a.top_k <= E) layer_row(a, layers, T, E, all, out);
}

void attention_table(const Args& a, Json& all, const Print& out) {
  out(
      fmt::format("\nOne causal self-attention layer with its projections, forward + backward, "
                  "median of {} (ms); seq_len {}, d_model {}, {} heads; 'composed' is the same "
                  "attention from LibTorch ops under autograd.",
                  a.reps, a.seq_len, a.d_model, a.n_heads));
  out(fmt::format("{:>6} | {:>8} {:>8} | {:>14}", "tokens", "fused", "composed", "composed/fused"));
  for (int64_t T : a.tokens) {
    const sw::AttentionResult r =
        sw::bench_attention(T, a.seq_len, a.d_model, a.n_heads, a.reps, a.warmup);
    all.push_back(sw::to_json(r));
    out(fmt::format("{:>6} | {:8.2f} {:8.2f} | {:14.2f}", r.tokens, r.fused_ms, r.composed_ms,
                    r.composed_ms / r.fused_ms));
  }
}

void train_table(const Args& a, Json& all, const Print& out) {
  out(fmt::format("\nTraining steps of the default model ({} steps each, no checkpoints):",
                  a.train_steps));
  out(fmt::format("{:>4} | {:>9} {:>9} {:>10} | {:>8} {:>8} {:>8} | {:>10} {:>10}", "E",
                  "median ms", "mean ms", "tokens/s", "forward", "backward", "optim", "params",
                  "active"));
  double base_tok_s = 0;
  for (int64_t E : a.train_experts) {
    sw::Config cfg;
    cfg.data.path = a.data;
    cfg.moe.n_experts = E;
    cfg.moe.top_k = std::min(a.top_k, E);
    cfg.train.steps = a.train_steps;
    cfg.train.warmup = std::min<int64_t>(cfg.train.warmup, a.train_steps);
    cfg.train.eval_every = a.train_steps;
    cfg.train.eval_batches = 1;
    cfg.train.threads = a.threads;
    const sw::TrainResult r = sw::bench_train(cfg);
    all.push_back(sw::to_json(r, cfg));
    if (base_tok_s == 0) base_tok_s = r.tokens_per_s;
    out(
        fmt::format("{:>4} | {:9.1f} {:9.1f} {:10.0f} | {:8.1f} {:8.1f} {:8.1f} | {:>10} "
                    "{:>10}   ({:.2f}x of E={})",
                    E, r.median_ms, r.ms_per_step, r.tokens_per_s, r.median_forward_ms,
                    r.median_backward_ms, r.median_optimizer_ms, r.params_total, r.params_active,
                    r.tokens_per_s / base_tok_s, a.train_experts.front()));
  }
}

int run(int argc, char** argv) {
  sw::keep_freed_memory();
  CLI::App app{"Benchmark the MoE layer's expert strategies and training steps."};
  Args a;
  add_options(app, a);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  try {  // arguments the parser cannot check
    chosen_layers(a.strategies);
    if (!a.no_attention && a.d_model % a.n_heads != 0)
      throw sw::Error(
          fmt::format("--n-heads {} does not divide --d-model {}", a.n_heads, a.d_model));
  } catch (const sw::Error& e) {
    std::cerr << "switch-bench: error: " << e.what() << std::endl;
    return 2;
  }
  try {
    sw::MemoryTracker::install();
    const int64_t n_threads = sw::configure_threads(a.threads);
    Json all = Json::array();
    const Print out = [&](const std::string& line) {
      if (!a.json) std::cout << line << std::endl;
    };
    out(fmt::format("threads: {}", n_threads));
    if (!a.no_layer) layer_table(a, all, out);
    if (!a.no_attention) attention_table(a, all, out);
    if (!a.no_train) train_table(a, all, out);
    if (a.json) std::cout << all.dump(2) << std::endl;
  } catch (const sw::Error& e) {
    std::cerr << "switch-bench: error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return sw::guarded_main("switch-bench", run, argc, argv);
}
