// Sweeps: grid expansion and naming, validation of every point before anything runs, and
// switch-sweep end to end (skip on rerun, resume of an interrupted point, rerun of a
// changed one, the summary against the runs' own summaries, the pictures).
#include <algorithm>
#include <thread>

#include <doctest/doctest.h>

#include "helpers.h"
#include "sweep/runner.h"
#include "sweep/sweep.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "util/process.h"

namespace {

const std::string kSweep = SWITCH_SWEEP_BIN;

sw::Sweep parse(const std::string& text) {
  return sw::parse_sweep(text, "sweep.json", test::source_path("configs"));
}

// A sweep file of tiny runs in `dir`.
std::string tiny_sweep(const std::string& dir, const std::string& grid, int64_t steps = 20,
                       const std::string& extra_set = "") {
  const std::string path = dir + "/sweep.json";
  test::write_file(path, R"({"base": ")" + test::source_path("configs/tiny.json") +
                             R"(", "set": {"data.path": ")" + test::data_path() +
                             R"(", "train.steps": )" + std::to_string(steps) +
                             R"(, "train.eval_every": 10, "train.checkpoint_every": 10)" +
                             extra_set + R"(}, "grid": )" + grid + "}");
  return path;
}

}  // namespace

TEST_CASE("sweep: variants x grid x seeds, in order, with readable names") {
  sw::Sweep s = parse(R"({
    "base": "tiny.json",
    "set": {"train.steps": 7},
    "grid": {"moe.capacity_factor": [1.0, 2.0, 1.25], "moe.drop_tokens": [true, false]},
    "variants": [{"name": "dense", "set": {"moe.every": 0}}, {"name": "switch"}],
    "seeds": [1, 2]
  })");
  REQUIRE(s.points.size() == 2 * 3 * 2 * 2);
  CHECK(s.grid_keys == std::vector<std::string>{"moe.capacity_factor", "moe.drop_tokens"});
  CHECK(s.points[0].name == "dense_capacity_factor-1.0_drop_tokens-true_seed-1");
  CHECK(s.points[1].name == "dense_capacity_factor-1.0_drop_tokens-true_seed-2");
  CHECK(s.points[2].name == "dense_capacity_factor-1.0_drop_tokens-false_seed-1");
  CHECK(s.points[4].name == "dense_capacity_factor-2.0_drop_tokens-true_seed-1");
  CHECK(s.points[23].name == "switch_capacity_factor-1.25_drop_tokens-false_seed-2");
  const sw::Config& c = s.points[23].config;
  CHECK(c.moe.capacity_factor == 1.25);
  CHECK_FALSE(c.moe.drop_tokens);
  CHECK(c.train.seed == 2);
  CHECK(c.train.steps == 7);     // "set" reaches every point
  CHECK(c.model.d_model == 32);  // the base file, found beside the sweep file
  CHECK(c.moe.every == 1);       // the switch variant keeps the base
  CHECK(s.points[0].config.moe.every == 0);
  CHECK(s.points[23].overrides.dump() ==
        R"({"moe.capacity_factor":1.25,"moe.drop_tokens":false,"train.seed":2})");
  CHECK(s.points[0].overrides.dump() ==
        R"({"moe.every":0,"moe.capacity_factor":1.0,"moe.drop_tokens":true,"train.seed":1})");

  // No grid, variants or seeds: one point on the built-in defaults.
  sw::Sweep one = parse("{}");
  REQUIRE(one.points.size() == 1);
  CHECK(one.points[0].name == "base");
  CHECK(sw::to_json(one.points[0].config) == sw::to_json(sw::Config{}));
  // An inline base and string values.
  sw::Sweep inl =
      parse(R"({"base": {"model": {"d_model": 64}}, "grid": {"moe.drop_policy": ["position"]}})");
  CHECK(inl.points[0].name == "drop_policy-position");
  CHECK(inl.points[0].config.model.d_model == 64);
}

