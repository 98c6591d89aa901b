// The binaries as a user meets them: bad input exits non-zero with a message naming the
// problem, and loses nothing.
#include <algorithm>
#include <sstream>

#include <doctest/doctest.h>

#include "helpers.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/metrics.h"

namespace {

const std::string kTrain = SWITCH_TRAIN_BIN;
const std::string kSample = SWITCH_SAMPLE_BIN;

std::string tiny_args(const std::string& out) {
  return " --config " + test::source_path("configs/tiny.json") +
         " --set data.path=" + test::data_path() + " --out " + out;
}

}  // namespace

TEST_CASE("switch-train: a tiny run from the command line, then resume and sample it") {
  const std::string dir = test::scratch_dir("cli_run") + "/run";
  test::CmdResult r = test::run(kTrain + tiny_args(dir) + " --set train.steps=30");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  CHECK(test::contains(r.output, "threads: 2"));
  CHECK(test::contains(r.output, "step 30/30 | loss"));
  CHECK(test::contains(r.output, "tok/s"));

  r = test::run(kTrain + " --out " + dir + " --resume --set train.steps=40 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  CHECK(r.output.empty());  // quiet
  CHECK(test::contains(test::read_file(dir + "/config.json"), "\"steps\": 40"));
  CHECK(test::fs::exists(dir + "/ckpt-000040"));

  r = test::run(kSample + " --run " + dir + " --chars 40 --seed 3 --prompt 'KING:'");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  CHECK(r.output.rfind("KING:", 0) == 0);
  CHECK(r.output.size() == 5 + 40 + 1);
  CHECK(test::run(kSample + " --run " + dir + " --chars 40 --seed 3 --prompt 'KING:'").output ==
        r.output);

  r = test::run(kSample + " --run " + dir + " --prompt 'Ω'");
  CHECK(r.rc == 1);  // a prompt outside the vocabulary
  CHECK(test::contains(r.output, "U+03A9"));
  CHECK(test::contains(r.output, "not in the model's vocabulary"));

  r = test::run(kTrain + " --out " + dir + " --resume --set model.d_model=64");
  CHECK(r.rc == 2);  // a bad configuration
  CHECK(test::contains(r.output, "'model.d_model' cannot change in a resumed run"));
}

TEST_CASE("switch-train: bad keys, values and files exit non-zero naming the problem") {
  const std::string dir = test::scratch_dir("cli_errors");
  struct Case {
    std::string args, expect;
    int rc;  // 2: bad command line or config; 1: an error while running
  };
  test::write_file(dir + "/bad.json", "{\n  \"model\": {\"d_model\": 64,}\n}\n");
  test::write_file(dir + "/typo.json", R"({"moe": {"num_experts": 8}})");
  test::write_file(dir + "/short.txt", "To be, or not to be: that is the question.\n");
  const std::vector<Case> cases = {
      {"--set moe.n_expert=4", "did you mean 'moe.n_experts'", 2},
      {"--set model.d_model=abc", "--set model.d_model: 'abc' is not an integer", 2},
      {"--set moe.capacity_factor=0", "moe.capacity_factor = 0: must be in (0, inf)", 2},
      {"--set moe.n_experts=0", "moe.n_experts = 0: must be >= 1", 2},
      {"--set model.n_heads=5", "must be divisible by model.n_heads = 5", 2},
      {"--set moe.drop_tokens=perhaps", "is not true or false", 2},
      {"--config " + dir + "/bad.json", "bad.json:2:", 2},
      {"--config " + dir + "/typo.json", "unknown config key 'moe.num_experts'", 2},
      {"--config " + dir + "/missing.json", "missing.json", 2},
      {"--set data.path=" + dir + "/nope.txt --out " + dir + "/r1", "nope.txt' does not exist", 1},
      {"--set data.path=" + dir + "/short.txt --out " + dir + "/r2", "model.seq_len = 64", 1},
      {"--resume", "--resume needs --out", 2},
      {"--out " + dir + "/never --resume", "is not a run directory", 2},
      {"--bogus-flag", "bogus", 2},
  };
  for (const auto& c : cases) {
    CAPTURE(c.args);
    test::CmdResult r = test::run(kTrain + " " + c.args + " -q");
    INFO(r.output);
    CHECK(r.rc == c.rc);
    CHECK(test::contains(r.output, c.expect));
  }
  // Runs that failed on their data left no run directory behind to trip over.
  CHECK_FALSE(test::fs::exists(dir + "/r1"));
  CHECK_FALSE(test::fs::exists(dir + "/r2"));
}

TEST_CASE("switch-train: an existing run is not overwritten") {
  const std::string dir = test::scratch_dir("cli_existing") + "/run";
  REQUIRE(test::run(kTrain + tiny_args(dir) + " --set train.steps=10 -q").rc == 0);
  const std::string before = test::read_file(dir + "/metrics.jsonl");
  test::CmdResult r = test::run(kTrain + tiny_args(dir) + " --set train.steps=10 -q");
  CHECK(r.rc == 1);  // a run directory
  CHECK(test::contains(r.output, "already holds a run"));
  CHECK(test::read_file(dir + "/metrics.jsonl") == before);
}

TEST_CASE("switch-train: --list-keys and --print-config") {
  test::CmdResult r = test::run(kTrain + " --list-keys");
  REQUIRE(r.rc == 0);
  for (const auto& k : sw::config_keys())
    CHECK_MESSAGE(test::contains(r.output, k.key), k.key);
  // Each line: the key, its default as JSON (that of configs/default.json), its help.
  const nlohmann::json defaults =
      nlohmann::json::parse(test::read_file(test::source_path("configs/default.json")));
  std::istringstream lines(r.output);
  std::string line;
  size_t n = 0;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string key, value;
    words >> key >> value;
    CAPTURE(line);
    std::string pointer = "/" + key;
    std::replace(pointer.begin(), pointer.end(), '.', '/');
    REQUIRE(defaults.contains(nlohmann::json::json_pointer(pointer)));
    CHECK(nlohmann::json::parse(value) == defaults[nlohmann::json::json_pointer(pointer)]);
    ++n;
  }
  CHECK(n == sw::config_keys().size());
  // stdout is the config alone (a config file); the memory estimate goes to stderr.
  r = test::run("{ " + kTrain + " --print-config 2>/dev/null; }");
  REQUIRE(r.rc == 0);
  CHECK(nlohmann::json::parse(r.output) ==
        nlohmann::json::parse(test::read_file(test::source_path("configs/default.json"))));
  r = test::run("{ " + kTrain + " --print-config --set moe.n_experts=8 2>/dev/null; }");
  CHECK(nlohmann::json::parse(r.output)["moe"]["n_experts"] == 8);
}

