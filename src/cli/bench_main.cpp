// switch-bench: times the expert computation per strategy against a dense FFN of the same
// active width, and full training steps. CLI wiring and table printing only.
#include <algorithm>
#include <cctype>
#include <functional>
#include <iostream>
#include <map>
#include <numeric>
#include <random>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "bench/bench.h"
#include "bench/memory.h"
#include "model/small_gemm.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/main_guard.h"
#include "util/malloc_tuning.h"

namespace {

using Json = nlohmann::ordered_json;
using Print = std::function<void(const std::string&)>;

struct Args {
  std::vector<int64_t> experts = {1, 4, 8, 32, 128}, tokens = {1024, 4096};
  std::vector<std::string> train_experts = {"1", "8", "64"};
  std::vector<std::string> strategies;  // "dense" and the moe.strategy names
  int64_t d_model = 128, d_ff = 512, top_k = 1, threads = 0, train_steps = 40;
  int reps = 10, warmup = 3, rounds = 1;
  double cf = 1.25;
  int64_t seq_len = 64, n_heads = 4;
  int64_t d_expert = 0, micro_batches = 2;  // training: moe.d_expert, train.micro_batches
  bool json = false, no_layer = false, no_train = false, no_attention = false;
  std::string data = "data/tinyshakespeare.txt";
  std::vector<std::string> expert_gemm = {"dnnl"};
  double bandwidth = 0;  // bytes/s, measured at the start (triad)
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
  app.add_option("--train-experts", a.train_experts,
                 "training rows: expert counts E, or E:F:k for E experts of width F, top-k "
                 "(fine-grained experts; F 0 = d_ff)")
      ->delimiter(',');
  app.add_option("--train-steps", a.train_steps, "training steps per expert count")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  app.add_option("--rounds", a.rounds,
                 "training: every row once per round, rows taking turns in a new order each round "
                 "(medians reported)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--train-d-expert", a.d_expert, "training: moe.d_expert (0: d_ff)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app.add_option("--micro-batches", a.micro_batches, "training: train.micro_batches")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--expert-gemm", a.expert_gemm,
                 "training: the grouped experts' products for few rows per expert, one row "
                 "each of: kernel (AVX-512 where the CPU has it), dnnl (oneDNN's GEMM), blas, "
                 "off (a LibTorch matmul per expert, as before these products)")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::IsMember({"kernel", "dnnl", "blas", "off"}));
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
    all.push_back(sw::to_json(results[i], a.bandwidth));
  }
  auto ms = [&](const std::string& s) {
    return row.count(s) ? fmt::format("{:8.2f}", row.at(s).median_ms) : std::string(8, '-');
  };
  auto ratio = [&](const std::string& x, const std::string& y) {
    return row.count(x) && row.count(y)
               ? fmt::format("{:9.2f}", row.at(x).median_ms / row.at(y).median_ms)
               : std::string(9, '-');
  };
  auto mib = [&](const std::string& s) {
    return row.count(s)
               ? fmt::format("{:7.1f}",
                             (row.at(s).peak_bytes - row.at(s).param_grad_bytes) / 1048576.0)
               : std::string(7, '-');
  };
  std::string times;
  for (const auto& name : all_layer_names())
    times += ms(name) + " ";
  const sw::LayerResult& dropless = row.at("dropless");  // always measured
  const double floor_ms = 1000.0 * sw::layer_floor_bytes(dropless.c) / a.bandwidth;
  out(fmt::format("{:>6} {:>4} | {}{} | {} {} {} | {:8.2f} {:8.2f} | {} {}", T, E, times,
                  ms("dropless"), ratio("grouped", "dense"), ratio("loop", "grouped"),
                  ratio("dropless", "dense"), floor_ms, dropless.median_ms / floor_ms, mib("dense"),
                  mib("dropless")));
}