TEST_CASE("sweep: every point is validated first, errors name the point and the key") {
  struct Case {
    std::string text, message;
  };
  const std::vector<Case> cases = {
      {R"({"grid": {"moe.capacity_factor": [1.0, 2.0, 0.0], "moe.drop_tokens": [true, false]}})",
       "sweep.json: point 5 (capacity_factor-0.0_drop_tokens-true): config: "
       "moe.capacity_factor = 0: must be in (0, inf)"},
      {R"({"grid": {"moe.n_expert": [2]}})",
       "sweep.json: point 1 (n_expert-2): unknown config key 'moe.n_expert' (did you mean "
       "'moe.n_experts'?)"},
      {R"({"grid": {"moe.n_experts": ["four"]}})", "moe.n_experts"},
      {R"({"grid": {"moe.n_experts": []}})",
       "sweep.json: grid key 'moe.n_experts' needs a non-empty list of values"},
      {R"({"grids": {}})",
       "sweep.json: unknown sweep key 'grids' (known: base, set, grid, variants, seeds)"},
      {R"({"variants": [{"name": "a"}, {"name": "a"}]})",
       "sweep.json: variants[1]: name 'a' is used twice"},
      {R"({"variants": [{"name": "a/b"}]})", "name 'a/b' must be letters, digits"},
      {R"({"variants": [{"set": {}}]})", "variants[0]: needs a \"name\""},
      {R"({"seeds": [1, -2]})", "seed -2 is not a non-negative integer"},
      {R"({"base": "no-such-file.json"})", "no-such-file.json"},
      {R"({"base": 3})", "'base' must be a config file path or a config object"},
      {"{\n  \"grid\": {\"moe.top_k\": [1,]}\n}", "sweep.json:2:"},
      {R"({"set": {"model.n_heads": 3}})",
       "model.d_model = 128: must be divisible by "
       "model.n_heads = 3"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.text);
    const std::string msg = test::error_of([&] { parse(c.text); });
    CHECK_MESSAGE(test::contains(msg, c.message), msg);
  }
}

TEST_CASE("sweep: every bundled sweep file loads, each point valid") {
  int n = 0;
  for (const auto& entry : test::fs::directory_iterator(test::source_path("configs/sweeps"))) {
    if (entry.path().extension() != ".json") continue;
    CAPTURE(entry.path().string());
    sw::Sweep s;
    CHECK_NOTHROW(s = sw::load_sweep(entry.path().string()));
    CHECK(s.points.size() >= 2);
    ++n;
  }
  CHECK(n >= 3);
}

TEST_CASE("switch-sweep: a bad point fails before anything runs, --dry-run lists the points") {
  const std::string dir = test::scratch_dir("sweep_bad");
  const std::string file = tiny_sweep(dir, R"({"moe.capacity_factor": [1.0, 2.0, -1.0]})");
  test::CmdResult r = test::run(kSweep + " " + file + " --out " + dir + "/out");
  INFO(r.output);
  CHECK(r.rc == 2);
  CHECK(test::contains(r.output, "point 3 (capacity_factor--1.0): config: moe.capacity_factor"));
  CHECK_FALSE(test::fs::exists(dir + "/out"));

  const std::string good = tiny_sweep(dir, R"({"moe.n_experts": [2, 4], "moe.top_k": [1, 2]})");
  r = test::run(kSweep + " " + good + " --out " + dir + "/out --dry-run");
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::contains(r.output, "4 points"));
  CHECK(test::contains(r.output, "n_experts-4_top_k-2"));
  CHECK_FALSE(test::fs::exists(dir + "/out"));
}