TEST_CASE("docs/config.md is what switch-train --list-keys --markdown prints") {
  const test::CmdResult r = test::run("{ " + kTrain + " --list-keys --markdown 2>/dev/null; }");
  REQUIRE(r.rc == 0);
  const std::string doc = test::read_file(test::source_path("docs/config.md"));
  CHECK_MESSAGE(r.output == doc,
                "docs/config.md is stale: regenerate it with 'build/switch-train --list-keys "
                "--markdown > docs/config.md'");
  for (const auto& k : sw::config_keys()) {
    CHECK_MESSAGE(test::contains(doc, "| `" + k.key + "` |"), k.key);
    for (const auto& choice : k.choices)
      CHECK_MESSAGE(test::contains(doc, "`" + choice.first + "`: "), (k.key + " " + choice.first));
  }
  CHECK(test::run(kTrain + " --markdown").rc == 2);  // only with --list-keys
}

TEST_CASE("switch-sample: bad runs and options") {
  const std::string dir = test::scratch_dir("cli_sample");
  test::CmdResult r = test::run(kSample + " --run " + dir + "/none");
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "is not a directory"));
  r = test::run(kSample + " --run " + dir);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "has no complete checkpoint"));
  r = test::run(kSample);
  CHECK(r.rc == 2);
  CHECK(test::contains(r.output, "--run"));
}

