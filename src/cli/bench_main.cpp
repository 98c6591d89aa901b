// switch-bench: times the expert computation per strategy against a dense FFN of the same
// active width, and full training steps. CLI wiring and table printing only.
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

int run(int argc, char** argv) {
  sw::keep_freed_memory();
  CLI::App app{"Benchmark the MoE layer's expert strategies and training steps."};
  std::vector<int64_t> experts = {1, 4, 8, 32, 128}, tokens = {1024, 4096};
  std::vector<int64_t> train_experts = {1, 8, 64};
  std::vector<std::string> strategies = {"dense", "loop", "capacity", "grouped"};
  int64_t d_model = 128, d_ff = 512, top_k = 1, threads = 0, train_steps = 40;
  int reps = 10, warmup = 3;
  double cf = 1.25;
  int64_t seq_len = 64, n_heads = 4;
  bool json = false, no_layer = false, no_train = false, no_attention = false;
  std::string data = "data/tinyshakespeare.txt";
  app.add_option("--experts", experts, "expert counts for the layer benchmark")
      ->delimiter(',')
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--tokens", tokens, "token counts for the layer benchmark")
      ->delimiter(',')
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 32));
  app.add_option("--strategies", strategies, "strategies to time")->delimiter(',');
  app.add_option("--d-model", d_model)
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 32));
  app.add_option("--d-ff", d_ff, "expert width (dense: d_ff * top_k)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 32));
  app.add_option("--top-k", top_k)
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--capacity-factor", cf)->capture_default_str()->check(CLI::Range(1e-6, 1e6));
  app.add_option("--seq-len", seq_len, "sequence length for the attention benchmark")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--n-heads", n_heads, "heads for the attention benchmark")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--reps", reps, "timed repetitions (median reported)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  app.add_option("--warmup", warmup, "untimed repetitions first")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000000));
  app.add_option("--train-experts", train_experts, "expert counts for training steps")
      ->delimiter(',')
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--train-steps", train_steps, "training steps per expert count")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  app.add_option("--data", data, "text for the training benchmark")->capture_default_str();
  app.add_option("--threads", threads, "intra-op threads (0: all cores)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1024}));
  app.add_flag("--no-layer", no_layer, "skip the layer benchmark");
  app.add_flag("--no-train", no_train, "skip the training benchmark");
  app.add_flag("--no-attention", no_attention, "skip the attention benchmark");
  app.add_flag("--json", json, "print one JSON array instead of tables");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  for (const auto& s : strategies)
    if (s != "dense" && s != "loop" && s != "capacity" && s != "grouped") {
      std::cerr << "switch-bench: error: --strategies: unknown strategy '" << s
                << "' (dense | loop | capacity | grouped)\n";
      return 2;
    }

  try {
    sw::MemoryTracker::install();
    const int64_t n_threads = sw::configure_threads(threads);
    nlohmann::ordered_json all = nlohmann::ordered_json::array();
    auto out = [&](const std::string& line) {
      if (!json) std::cout << line << std::endl;
    };
    out(fmt::format("threads: {}", n_threads));

    if (!no_layer) {
      out(
          fmt::format("\nOne layer, forward + backward, median of {} (ms). d_model {}, d_ff {}, "
                      "top_k {}, capacity factor {}; dense has width d_ff * top_k; 'dropless' is "
                      "grouped with drop_tokens=false. Peak = most MiB allocated during one "
                      "step, parameter gradients excluded.",
                      reps, d_model, d_ff, top_k, cf));
      out(fmt::format("{:>6} {:>4} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>9} {:>9} | {:>7} {:>7}",
                      "tokens", "E", "dense", "loop", "capacity", "grouped", "dropless",
                      "grp/dense", "loop/grp", "peak d", "peak dl"));
      for (int64_t T : tokens) {
        for (int64_t E : experts) {
          if (top_k > E) continue;
          std::vector<sw::LayerCase> cases;
          std::vector<std::string> labels;
          auto add = [&](const std::string& strategy, bool drop, const std::string& label) {
            sw::LayerCase c;
            c.strategy = strategy;
            c.experts = E;
            c.tokens = T;
            c.d_model = d_model;
            c.d_ff = d_ff;
            c.top_k = top_k;
            c.drop_tokens = drop;
            c.capacity_factor = cf;
            cases.push_back(c);
            labels.push_back(label);
          };
          for (const auto& s : strategies)
            add(s, true, s);
          add("grouped", false, "dropless");
          std::map<std::string, sw::LayerResult> row;
          std::vector<sw::LayerResult> results = sw::bench_layers(cases, reps, warmup);
          for (size_t i = 0; i < results.size(); ++i) {
            row[labels[i]] = results[i];
            all.push_back(sw::to_json(results[i]));
          }
          auto ms = [&](const std::string& s) {
            return row.count(s) ? fmt::format("{:8.2f}", row[s].median_ms) : std::string(8, '-');
          };
          auto ratio = [&](const std::string& a, const std::string& b) {
            return row.count(a) && row.count(b)
                       ? fmt::format("{:9.2f}", row[a].median_ms / row[b].median_ms)
                       : std::string(9, '-');
          };
          auto mib = [&](const std::string& s) {
            return row.count(s)
                       ? fmt::format("{:7.1f}",
                                     (row[s].peak_bytes - row[s].param_grad_bytes) / 1048576.0)
                       : std::string(7, '-');
          };
          out(fmt::format("{:>6} {:>4} | {} {} {} {} {} | {} {} | {} {}", T, E, ms("dense"),
                          ms("loop"), ms("capacity"), ms("grouped"), ms("dropless"),
                          ratio("grouped", "dense"), ratio("loop", "grouped"), mib("dense"),
                          mib("dropless")));
        }
      }
    }

    if (!no_attention) {
      if (d_model % n_heads != 0) {
        std::cerr << "switch-bench: error: --n-heads " << n_heads << " does not divide --d-model "
                  << d_model << "\n";
        return 2;
      }
      out(
          fmt::format("\nOne causal self-attention layer with its projections, forward + "
                      "backward, median of {} (ms); seq_len {}, d_model {}, {} heads; 'composed' "
                      "is the same attention from LibTorch ops under autograd.",
                      reps, seq_len, d_model, n_heads));
      out(fmt::format("{:>6} | {:>8} {:>8} | {:>14}", "tokens", "fused", "composed",
                      "composed/fused"));
      for (int64_t T : tokens) {
        const sw::AttentionResult r =
            sw::bench_attention(T, seq_len, d_model, n_heads, reps, warmup);
        all.push_back(sw::to_json(r));
        out(fmt::format("{:>6} | {:8.2f} {:8.2f} | {:14.2f}", r.tokens, r.fused_ms, r.composed_ms,
                        r.composed_ms / r.fused_ms));
      }
    }

    if (!no_train) {
      out(fmt::format("\nTraining steps of the default model ({} steps each, no checkpoints):",
                      train_steps));
      out(fmt::format("{:>4} | {:>9} {:>9} {:>10} | {:>8} {:>8} {:>8} | {:>10} {:>10}", "E",
                      "median ms", "mean ms", "tokens/s", "forward", "backward", "optim", "params",
                      "active"));
      double base_tok_s = 0;
      for (int64_t E : train_experts) {
        sw::Config cfg;
        cfg.data.path = data;
        cfg.moe.n_experts = E;
        cfg.moe.top_k = std::min(top_k, E);
        cfg.train.steps = train_steps;
        cfg.train.warmup = std::min<int64_t>(cfg.train.warmup, train_steps);
        cfg.train.eval_every = train_steps;
        cfg.train.eval_batches = 1;
        cfg.train.threads = threads;
        sw::TrainResult r = sw::bench_train(cfg);
        all.push_back(sw::to_json(r, cfg));
        if (base_tok_s == 0) base_tok_s = r.tokens_per_s;
        out(
            fmt::format("{:>4} | {:9.1f} {:9.1f} {:10.0f} | {:8.1f} {:8.1f} {:8.1f} | {:>10} "
                        "{:>10}   ({:.2f}x of E={})",
                        E, r.median_ms, r.ms_per_step, r.tokens_per_s, r.median_forward_ms,
                        r.median_backward_ms, r.median_optimizer_ms, r.params_total,
                        r.params_active, r.tokens_per_s / base_tok_s, train_experts.front()));
      }
    }
    if (json) std::cout << all.dump(2) << std::endl;
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