TEST_CASE("switch-sweep: runs, summary, skip on rerun, resume, rerun of what changed, plots") {
  const std::string dir = test::scratch_dir("sweep_run");
  const std::string out = dir + "/out";
  std::string file = tiny_sweep(dir, R"({"moe.capacity_factor": [1.0, 2.0]})");
  test::CmdResult r = test::run(kSweep + " " + file + " --out " + out + " --jobs 2");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  const unsigned half = std::max(1u, std::thread::hardware_concurrency() / 2);
  CHECK(test::contains(r.output, "capacity_factor-1.0: training (" + std::to_string(half) +
                                     " thread"));  // the cores shared by the 2 jobs

  // The summary's numbers are the runs' own.
  const auto summary = nlohmann::json::parse(test::read_file(out + "/summary.json"));
  REQUIRE(summary["points"].size() == 2);
  for (const auto& p : summary["points"]) {
    const std::string run = out + "/" + p["point"].get<std::string>();
    const auto own = nlohmann::json::parse(test::read_file(run + "/summary.json"));
    CHECK(p["status"] == "done");
    CHECK(p["final_val_loss"] == own["final_val_loss"]);
    CHECK(p["best_val_loss"] == own["best_val_loss"]);
    CHECK(p["tokens_per_s"] == own["tokens_per_s"]);
    double drop = 0, steps = 0;
    for (const auto& rec : sw::read_metrics(run + "/metrics.jsonl"))
      if (rec["kind"] == "train") {
        drop += rec["drop_frac"].get<double>() * rec["steps_in_record"].get<double>();
        steps += rec["steps_in_record"].get<double>();
      }
    CHECK(p["drop_frac"].get<double>() == doctest::Approx(drop / steps));
    CHECK(p["load_cv"].get<double>() >= 0);
  }
  CHECK(summary["points"][0]["best_val_loss"] <= summary["points"][1]["best_val_loss"]);
  // Equal wall time is the shorter run's: it is read there at its last eval, and the other
  // at its newest eval by that time, as its metrics say.
  const double equal_s = summary["equal_time_s"].get<double>();
  CHECK(equal_s == std::min(summary["points"][0]["wall_s"].get<double>(),
                            summary["points"][1]["wall_s"].get<double>()));
  for (const auto& p : summary["points"]) {
    const std::string run = out + "/" + p["point"].get<std::string>();
    nlohmann::json last;
    for (const auto& rec : sw::read_metrics(run + "/metrics.jsonl"))
      if (rec["kind"] == "eval" && rec["time_s"].get<double>() <= equal_s) last = rec;
    if (last.is_null()) {  // a slower run with no eval yet by then (a loaded machine)
      CHECK(p["val_at_equal_time"].is_null());
      CHECK(p["wall_s"].get<double>() > equal_s);
      continue;
    }
    CHECK(p["val_at_equal_time"] == last["val_loss"]);
    CHECK(p["step_at_equal_time"] == last["step"]);
    if (p["wall_s"].get<double>() == equal_s) CHECK(p["val_at_equal_time"] == p["final_val_loss"]);
  }
  const std::string md = test::read_file(out + "/summary.md");
  CHECK(test::contains(md, "| moe.capacity_factor |"));
  CHECK(test::contains(test::read_file(out + "/summary.csv"),
                       "point,status,moe.capacity_factor,best_val_loss"));

  // Pictures: non-empty PNGs for the sweep and for each run.
  for (const std::string png :
       {"/plots/val_loss.png", "/plots/train_loss.png", "/capacity_factor-1.0/plots/loss.png",
        "/capacity_factor-1.0/plots/expert_load.png", "/capacity_factor-2.0/plots/dropped.png"}) {
    CAPTURE(png);
    REQUIRE(test::fs::exists(out + png));
    CHECK(test::read_file(out + png).substr(1, 3) == "PNG");
    CHECK(test::fs::file_size(out + png) > 5000);
  }

  // Again: nothing to do.
  r = test::run(kSweep + " " + file + " --out " + out + " --no-plot");
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::contains(r.output, "[1/2] capacity_factor-1.0: already done, skipped"));
  CHECK(test::contains(r.output, "[2/2] capacity_factor-2.0: already done, skipped"));

  // An interrupted point (its last checkpoint and summary gone) resumes and ends where the
  // straight run ended.
  const std::string run2 = out + "/capacity_factor-2.0";
  const std::string straight = test::read_file(run2 + "/ckpt-000020/model.pt");
  test::fs::remove_all(run2 + "/ckpt-000020");
  test::fs::remove(run2 + "/summary.json");
  r = test::run(kSweep + " " + file + " --out " + out + " --no-plot");
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::contains(r.output, "[1/2] capacity_factor-1.0: already done, skipped"));
  CHECK(test::contains(r.output, "[2/2] capacity_factor-2.0: resuming from its checkpoint"));
  CHECK(test::read_file(run2 + "/ckpt-000020/model.pt") == straight);

  // A changed grid: the new point runs, the unchanged one is kept.
  file = tiny_sweep(dir, R"({"moe.capacity_factor": [1.0, 1.5]})");
  r = test::run(kSweep + " " + file + " --out " + out + " --no-plot");
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::contains(r.output, "[1/2] capacity_factor-1.0: already done, skipped"));
  CHECK(test::contains(r.output, "[2/2] capacity_factor-1.5: training"));
  // A changed base: the point's old run is moved aside, not overwritten, and rerun.
  file = tiny_sweep(dir, R"({"moe.capacity_factor": [1.0]})", 20, R"(, "moe.alpha": 0.02)");
  r = test::run(kSweep + " " + file + " --out " + out + " --no-plot");
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::contains(r.output, "capacity_factor-1.0: its directory held another config"));
  CHECK(test::fs::is_directory(out + "/.stale"));

  // --summary rewrites the table without training.
  test::fs::remove(out + "/summary.md");
  r = test::run(kSweep + " " + file + " --out " + out + " --summary --no-plot");
  CHECK(r.rc == 0);
  CHECK(test::fs::exists(out + "/summary.md"));
}