TEST_CASE("switch-sample's flags from the command line: greedy, top-k, cache, threads, stats") {
  const std::string dir = test::scratch_dir("cli_sample_flags") + "/run";
  test::CmdResult r = test::run(kTrain + tiny_args(dir) + " --set train.steps=30 -q");
  REQUIRE(r.rc == 0);
  // stdout only: --stats writes to stderr.
  auto sample = [&](const std::string& flags) {
    const test::CmdResult s = test::run("(" + kSample + " --run " + test::quote(dir) +
                                        " --prompt ROMEO: " + flags + " 2>/dev/null)");
    INFO(flags);
    REQUIRE(s.rc == 0);
    return s.output;
  };
  // --temperature 0 takes the most likely character: --top-k 1 does too, whatever the seed.
  const std::string greedy = sample("--temperature 0 --chars 60");
  CHECK(greedy.size() == 6 + 60 + 1);
  CHECK(sample("--top-k 1 --seed 5 --chars 60") == greedy);
  CHECK(sample("--top-k 1 --seed 6 --chars 60") == greedy);
  // --top-k 3 samples among three: other text than greedy and than a full sample, per seed.
  const std::string top3 = sample("--top-k 3 --seed 5 --chars 200");
  CHECK(top3 == sample("--top-k 3 --seed 5 --chars 200"));
  CHECK(top3 != sample("--top-k 3 --seed 6 --chars 200"));
  // --no-cache recomputes the context (it fills and is halved several times at 200
  // characters of context 32) and prints the same text; so do 1 and 2 threads.
  const std::string cached = sample("--seed 9 --chars 200 --temperature 0.8");
  CHECK(sample("--seed 9 --chars 200 --temperature 0.8 --no-cache") == cached);
  CHECK(sample("--seed 9 --chars 200 --temperature 0.8 --threads 1") == cached);
  CHECK(sample("--seed 9 --chars 200 --temperature 0.8 --threads 2") == cached);
  // --stats: a line on stderr, the text on stdout unchanged.
  r = test::run("(" + kSample + " --run " + test::quote(dir) +
                " --prompt ROMEO: --seed 9 --chars 200 --temperature 0.8 --stats 2>&1 >/dev/null)");
  CHECK(r.rc == 0);
  CHECK(test::contains(r.output, "switch-sample: 200 characters in "));
  CHECK(test::contains(r.output, "characters/s (key/value cache)"));
  CHECK(sample("--seed 9 --chars 200 --temperature 0.8 --stats") == cached);
  r = test::run("(" + kSample + " --run " + test::quote(dir) +
                " --chars 50 --no-cache --stats 2>&1 >/dev/null)");
  CHECK(test::contains(r.output, "characters/s (no cache)"));
  // Values the sampler refuses, by name.
  for (const auto& [flag, says] : std::vector<std::pair<std::string, std::string>>{
           {"--temperature=-1", "--temperature -1: must be a finite number >= 0"},
           {"--top-k=-2", "--top-k -2: must be >= 0"},
           {"--chars=-5", "--chars -5: must be >= 0"}}) {
    CAPTURE(flag);
    r = test::run(kSample + " --run " + test::quote(dir) + " " + flag);
    CHECK(r.rc == 1);
    CHECK(test::contains(r.output, says));
  }
}

TEST_CASE("switch-bench: the allocator is named, and jemalloc put in front is found") {
  // glibc by default; with jemalloc preloaded (the recipe in docs/model.md) it is found
  // serving malloc.
  const std::string bench = std::string(SWITCH_BENCH_BIN) + " --no-layer --no-attention --no-train";
  test::CmdResult r = test::run(bench + " --json 2>/dev/null");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  CHECK(nlohmann::json::parse(r.output)[0]["allocator"] == "glibc");
  const char* jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
  if (!test::fs::exists(jemalloc)) {
    MESSAGE("libjemalloc2 is not installed: the preloaded case is not run");
    return;
  }
  r = test::run("LD_PRELOAD=" + std::string(jemalloc) + " " + bench + " --json 2>/dev/null");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  CHECK(nlohmann::json::parse(r.output)[0]["allocator"].get<std::string>().rfind("jemalloc ", 0) ==
        0);
}