void layer_table(const Args& a, Json& all, const Print& out) {
  const auto layers = chosen_layers(a.strategies.empty() ? all_layer_names() : a.strategies);
  out(
      fmt::format("\nOne layer, forward + backward, median of {} (ms). d_model {}, d_ff {}, "
                  "top_k {}, capacity factor {}; dense has width d_ff * top_k; 'dropless' is "
                  "grouped with drop_tokens=false. Floor = the dropless layer's expert "
                  "weights read twice and their gradients written once at the triad "
                  "bandwidth. Peak = most MiB allocated during one step, parameter gradients "
                  "excluded.",
                  a.reps, a.d_model, a.d_ff, a.top_k, a.cf));
  std::string head;
  for (const auto& name : all_layer_names())
    head += fmt::format("{:>8} ", name);
  out(fmt::format("{:>6} {:>4} | {}{:>8} | {:>9} {:>9} {:>9} | {:>8} {:>8} | {:>7} {:>7}", "tokens",
                  "E", head, "dropless", "grp/dense", "loop/grp", "dl/dense", "floor", "dl/floor",
                  "peak d", "peak dl"));
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

sw::SmallGemmBackend backend_named(const std::string& name) {
  if (name == "blas") return sw::SmallGemmBackend::Blas;
  if (name == "off") return sw::SmallGemmBackend::Off;
  if (name == "kernel") return sw::SmallGemmBackend::Kernel;
  return sw::SmallGemmBackend::Dnnl;
}

// One training configuration of the table, measured once per round.
struct TrainRow {
  int64_t experts = 0;
  std::string gemm;
  sw::Config cfg;
  std::vector<sw::TrainResult> runs;
  std::vector<double> bandwidths;
  std::string small_gemm;  // what computed the products: small_gemm_name()
};

struct Shape {
  int64_t experts = 1, d_expert = 0, top_k = 1;
};

// "E" (width --train-d-expert, --top-k) or "E:F:k"; throws sw::Error naming the entry.
Shape parse_shape(const std::string& spec, const Args& a) {
  Shape s{0, a.d_expert, a.top_k};
  std::vector<int64_t> parts;
  size_t start = 0;
  try {
    while (true) {
      const size_t colon = spec.find(':', start);
      const std::string part = spec.substr(start, colon - start);
      size_t used = 0;
      if (part.empty() || !std::isdigit(static_cast<unsigned char>(part[0])))
        throw std::invalid_argument(part);
      parts.push_back(std::stoll(part, &used));
      if (used != part.size()) throw std::invalid_argument(part);
      if (colon == std::string::npos) break;
      start = colon + 1;
    }
  } catch (const std::exception&) {
    parts.clear();
  }
  const int64_t most = int64_t{1} << 20;
  if ((parts.size() != 1 && parts.size() != 3) || parts[0] < 1 || parts[0] > most ||
      (parts.size() == 3 && (parts[1] > most || parts[2] < 1 || parts[2] > parts[0])))
    throw sw::Error(fmt::format(
        "--train-experts: '{}' is not an expert count E or E:F:k (1 <= E <= 2^20, width F "
        "<= 2^20 with 0 for d_ff, 1 <= k <= E; e.g. 64 or 64:32:16)",
        spec));
  s.experts = parts[0];
  if (parts.size() == 3) {
    s.d_expert = parts[1];
    s.top_k = parts[2];
  }
  return s;
}

std::vector<TrainRow> train_rows(const Args& a) {
  std::vector<TrainRow> rows;
  for (const std::string& spec : a.train_experts)
    for (const std::string& gemm : a.expert_gemm) {
      const Shape shape = parse_shape(spec, a);
      TrainRow row;
      row.experts = shape.experts;
      row.gemm = gemm;
      sw::Config& cfg = row.cfg;
      cfg.data.path = a.data;
      cfg.moe.n_experts = shape.experts;
      cfg.moe.top_k = std::min(shape.top_k, shape.experts);
      cfg.moe.d_expert = shape.d_expert;
      cfg.train.micro_batches = a.micro_batches;
      cfg.train.steps = a.train_steps;
      cfg.train.warmup = std::min<int64_t>(cfg.train.warmup, a.train_steps);
      cfg.train.eval_every = a.train_steps;
      cfg.train.eval_batches = 1;
      cfg.train.threads = a.threads;
      rows.push_back(row);
    }
  return rows;
}

// The row's medians over its rounds, as one record (floors at the median bandwidth).
Json train_row_json(const TrainRow& row) {
  auto med = [&](double sw::TrainResult::*field) {
    std::vector<double> v;
    for (const auto& r : row.runs)
      v.push_back(r.*field);
    return sw::median(v);
  };
  sw::TrainResult m = row.runs.front();
  m.median_ms = med(&sw::TrainResult::median_ms);
  m.median_forward_ms = med(&sw::TrainResult::median_forward_ms);
  m.median_backward_ms = med(&sw::TrainResult::median_backward_ms);
  m.median_optimizer_ms = med(&sw::TrainResult::median_optimizer_ms);
  m.ms_per_step = med(&sw::TrainResult::ms_per_step);
  m.tokens_per_s = med(&sw::TrainResult::tokens_per_s);
  const double bandwidth = sw::median(row.bandwidths);
  Json j = sw::to_json(m, row.cfg, bandwidth);
  j["expert_gemm"] = row.gemm;
  j["small_gemm"] = row.small_gemm;
  j["triad_bytes_per_s"] = bandwidth;
  j["rounds"] = row.runs.size();
  return j;
}

void train_table(const Args& a, Json& all, const Print& out) {
  out(fmt::format(
      "\nTraining steps of the default model ({} steps each, {} micro-batches, no "
      "checkpoints; every row once per round in a new order, {} rounds, medians); x floor = the "
      "phase's time over the time its least memory traffic takes at the triad "
      "bandwidth (measured before each run):",
      a.train_steps, a.micro_batches, a.rounds));
  std::vector<TrainRow> rows = train_rows(a);
  // Rows take turns, so that the machine's drift hits every row, in a new order each round
  // (the first as given), so that no row always runs after the same one.
  std::vector<size_t> order(rows.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::mt19937 shuffle_rng(1);
  for (int round = 0; round < a.rounds; ++round) {
    if (round > 0) std::shuffle(order.begin(), order.end(), shuffle_rng);
    for (size_t i : order) {
      TrainRow& row = rows[i];
      sw::set_small_gemm_backend(backend_named(row.gemm));
      row.small_gemm = sw::small_gemm_name();
      row.bandwidths.push_back(sw::triad_bandwidth());
      row.runs.push_back(sw::bench_train(row.cfg));
    }
  }
  sw::set_small_gemm_backend(sw::SmallGemmBackend::Dnnl);
  out(
      fmt::format("{:>4} {:>4} {:>3} {:>6} | {:>9} {:>9} {:>10} | {:>8} {:>8} {:>8} | {:>7} "
                  "{:>7} {:>7} | {:>10} {:>10}",
                  "E", "F", "k", "gemm", "median ms", "mean ms", "tokens/s", "forward", "backward",
                  "optim", "x floor", "x floor", "x floor", "params", "active"));
  double base_ms = 0;
  for (const TrainRow& row : rows) {
    const Json j = train_row_json(row);
    all.push_back(j);
    const double ms = j["median_ms"].get<double>(), f = j["median_forward_ms"].get<double>(),
                 b = j["median_backward_ms"].get<double>(),
                 o = j["median_optimizer_ms"].get<double>();
    if (base_ms == 0) base_ms = ms;
    out(fmt::format(
        "{:>4} {:>4} {:>3} {:>6} | {:9.1f} {:9.1f} {:10.0f} | {:8.1f} {:8.1f} {:8.1f} | "
        "{:7.2f} {:7.2f} {:7.2f} | {:>10} {:>10}   ({:.2f}x the first row's step)",
        row.experts, row.cfg.expert_width(), row.cfg.moe.top_k, row.gemm, ms,
        j["mean_ms"].get<double>(), j["tokens_per_s"].get<double>(), f, b, o,
        f / j["floor_forward_ms"].get<double>(), b / j["floor_backward_ms"].get<double>(),
        o / j["floor_optimizer_ms"].get<double>(), j["params_total"].get<int64_t>(),
        j["params_active"].get<int64_t>(), ms / base_ms));
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
    for (const std::string& spec : a.train_experts)
      parse_shape(spec, a);
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
    sw::set_small_gemm_backend(backend_named(a.expert_gemm.front()));  // the layer table's
    a.bandwidth = sw::triad_bandwidth();
    out(
        fmt::format("threads: {}; memory bandwidth (triad): {:.1f} GB/s; small-matrix "
                    "products: {}; allocator: {}",
                    n_threads, a.bandwidth / 1e9, sw::small_gemm_name(), sw::allocator_name()));
    all.push_back({{"kind", "machine"},
                   {"threads", n_threads},
                   {"triad_bytes_per_s", a.bandwidth},
                   {"small_gemm", sw::small_gemm_name()},
                   {"allocator", sw::allocator_name()}});
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