TEST_CASE("switch-sweep: an expert-count sweep with a dense point gets its curve") {
  const std::string dir = test::scratch_dir("sweep_experts");
  const std::string out = dir + "/out";
  std::string file = tiny_sweep(dir, R"({"moe.n_experts": [2, 4]})");
  // The grid and a dense variant in one file: variants x grid, so dense runs at each E, and
  // the curve reads moe.every = 0 as one expert whatever moe.n_experts says.
  std::string text = test::read_file(file);
  text.insert(text.rfind('}'),
              R"(, "variants": [{"name": "dense", "set": {"moe.every": 0}}, {"name": "switch"}])");
  test::write_file(file, text);
  test::CmdResult r = test::run(kSweep + " " + file + " --out " + out + " --jobs 2");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  const auto summary = nlohmann::json::parse(test::read_file(out + "/summary.json"));
  REQUIRE(summary["points"].size() == 4);
  int at_equal = 0;  // the shortest run has one; a slower one may have no eval by then
  for (const auto& p : summary["points"])
    if (p["wall_s"] == summary["equal_time_s"]) at_equal += p["val_at_equal_time"].is_number();
  CHECK(at_equal >= 1);
  CHECK(test::contains(test::read_file(out + "/summary.md"), "params active / total"));
  CHECK(test::contains(r.output, "plots/experts.png"));
  REQUIRE(test::fs::exists(out + "/plots/experts.png"));
  CHECK(test::fs::file_size(out + "/plots/experts.png") > 5000);
}

TEST_CASE("sweep: an upcycled variant starts from its dense variant's point of the same seed") {
  const sw::Sweep s = parse(R"({"variants": [{"name": "dense", "set": {"moe.every": 0}},
      {"name": "switch"}, {"name": "up", "init_from": "dense"}], "seeds": [1, 2]})");
  REQUIRE(s.points.size() == 6);
  CHECK(s.points[4].name == "up_seed-1");
  CHECK(s.points[4].init_from == 0);
  CHECK(s.points[5].init_from == 1);
  CHECK(s.points[0].init_from == -1);
  CHECK(test::contains(test::error_of([] {
                         parse(R"({"variants": [{"name": "up", "init_from": "dense"},
                                    {"name": "dense"}]})");
                       }),
                       "sweep.json: variants[0]: \"init_from\" must name an earlier variant"));
  CHECK(test::contains(test::error_of([] {
                         parse(R"({"variants": [{"name": "a"}, {"name": "b", "init_from": "a"}]})");
                       }),
                       "point 2 (b) cannot upcycle 'a': that run is not dense (moe.every = 1)"));

  // End to end: the upcycled point runs after its source, from its last checkpoint, and
  // starts at the dense run's loss, not a fresh model's.
  const std::string dir = test::scratch_dir("sweep_upcycle");
  std::string file = tiny_sweep(dir, R"({"moe.n_experts": [4]})");
  std::string text = test::read_file(file);
  text.insert(text.rfind('}'), R"(, "variants": [{"name": "dense", "set": {"moe.every": 0}},
                                 {"name": "up", "init_from": "dense"}])");
  test::write_file(file, text);
  test::CmdResult r = test::run(kSweep + " " + file + " --out " + dir + "/out --jobs 2 --no-plot");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  const auto dense = sw::read_metrics(dir + "/out/dense_n_experts-4/metrics.jsonl");
  const auto up = sw::read_metrics(dir + "/out/up_n_experts-4/metrics.jsonl");
  REQUIRE(!up.empty());
  CHECK(up.front()["ce"].get<double>() < dense.front()["ce"].get<double>() - 0.3);
}