TEST_CASE("switch-bench: --json elements carry the documented keys") {
  const std::string kBench = SWITCH_BENCH_BIN;
  test::CmdResult r = test::run(kBench +
                                " --experts 1,4 --tokens 64 --d-model 16 --d-ff 32"
                                " --reps 2 --warmup 1 --train-experts 1,2"
                                " --train-steps 3 --threads 2 --data " +
                                test::data_path() + " --json 2>/dev/null");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  nlohmann::json all = nlohmann::json::parse(r.output);
  REQUIRE(all.is_array());
  // The machine (threads, bandwidth); per (tokens, E): dense, loop, capacity, grouped and
  // grouped dropless; one attention row per token count; then 2 train rows.
  REQUIRE(all.size() == 1 + 2 * 5 + 1 + 2);
  REQUIRE(all[0]["kind"] == "machine");
  CHECK(all[0]["threads"] == 2);
  CHECK(all[0]["triad_bytes_per_s"].get<double>() > 1e8);
  CHECK(all[0]["small_gemm"] == "dnnl (oneDNN)");
  CHECK(all[0]["allocator"] == "glibc");
  all.erase(all.begin());
  std::set<std::string> strategies;
  for (const auto& e : all) {
    if (e["kind"] == "attention") {
      for (const char* key :
           {"tokens", "seq_len", "d_model", "n_heads", "fused_median_ms", "composed_median_ms"})
        CHECK_MESSAGE(e.contains(key), key);
      CHECK(e["tokens"] == 64);
      CHECK(e["d_model"] == 16);
      CHECK(e["fused_median_ms"].get<double>() > 0);
      CHECK(e["composed_median_ms"].get<double>() > 0);
      continue;
    }
    for (const char* key :
         {"kind", "strategy", "experts", "tokens", "d_model", "d_ff", "top_k", "median_ms"})
      CHECK_MESSAGE(e.contains(key), key);
    CHECK(e["median_ms"].get<double>() > 0);
    if (e["kind"] == "layer") {
      for (const char* key : {"drop_tokens", "capacity_factor", "min_ms", "peak_bytes",
                              "param_grad_bytes", "dropped_frac", "floor_ms"})
        CHECK_MESSAGE(e.contains(key), key);
      CHECK(e["min_ms"].get<double>() <= e["median_ms"].get<double>());
      CHECK(e["param_grad_bytes"].get<int64_t>() > 0);
      CHECK(e["dropped_frac"].get<double>() >= 0);
      CHECK(e["dropped_frac"].get<double>() <= 1);
      strategies.insert(e["strategy"].get<std::string>());
      CHECK(e["tokens"] == 64);
      CHECK(e["peak_bytes"].get<int64_t>() > 0);
      CHECK(e["floor_ms"].get<double>() > 0);
    } else {
      CHECK(e["kind"] == "train_step");
      CHECK(e["tokens_per_s"].get<double>() > 0);
      for (const char* key :
           {"mean_ms", "median_forward_ms", "median_backward_ms", "median_optimizer_ms", "steps",
            "rounds", "small_gemm", "triad_bytes_per_s", "params_total", "params_active"})
        CHECK_MESSAGE(e.contains(key), key);
      CHECK(e["steps"] == 3);
      CHECK(e["small_gemm"] == "dnnl (oneDNN)");
      for (const char* key :
           {"mean_ms", "median_forward_ms", "median_backward_ms", "median_optimizer_ms"})
        CHECK_MESSAGE(e[key].get<double>() > 0, key);
      for (const char* key : {"floor_forward_ms", "floor_backward_ms", "floor_optimizer_ms"})
        CHECK_MESSAGE(e[key].get<double>() > 0, key);
      // The floors from the parameter count and the bandwidth measured before the row:
      // the optimizer 7 floats per parameter, the forward one per micro-batch.
      const double params = e["params_total"].get<double>();
      const double per_ms = e["triad_bytes_per_s"].get<double>() / 1000.0;
      CHECK(e["floor_optimizer_ms"].get<double>() == doctest::Approx(7 * 4 * params / per_ms));
      CHECK(e["floor_forward_ms"].get<double>() ==
            doctest::Approx(2 * 4 * params / per_ms));  // 2 micro-batches (the default)
      CHECK(e["floor_backward_ms"].get<double>() == doctest::Approx(3 * 4 * params / per_ms));
      CHECK(e["micro_batches"] == 2);
      CHECK(e["expert_gemm"] == "dnnl");
    }
  }
  CHECK(strategies == std::set<std::string>{"dense", "loop", "capacity", "grouped"});
  CHECK(all[10]["kind"] == "attention");
  CHECK(all[11]["experts"] == 1);
  CHECK(all[12]["experts"] == 2);
  CHECK(all[12]["params_total"].get<int64_t>() > all[11]["params_total"].get<int64_t>());
  // Same active size: only the routers grow, by one output (128 weights + a bias) per layer.
  CHECK(all[12]["params_active"].get<int64_t>() - all[11]["params_active"].get<int64_t>() ==
        4 * (128 + 1));

  r = test::run(kBench + " --strategies magic --no-train");
  CHECK(r.rc == 2);
  CHECK(test::contains(r.output, "unknown strategy 'magic'"));
  for (const char* spec : {"0", "4x", "4:512", "4:512:5", "+8", "4:-1:1", "2097153"}) {
    r = test::run(kBench + " --no-layer --no-attention --train-experts " + spec);
    CAPTURE(spec);
    CHECK(r.rc == 2);
    CHECK(test::contains(r.output, std::string("--train-experts: '") + spec +
                                       "' is not an expert count E or E:F:k"));
  }
  r = test::run(kBench + " --no-layer --no-attention --expert-gemm fast");
  CHECK(r.rc == 2);
  CHECK(test::contains(r.output, "--expert-gemm"));
  r = test::run(kBench + " --no-layer --no-train --d-model 30 --n-heads 4");
  CHECK(r.rc == 2);
  CHECK(test::contains(r.output, "--n-heads 4 does not divide --d-model 30"));
}