TEST_CASE("switch-sweep: SIGINT stops the running point with a checkpoint, a rerun resumes it") {
  const std::string dir = test::scratch_dir("sweep_sigint");
  const std::string out = dir + "/out";
  const std::string file =
      tiny_sweep(dir, R"({"moe.capacity_factor": [1.0]})", 1000000,
                 R"(, "train.checkpoint_every": 1000000, "train.eval_every": 1000000)");
  test::CmdResult r =
      test::run("(" + kSweep + " " + file + " --out " + out + " --no-plot & p=$!; " +
                test::wait_for(out + "/capacity_factor-1.0/metrics.jsonl", "\"kind\":\"train\"") +
                "; kill -INT $p; wait $p; echo rc=$?)");
  INFO(r.output);
  CHECK(test::contains(r.output, "rc=130"));
  CHECK(test::contains(r.output, "stopped with a checkpoint"));
  CHECK(test::contains(r.output, "switch-sweep: stopped by SIGINT"));
  CHECK(sw::newest_checkpoint(out + "/capacity_factor-1.0").has_value());
  r = test::run(kSweep + " " + file + " --out " + out + " --dry-run");
  CHECK(test::contains(r.output, "capacity_factor-1.0"));
  CHECK(test::contains(r.output, "resume"));
}

TEST_CASE("run_program: no shell between, the status and stderr come back, a missing program") {
  // An argument full of shell syntax reaches the program as it is, one argument.
  const std::string word = "it's \"q\" $(touch pwned); `x` | é";
  sw::ProgramResult r =
      sw::run_program({"sh", "-c", "printf %s \"$1\" >&2; exit 3", "sh", word}, true);
  CHECK(r.exit_code == 3);
  CHECK(r.signal == 0);
  CHECK_FALSE(r.ok());
  CHECK(r.err == word);
  CHECK(r.describe() == "exited with status 3: " + word);
  r = sw::run_program({"sh", "-c", "kill -9 $$"}, true);
  CHECK(r.signal == 9);
  CHECK(test::contains(r.describe(), "was killed by signal 9"));
  CHECK(sw::run_program({"true"}, true).ok());
  // A process the child leaves behind holding its stderr does not keep the caller waiting.
  const std::string done = test::scratch_dir("run_program") + "/done";
  r = sw::run_program({"sh", "-c", "(sleep 20; touch \"$1\") & echo left >&2; exit 4", "sh", done},
                      true);
  CHECK_FALSE(test::fs::exists(done));  // returned while the process it left still runs
  CHECK(r.exit_code == 4);
  CHECK(r.err == "left\n");
  const std::string msg = test::error_of([] {
    sw::run_program({"no-such-program-switch-test", "a"}, true);
  });
  CHECK(test::contains(msg, "cannot start 'no-such-program-switch-test'"));
}

TEST_CASE(
    "switch-sweep: a folder named with quotes, $(...), a leading dash and non-ASCII runs nothing") {
  const std::string dir = test::scratch_dir("sweep_odd_name");
  const std::string file = tiny_sweep(dir, R"({"moe.capacity_factor": [1.0]})", 10,
                                      R"(, "train.checkpoint_every": 10, "train.eval_every": 10)");
  // Were the name ever handed to a shell, one of these would create a sentinel file.
  const std::string name =
      "-it's \"q\" $(touch pwned1); touch pwned2 ; `touch pwned3` | touch pwned4 & $HOME é ü";
  const test::CmdResult r = test::run("cd " + test::quote(dir) + " && " + kSweep +
                                      " sweep.json --out=" + test::quote(name));
  INFO(r.output);
  CHECK(r.rc == 0);
  const std::string out = dir + "/" + name;
  CHECK(test::fs::exists(out + "/capacity_factor-1.0/summary.json"));
  CHECK(test::fs::exists(out + "/summary.md"));
  CHECK(test::fs::exists(out + "/plots/val_loss.png"));
  CHECK(test::fs::exists(out + "/capacity_factor-1.0/plots/loss.png"));
  CHECK_FALSE(test::contains(r.output, "plotting failed"));
  for (const char* sentinel : {"pwned1", "pwned2", "pwned3", "pwned4"})
    for (const std::string& where : {dir, out, test::fs::current_path().string()}) {
      CAPTURE(where + "/" + sentinel);
      CHECK_FALSE(test::fs::exists(where + "/" + sentinel));
    }
}

TEST_CASE("sweep: point names stay one folder inside the sweep, and within NAME_MAX") {
  // Values are filtered to letters, digits, '.', '-', '+': no '/', no NUL, never "..".
  sw::Sweep s = parse(R"({"grid": {"data.path": ["../../etc", "a/../../b", "..", "/"]},
                          "set": {"train.steps": 1}})");
  REQUIRE(s.points.size() == 4);
  CHECK(s.points[0].name == "path-....etc");
  CHECK(s.points[1].name == "path-a....b");
  CHECK(s.points[2].name == "path-..");
  CHECK(s.points[3].name == "path-x");
  for (const auto& p : s.points) {
    CHECK(test::fs::path(p.name).filename() == p.name);
    CHECK(p.name.find('/') == std::string::npos);
  }
  // Variant names that are path syntax are refused.
  for (const std::string bad : {"..", ".", "a/b", "a\\u0000b", ""}) {
    CAPTURE(bad);
    const std::string msg = test::error_of(
        [&] { parse(std::string(R"({"variants": [{"name": ")") + bad + R"("}]})"); });
    CHECK(test::contains(msg, "must be letters, digits"));
  }
  // A control character in a name is shown, not printed raw (a NUL would cut the message).
  CHECK(test::contains(test::error_of([&] { parse(R"({"variants": [{"name": "a\u0000b"}]})"); }),
                       "name 'a\\x00b' must be letters"));
  // A name past 200 bytes keeps its start and gains a hash of the whole: distinct, bounded.
  const std::string v(190, 'v');
  sw::Sweep longs = parse(R"({"variants": [{"name": ")" + v +
                          R"("}], "grid": {"moe.capacity_factor": [1.0, 2.0]}})");
  REQUIRE(longs.points.size() == 2);
  for (const auto& p : longs.points) {
    CAPTURE(p.name);
    CHECK(p.name.size() == 180 + 1 + 16);
    CHECK(p.name.rfind(v.substr(0, 180) + "-", 0) == 0);
  }
  CHECK(longs.points[0].name != longs.points[1].name);
  CHECK(parse(R"({"variants": [{"name": ")" + v + R"("}], "grid": {"moe.capacity_factor": [1.0]}})")
            .points[0]
            .name == longs.points[0].name);  // the same point, the same folder
}