TEST_CASE(
    "switch-train: SIGINT or SIGTERM stops after a step with a checkpoint, and resume goes on") {
  const std::string base = test::scratch_dir("cli_signal");
  for (const char* sig : {"INT", "TERM"}) {
    CAPTURE(sig);
    const std::string dir = base + "/run-" + sig;
    test::CmdResult r =
        test::run("(" + kTrain + tiny_args(dir) + " --set train.steps=1000000 -q & pid=$!; " +
                  test::wait_for(dir + "/metrics.jsonl", "\"kind\":\"train\"") + "; kill -" + sig +
                  " $pid; wait $pid; echo rc=$?)");
    INFO(r.output);
    CHECK(
        test::contains(r.output, std::string("rc=") + (sig == std::string("INT") ? "130" : "143")));
    CHECK(test::contains(r.output, std::string("stopped by SIG") + sig + " after step"));
    CHECK(test::contains(r.output, "--resume"));
    CHECK_FALSE(test::fs::exists(dir + "/summary.json"));
    // The checkpoint is the step the run stopped at, and the metrics go no further.
    const int64_t ckpt_step = test::newest_checkpoint_step(dir);
    REQUIRE(ckpt_step > 0);
    CHECK(test::contains(r.output, "after step " + std::to_string(ckpt_step) + ";"));
    int64_t last_metric = 0;
    for (const auto& rec : sw::read_metrics(dir + "/metrics.jsonl"))
      last_metric = std::max<int64_t>(last_metric, rec["step"].get<int64_t>());
    CHECK(last_metric <= ckpt_step);

    r = test::run(kTrain + " --out " + dir +
                  " --resume -q --set train.steps=" + std::to_string(ckpt_step + 10));
    INFO(r.output);
    CHECK(r.rc == 0);
    CHECK(test::fs::exists(dir + "/summary.json"));
  }
}

TEST_CASE("switch-train: a second SIGINT exits at once, before the step and checkpoint end") {
  // Steps of about a second (a wide model), so that the first SIGINT's orderly stop is still
  // waiting for its step when the second arrives. The second is sent once the first has been
  // taken (no longer pending in /proc/PID/status): two pending SIGINTs would merge into one.
  const std::string dir = test::scratch_dir("cli_second_sigint") + "/run";
  const std::string pending = "$(sed -n 's/^ShdPnd:[[:space:]]*//p' /proc/$pid/status)";
  test::CmdResult r =
      test::run("(" + kTrain + tiny_args(dir) +
                " --set model.d_model=1024 --set model.d_ff=4096 --set model.n_heads=8 "
                "--set train.batch_size=32 --set train.log_every=1 --set train.steps=1000000 "
                "--set train.threads=1 -q & pid=$!; " +
                test::wait_for(dir + "/metrics.jsonl", "\"kind\":\"train\"") +
                "; kill -INT $pid; for i in $(seq 1000); do [ \"" + pending +
                "\" = 0000000000000000 ] && break; sleep 0.005; done; kill -INT $pid; wait $pid; "
                "echo rc=$?)");
  INFO(r.output);
  CHECK(test::contains(r.output, "rc=130"));
  // Gone at once: no orderly stop, no checkpoint of a step after the first signal.
  CHECK_FALSE(test::contains(r.output, "stopped by SIGINT"));
  CHECK(test::newest_checkpoint_step(dir) == -1);
}

TEST_CASE("switch-train: killed with SIGKILL again and again, it resumes to the straight run") {
  // Checkpoints every 10 steps; each attempt is killed at a different moment (during a
  // step, an evaluation or a checkpoint write) and the next resumes from what is on disk.
  // Each delay counts from when the attempt opens metrics.jsonl (training starts), not
  // from its launch, so a slow start on a busy machine does not use the delay up.
  const std::string base = test::scratch_dir("cli_kill9");
  const std::string args =
      " --set train.steps=500 --set train.checkpoint_every=10 "
      "--set train.keep_checkpoints=3 --set train.eval_every=50 -q";
  test::CmdResult r = test::run(kTrain + tiny_args(base + "/straight") + args);
  REQUIRE(r.rc == 0);
  const std::string dir = base + "/killed";
  const double delays[] = {0.35, 0.9, 0.5, 1.3, 0.7, 1.1, 0.45};
  int killed = 0;
  for (size_t i = 0; i < sizeof delays / sizeof delays[0]; ++i) {
    const bool started = test::fs::exists(dir + "/config.json");  // else killed too early
    const std::string cmd =
        started ? kTrain + " --out " + dir + " --resume -q" : kTrain + tiny_args(dir) + args;
    const std::string size =
        "$(stat -c %s " + test::quote(dir + "/metrics.jsonl") + " 2>/dev/null || echo none)";
    r = test::run("(s0=" + size + "; " + cmd + " & p=$!; while kill -0 $p 2>/dev/null && [ \"" +
                  size + "\" = \"$s0\" ]; do sleep 0.02; done; sleep " + std::to_string(delays[i]) +
                  "; kill -9 $p 2>/dev/null && echo KILLED; wait $p; echo rc=$?)");
    if (test::contains(r.output, "KILLED") && test::contains(r.output, "rc=137")) ++killed;
    // Whatever moment it died at, the newest checkpoint loads and the metrics parse.
    if (auto ck = sw::newest_checkpoint(dir)) {
      sw::CheckpointMeta meta = sw::read_checkpoint_meta(*ck);
      sw::Transformer m(meta.config, meta.vocab.size());
      sw::load_weights(*ck, *m);
    }
    if (test::fs::exists(dir + "/metrics.jsonl")) sw::read_metrics(dir + "/metrics.jsonl");
    if (test::fs::exists(dir + "/summary.json")) break;  // it finished before the kill
  }
  MESSAGE(killed << " attempts were killed mid-run");
  CHECK(killed >= 3);
  r = test::run(kTrain + " --out " + dir + " --resume -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  CHECK_MESSAGE(test::read_file(base + "/straight/ckpt-000500/model.pt") ==
                    test::read_file(dir + "/ckpt-000500/model.pt"),
                "weights after repeated SIGKILL and resume differ from the straight run");
  // Metrics: one record per step boundary, as in the straight run.
  CHECK(sw::read_metrics(dir + "/metrics.jsonl").size() ==
        sw::read_metrics(base + "/straight/metrics.jsonl").size());
}

TEST_CASE(
    "switch-train: a write that fails (disk full) is an error and the last checkpoint stays") {
  const std::string dir = test::scratch_dir("cli_disk_full") + "/run";
  test::CmdResult r =
      test::run(kTrain + tiny_args(dir) + " --set train.steps=30 --set train.checkpoint_every=30");
  REQUIRE(r.rc == 0);
  // A file-size limit of 64 blocks (32 KiB under dash, popen's /bin/sh, which counts
  // 512-byte blocks; 64 KiB under bash): the next checkpoint's model.pt (about 190 KB)
  // cannot be written, as on a full disk; metrics.jsonl stays below it.
  r = test::run("(ulimit -f 64; " + kTrain + " --out " + dir +
                " --resume -q --set train.steps=60)");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "cannot write '" + dir + "/ckpt-000060.tmp/model.pt.tmp'"));
  CHECK(test::contains(r.output, "File too large"));
  CHECK(sw::newest_checkpoint(dir).value_or("") == dir + "/ckpt-000030");
  CHECK_FALSE(test::fs::exists(dir + "/ckpt-000060.tmp"));
  CHECK(test::run(kSample + " --run " + dir + " --chars 20").rc == 0);
  // With room again, the run goes on from step 30.
  r = test::run(kTrain + " --out " + dir + " --resume -q --set train.steps=60");
  CHECK(r.rc == 0);

  // An output directory that cannot be created.
  r = test::run(kTrain + tiny_args(dir + "/config.json/sub"));
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "cannot create run directory '" + dir + "/config.json/sub'"));
}