TEST_CASE("switch-sweep: a second sweep into a folder in use is refused, --dry-run still reads") {
  const std::string dir = test::scratch_dir("sweep_two_writers");
  const std::string out = dir + "/out";
  const std::string file =
      tiny_sweep(dir, R"({"moe.capacity_factor": [1.0]})", 1000000,
                 R"(, "train.checkpoint_every": 1000000, "train.eval_every": 1000000)");
  const std::string sweep = kSweep + " " + file + " --out " + out + " --no-plot";
  test::CmdResult r =
      test::run("(" + sweep + " & p=$!; echo first=$p; " +
                test::wait_for(out + "/capacity_factor-1.0/metrics.jsonl", "\"kind\":\"train\"") +
                "; " + sweep + "; echo second=$?; " + sweep + " --summary; echo summary=$?; " +
                sweep + " --dry-run; echo dry=$?; kill -INT $p; wait $p; echo first_rc=$?)");
  INFO(r.output);
  const size_t at = r.output.find("first=");
  REQUIRE(at != std::string::npos);
  const std::string pid = r.output.substr(at + 6, r.output.find('\n', at) - at - 6);
  CHECK(test::contains(r.output, "switch-sweep: error: sweep directory '" + out +
                                     "' is in use by pid " + pid + " on host "));
  CHECK(test::contains(r.output, "two sweeps cannot write one folder"));
  CHECK(test::contains(r.output, "second=1"));
  CHECK(test::contains(r.output, "summary=1"));
  CHECK(test::contains(r.output, "dry=0"));
  CHECK(test::contains(r.output, "first_rc=130"));
  // The first sweep's point is whole: its rerun resumes it.
  r = test::run(kSweep + " " + file + " --out " + out + " --dry-run");
  CHECK(test::contains(r.output, "resume"));
}

TEST_CASE("switch-sweep: a failed point lets the others finish, and the sweep exits 1") {
  const std::string dir = test::scratch_dir("sweep_failed_point");
  const std::string out = dir + "/out";
  // The first point's data file does not exist: it fails; the second trains.
  const std::string file =
      tiny_sweep(dir, R"({"data.path": ["/nonexistent.txt", ")" + test::data_path() + R"("]})", 10);
  const test::CmdResult r = test::run(kSweep + " " + file + " --out " + out + " --no-plot");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "[1/2] path-nonexistent.txt: FAILED (exit 1)"));
  CHECK(test::contains(r.output, "data file '/nonexistent.txt' does not exist"));
  CHECK(test::contains(r.output, "1 of 2 points failed"));
  const nlohmann::json summary = nlohmann::json::parse(test::read_file(out + "/summary.json"));
  int done = 0, failed = 0;
  for (const auto& row : summary["points"]) {
    done += row["status"] == "done";
    failed += row["status"] == "failed";
  }
  CHECK(done == 1);
  CHECK(failed == 1);
  CHECK(test::fs::exists(out + "/path-nonexistent.txt/train.log"));
}

TEST_CASE("switch-sweep: a point another switch-train is writing is left alone, not moved") {
  const std::string dir = test::scratch_dir("sweep_point_in_use");
  const std::string out = dir + "/out";
  const std::string file = tiny_sweep(dir, R"({"moe.capacity_factor": [1.0]})", 10);
  REQUIRE(test::run(kSweep + " " + file + " --out " + out + " --no-plot -q").rc == 0);
  const std::string point = out + "/capacity_factor-1.0";
  // Resumed by hand with more steps: its config.json no longer matches the sweep's, so the
  // sweep would move it aside and train the point again, were it not in use.
  const test::CmdResult r = test::run(
      "(" + std::string(SWITCH_TRAIN_BIN) + " --out " + point +
      " --resume -q --set train.steps=1000000 --set train.log_every=1 & p=$!; echo hand=$p; " +
      test::wait_for(point + "/metrics.jsonl", "\"step\":12,") + "; " + kSweep + " " + file +
      " --out " + out + " --no-plot; echo sweep=$?; kill -TERM $p; wait $p; echo hand_rc=$?)");
  INFO(r.output);
  const size_t at = r.output.find("hand=");
  REQUIRE(at != std::string::npos);
  const std::string pid = r.output.substr(at + 5, r.output.find('\n', at) - at - 5);
  CHECK(test::contains(r.output, "capacity_factor-1.0: FAILED: run directory '" + point +
                                     "' is in use by pid " + pid));
  CHECK(test::contains(r.output, "sweep=1"));
  CHECK(test::contains(r.output, "hand_rc=143"));
  CHECK_FALSE(test::fs::exists(out + "/.stale"));
  CHECK(test::contains(test::read_file(point + "/config.json"), "\"steps\": 1000000"));
}