TEST_CASE("switch-train: --keep N bounds the checkpoints on disk, also on resume") {
  const std::string dir = test::scratch_dir("cli_keep") + "/run";
  auto checkpoints = [&] {
    int n = 0;
    for (const auto& e : test::fs::directory_iterator(dir))
      n += e.path().filename().string().rfind("ckpt-", 0) == 0 ? 1 : 0;
    return n;
  };
  test::CmdResult r =
      test::run(kTrain + tiny_args(dir) +
                " --set train.steps=40 --set train.checkpoint_every=10 --keep 1 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  CHECK(checkpoints() == 1);
  CHECK(sw::newest_checkpoint(dir).value_or("") == dir + "/ckpt-000040");
  r = test::run(kTrain + " --out " + dir + " --resume --set train.steps=80 --keep 3 -q");
  REQUIRE(r.rc == 0);
  CHECK(checkpoints() == 3);
  CHECK(test::run(kTrain + tiny_args(dir + "2") + " --keep 0").rc == 2);
}

TEST_CASE("switch-train: a second writer of a run is refused naming the holder, who goes on") {
  const std::string dir = test::scratch_dir("cli_two_writers") + "/run";
  const std::string first = kTrain + tiny_args(dir) +
                            " --set train.steps=1000000 --set train.log_every=1 "
                            "--set train.eval_every=1000000 --set train.checkpoint_every=20 -q";
  // The first writer trains; once it has logged a step, two others try the same folder.
  test::CmdResult r =
      test::run("(" + first + " & p=$!; echo first=$p; " +
                test::wait_for(dir + "/metrics.jsonl", "\"kind\":\"train\"") + "; " + kTrain +
                " --out " + dir + " --resume -q; echo resume=$?; " + kTrain + tiny_args(dir) +
                " -q; echo new=$?; " + test::wait_for(dir + "/metrics.jsonl", "\"step\":30,") +
                "; kill -TERM $p; wait $p; echo first_rc=$?)");
  INFO(r.output);
  const size_t at = r.output.find("first=");
  REQUIRE(at != std::string::npos);
  const std::string pid = r.output.substr(at + 6, r.output.find('\n', at) - at - 6);
  CHECK(test::contains(r.output, "resume=1"));
  CHECK(test::contains(r.output, "new=1"));
  // Both refusals name the directory, the holder and what to do.
  const std::string refusal =
      "switch-train: error: run directory '" + dir + "' is in use by pid " + pid + " on host ";
  size_t refusals = 0;
  for (size_t p = r.output.find(refusal); p != std::string::npos; p = r.output.find(refusal, p + 1))
    ++refusals;
  CHECK(refusals == 2);
  CHECK(test::contains(r.output, "(command: " + kTrain + " --config"));
  CHECK(test::contains(r.output, "two processes cannot write one run"));
  // The first writer went on past the refusals, stopped cleanly and left its checkpoint.
  CHECK(test::contains(r.output, "first_rc=143"));
  const auto ck = sw::newest_checkpoint(dir);
  REQUIRE(ck.has_value());
  CHECK(sw::read_checkpoint_meta(*ck).state.step >= 30);
  for (const auto& rec : sw::read_metrics(dir + "/metrics.jsonl"))
    CHECK(rec["step"].get<int64_t>() <= sw::read_checkpoint_meta(*ck).state.step + 1);
  // With the writer gone, the run continues.
  r = test::run(kTrain + " --out " + dir + " --resume -q --set train.steps=" +
                std::to_string(sw::read_checkpoint_meta(*ck).state.step + 5));
  INFO(r.output);
  CHECK(r.rc == 0);
}

TEST_CASE("switch-train: a lock left by a writer killed with SIGKILL blocks nobody") {
  const std::string dir = test::scratch_dir("cli_lock_kill9") + "/run";
  const std::string first = kTrain + tiny_args(dir) +
                            " --set train.steps=1000000 --set train.log_every=1 "
                            "--set train.eval_every=1000000 --set train.checkpoint_every=5 -q";
  test::CmdResult r =
      test::run("(" + first + " & p=$!; " + test::wait_for(dir + "/metrics.jsonl", "\"step\":6,") +
                "; kill -KILL $p; wait $p; echo rc=$?)");
  INFO(r.output);
  REQUIRE(test::contains(r.output, "rc=137"));
  REQUIRE(test::fs::exists(dir + "/.lock"));  // the file stays; the kernel dropped the lock
  CHECK(test::contains(test::read_file(dir + "/.lock"), "\"pid\":"));
  r = test::run(kTrain + " --out " + dir + " --resume -q --set train.steps=12");
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::fs::exists(dir + "/summary.json"));
}

TEST_CASE("switch-train: a planted .lock link or folder is refused, nothing outside is touched") {
  const std::string base = test::scratch_dir("cli_lock_planted");
  const std::string dir = base + "/run";
  test::fs::create_directories(dir);
  test::fs::create_symlink(base + "/outside", dir + "/.lock");
  test::CmdResult r = test::run(kTrain + tiny_args(dir) + " --set train.steps=5 -q");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output,
                       "cannot lock run directory '" + dir + "': cannot open '" + dir + "/.lock'"));
  CHECK_FALSE(test::fs::exists(base + "/outside"));  // the link was not followed
  CHECK_FALSE(test::fs::exists(dir + "/config.json"));
  test::fs::remove(dir + "/.lock");
  test::fs::create_directory(dir + "/.lock");
  r = test::run(kTrain + tiny_args(dir) + " --set train.steps=5 -q");
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "cannot lock run directory"));
}

TEST_CASE("switch-train: a model that cannot fit is refused before anything is allocated") {
  const std::string base = test::scratch_dir("cli_too_big");
  for (const std::string nproc : {"", " --nproc 2"}) {
    CAPTURE(nproc);
    const std::string dir = base + "/run" + (nproc.empty() ? "1" : "2");
    test::CmdResult r =
        test::run(kTrain + tiny_args(dir) + " --set model.d_model=4000000000 -q" + nproc);
    INFO(r.output);
    CHECK(r.rc == 2);
    CHECK(test::contains(r.output, "error: the run does not fit in memory: it needs about "));
    CHECK(test::contains(r.output, "this process may use "));
    CHECK(test::contains(r.output, "Lower model.d_model (4000000000)"));
    CHECK_FALSE(test::contains(r.output, "frame #"));
    CHECK_FALSE(test::fs::exists(dir));
  }
  // The same estimate, printed with the config (on stderr: stdout stays a config file).
  test::CmdResult r = test::run("{ " + kTrain + " --print-config 2>/dev/null; }");
  CHECK(nlohmann::json::parse(r.output).is_object());
  r = test::run("{ " + kTrain + " --print-config --set data.path=" + test::data_path() +
                " 2>&1 >/dev/null; }");
  CHECK(test::contains(r.output, "memory: about "));
  CHECK(test::contains(r.output, "(parameters "));
  CHECK(test::contains(r.output, "this process may use "));
}

TEST_CASE("every binary: an unexpected LibTorch error is one line and exit 3, details on request") {
  const std::string base = test::scratch_dir("cli_one_line");
  // Allocations past what the process may map, through each binary that computes.
  const std::string bench = std::string(SWITCH_BENCH_BIN) +
                            " --no-train --no-attention --experts 1 --strategies "
                            "dense --reps 1 --warmup 0 --tokens 1 --d-model 100000 --d-ff 1000000";
  const std::string run = base + "/run";
  REQUIRE(test::run(kTrain + tiny_args(run) + " --set train.steps=2 -q").rc == 0);
  // A checkpoint whose config asks for a model far past the memory: refused before it is
  // built. One of ~2 GiB of weights passes that check and meets a 3 GB address-space limit.
  const auto ck = sw::newest_checkpoint(run);
  REQUIRE(ck.has_value());
  nlohmann::json state = nlohmann::json::parse(test::read_file(*ck + "/state.json"));
  REQUIRE(state["config"]["model"]["d_model"] == 32);
  state["config"]["model"]["d_model"] = 1600000000;
  test::write_file(*ck + "/state.json", state.dump());
  test::CmdResult refused = test::run(kSample + " --run " + run + " --chars 1");
  INFO(refused.output);
  CHECK(refused.rc == 1);
  CHECK(test::contains(refused.output, "the checkpoint's model does not fit in memory"));
  refused = test::run(std::string(SWITCH_EVAL_BIN) + " --run " + run);
  CHECK(refused.rc == 1);
  CHECK(test::contains(refused.output, "the checkpoint's model does not fit in memory"));
  state["config"]["model"]["d_model"] = 8192;
  test::write_file(*ck + "/state.json", state.dump());
  const std::string sample = "ulimit -v 3000000; " + kSample + " --run " + run + " --chars 1";
  const std::string eval = "ulimit -v 3000000; " + std::string(SWITCH_EVAL_BIN) + " --run " + run;
  // A model the memory check lets through (~2 GiB of weights) under a 3 GB address-space
  // limit the check does not read. One micro-batch: on a busy machine an OpenMP thread's
  // first LibTorch operation, near the limit, can hang LibTorch's thread-pool start-up
  // (pthreadpool waits for a thread that could not start), which is not what this tests.
  const std::string train = "ulimit -v 3000000; " + kTrain + tiny_args(base + "/big") +
                            " --set model.d_model=8192 --set model.n_heads=8 --set moe.every=0 "
                            "--set train.steps=2 --set train.micro_batches=1 -q";
  for (const std::string& cmd : {bench, sample, eval, train}) {
    CAPTURE(cmd);
    test::CmdResult r = test::run("{ " + cmd + " 2>&1 >/dev/null; }");
    INFO(r.output);
    CHECK(r.rc == 3);
    CHECK(test::contains(r.output, ": internal error: "));
    CHECK(test::contains(r.output, "(SWITCH_DEBUG=1 shows the details)"));
    CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
    test::fs::remove_all(base + "/big");
    r = test::run("{ export SWITCH_DEBUG=1; " + cmd + " 2>&1 >/dev/null; }");
    CHECK(r.rc == 3);
    CHECK(std::count(r.output.begin(), r.output.end(), '\n') > 1);
    test::fs::remove_all(base + "/big");
  }
  // switch-sweep computes nothing; a file-system failure of its own is one line too.
  const std::string sweep_file = base + "/sweep.json";
  test::write_file(sweep_file, "{}");
  test::CmdResult r = test::run("{ " + std::string(SWITCH_SWEEP_BIN) + " " + sweep_file +
                                " --out /dev/null/x 2>&1 >/dev/null; }");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "switch-sweep: error: "));
  CHECK(test::contains(r.output, "/dev/null/x"));
  CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
}
