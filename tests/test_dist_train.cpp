// Training on several processes, as a user runs it: switch-train --nproc N, or ranks started
// by hand from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Same loss curve as one
// process, checkpoints that move between rank counts, and failures that end the run.
#include <algorithm>
#include <cmath>

#include <doctest/doctest.h>

#include "distributed/comm.h"
#include "helpers.h"
#include "train/metrics.h"

namespace {

const std::string kTrain = SWITCH_TRAIN_BIN;
const std::string kSample = SWITCH_SAMPLE_BIN;
const std::string kEval = SWITCH_EVAL_BIN;

// The tiny config on one thread per rank. `exact` makes one process and W ranks compute
// the same thing: no dropping (capacity is decided per rank on its own tokens) and no
// load-balancing loss (a product of per-rank statistics).
std::string tiny_args(const std::string& out, bool exact) {
  std::string a = " --config " + test::source_path("configs/tiny.json") +
                  " --set data.path=" + test::data_path() + " --set train.threads=1 --out " + out;
  if (exact) a += " --set moe.drop_tokens=false --set moe.alpha=0";
  return a;
}

// The value a record is compared on: cross-entropy for train records, val loss for evals.
double loss_of(const nlohmann::json& r) {
  return r["kind"] == "train" ? r["ce"].get<double>() : r["val_loss"].get<double>();
}

// Largest |difference| of the losses of two metrics files with the same records, whose
// routing counts must also agree exactly.
double max_loss_diff(const std::string& a_path, const std::string& b_path) {
  auto a = sw::read_metrics(a_path), b = sw::read_metrics(b_path);
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    REQUIRE(a[i]["kind"] == b[i]["kind"]);
    REQUIRE(a[i]["step"] == b[i]["step"]);
    worst = std::max(worst, std::abs(loss_of(a[i]) - loss_of(b[i])));
    if (a[i]["kind"] == "train")
      for (size_t l = 0; l < a[i]["layers"].size(); ++l)
        CHECK(a[i]["layers"][l]["counts"] == b[i]["layers"][l]["counts"]);
  }
  return worst;
}

// A copy of `run` as it was at checkpoint `step`: config, that checkpoint, its metrics.
void copy_run_at(const std::string& run, const std::string& to, int64_t step) {
  test::fs::create_directories(to);
  test::fs::copy(run + "/config.json", to + "/config.json");
  const std::string ck =
      "/ckpt-" + std::string(6 - std::to_string(step).size(), '0') + std::to_string(step);
  test::fs::copy(run + ck, to + ck, test::fs::copy_options::recursive);
  test::fs::copy(run + "/metrics.jsonl", to + "/metrics.jsonl");  // resume truncates it
}

}  // namespace

TEST_CASE("switch-train --nproc 2 and 4 follow one process's loss curve on the same global batch") {
  const std::string base = test::scratch_dir("dist_curve");
  test::CmdResult r = test::run(kTrain + tiny_args(base + "/w1", true) + " -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  for (int W : {2, 4}) {
    CAPTURE(W);
    const std::string dir = base + "/w" + std::to_string(W);
    r = test::run(kTrain + tiny_args(dir, true) + " --nproc " + std::to_string(W));
    INFO(r.output);
    REQUIRE(r.rc == 0);
    CHECK(test::contains(r.output, "[rank 0] ranks: " + std::to_string(W) + " joined"));
    CHECK(test::contains(r.output, "[rank 0] done: 60 steps"));
    const double diff = max_loss_diff(base + "/w1/metrics.jsonl", dir + "/metrics.jsonl");
    MESSAGE("W = " << W << ": max |loss difference| vs one process over all records: " << diff);
    CHECK(diff < 1e-5);
    const auto summary = nlohmann::json::parse(test::read_file(dir + "/summary.json"));
    CHECK(summary["ranks"] == W);
    CHECK(summary["expert_parallel"] == true);
  }
  // Data parallel only: every rank holds every expert.
  const std::string dp = base + "/dp2";
  r = test::run(kTrain + tiny_args(dp, true) + " --set dist.expert_parallel=1 --nproc 2 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  const double diff = max_loss_diff(base + "/w1/metrics.jsonl", dp + "/metrics.jsonl");
  MESSAGE("data parallel, W = 2: max |loss difference| vs one process: " << diff);
  CHECK(diff < 1e-5);
}

TEST_CASE("a checkpoint of 2 ranks resumes in one process, one of one process on 2 ranks") {
  const std::string base = test::scratch_dir("dist_resume");
  // The reference: one process, straight through.
  test::CmdResult r = test::run(kTrain + tiny_args(base + "/w1", true) + " -q");
  REQUIRE(r.rc == 0);
  r = test::run(kTrain + tiny_args(base + "/w2", true) + " --nproc 2 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);

  // Written by 2 ranks at step 30, continued by one process: the one-process curve.
  copy_run_at(base + "/w2", base + "/w2to1", 30);
  r = test::run(kTrain + " --out " + base + "/w2to1 --resume -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  const double diff = max_loss_diff(base + "/w1/metrics.jsonl", base + "/w2to1/metrics.jsonl");
  MESSAGE("2 ranks to step 30, then 1 process: max |loss difference| vs one process: " << diff);
  CHECK(diff < 1e-5);

  // Written by one process at step 30, continued by 2 ranks: the same curve.
  copy_run_at(base + "/w1", base + "/w1to2", 30);
  r = test::run(kTrain + " --out " + base + "/w1to2 --resume --nproc 2 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  const double up = max_loss_diff(base + "/w1/metrics.jsonl", base + "/w1to2/metrics.jsonl");
  MESSAGE("1 process to step 30, then 2 ranks: max |loss difference| vs one process: " << up);
  CHECK(up < 1e-5);

  // The weights file holds whole layers: switch-sample reads it like any other.
  r = test::run(kSample + " --run " + base + "/w2 --chars 40 --seed 3");
  CHECK(r.rc == 0);
  CHECK(r.output.size() >= 40);
  CHECK(r.output == test::run(kSample + " --run " + base + "/w2to1 --chars 40 --seed 3").output);
}

TEST_CASE("switch-eval gives back the val_loss 2 expert-parallel ranks recorded, drops and all") {
  const std::string dir = test::scratch_dir("dist_eval");
  // Evaluation at half capacity: each rank drops from its own half of a batch.
  test::CmdResult r = test::run(kTrain + tiny_args(dir, false) +
                                " --set moe.eval_capacity_factor=0.5 --nproc 2 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  // A record of several ranks carries the documented per-step communication.
  const nlohmann::json first = sw::read_metrics(dir + "/metrics.jsonl").front();
  REQUIRE(first.contains("comm"));
  for (const char* key : {"ms", "exposed_ms", "hidden_ms", "all_to_all_calls", "all_to_all_bytes",
                          "all_reduce_calls", "all_reduce_bytes"})
    CHECK_MESSAGE(first["comm"].contains(key), key);
  CHECK(first["comm"]["all_to_all_bytes"].get<double>() > 0);
  // Two all-reduces a step: the replicated gradients with the losses, started beside the
  // expert weight gradients, then the experts' squared gradient norm.
  CHECK(first["comm"]["all_reduce_calls"].get<double>() == 2);
  // With a capacity the counts ride in the rows' blocks: 4 all-to-alls a step for each of
  // the 2 MoE layers and 2 micro-batches, not 5.
  CHECK(first["comm"]["all_to_all_calls"].get<double>() == 16);
  for (int64_t step : {30, 60}) {
    CAPTURE(step);
    double recorded = -1;
    for (const auto& rec : sw::read_metrics(dir + "/metrics.jsonl"))
      if (rec["kind"] == "eval" && rec["step"] == step) recorded = rec["val_loss"].get<double>();
    r = test::run(kEval + " --run " + test::quote(dir) + " --ckpt " + std::to_string(step) +
                  " --json");
    INFO(r.output);
    REQUIRE(r.rc == 0);
    const nlohmann::json doc = nlohmann::json::parse(r.output);
    CHECK(doc["checkpoint"]["ranks"] == 2);
    CHECK(doc["dropped_pct"].get<double>() > 10);
    CHECK(std::abs(doc["loss"].get<double>() - recorded) < 1e-6);
  }
  // Every window once: the last, shorter batches are routed whole, every character scored.
  r = test::run(kEval + " --run " + test::quote(dir) + " --batches all --json");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  const nlohmann::json all = nlohmann::json::parse(r.output);
  CHECK(std::isfinite(all["loss"].get<double>()));
  CHECK(all["data"]["characters"] == 111540 - 1);  // Tiny Shakespeare's val split
}

TEST_CASE("the lab's options under 2 ranks follow one process's curve, upcycling too") {
  // Bias balancing (the loads summed over the ranks), shared experts, SwiGLU experts and
  // sigmoid scores at once; then a dense run upcycled by 2 ranks and by one process.
  const std::string base = test::scratch_dir("dist_lab");
  const std::string lab =
      " --set moe.balance=bias --set moe.bias_rate=0.01"
      " --set moe.shared_experts=1 --set model.activation=swiglu"
      " --set moe.score=sigmoid";
  test::CmdResult r = test::run(kTrain + tiny_args(base + "/w1", true) + lab + " -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  r = test::run(kTrain + tiny_args(base + "/w2", true) + lab + " --nproc 2 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  double diff = max_loss_diff(base + "/w1/metrics.jsonl", base + "/w2/metrics.jsonl");
  MESSAGE("lab options, W = 2: max |loss difference| vs one process: " << diff);
  CHECK(diff < 1e-5);
  const auto a = sw::read_metrics(base + "/w1/metrics.jsonl");
  const auto b = sw::read_metrics(base + "/w2/metrics.jsonl");
  CHECK(a[a.size() - 2]["layers"][0]["bias"] == b[b.size() - 2]["layers"][0]["bias"]);

  r = test::run(kTrain + tiny_args(base + "/dense", true) + " --set moe.every=0 -q");
  REQUIRE(r.rc == 0);
  const std::string up = " --init-from " + base + "/dense";
  r = test::run(kTrain + tiny_args(base + "/up1", true) + up + " -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  r = test::run(kTrain + tiny_args(base + "/up2", true) + up + " --nproc 2 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  diff = max_loss_diff(base + "/up1/metrics.jsonl", base + "/up2/metrics.jsonl");
  MESSAGE("upcycled, W = 2: max |loss difference| vs one process: " << diff);
  CHECK(diff < 1e-5);
  // Upcycled, the run starts where the dense run ended, far below a fresh model.
  const auto dense = sw::read_metrics(base + "/dense/metrics.jsonl");
  const auto up1 = sw::read_metrics(base + "/up1/metrics.jsonl");
  CHECK(up1.front()["ce"].get<double>() < dense.front()["ce"].get<double>() - 0.5);
}

TEST_CASE("2 ranks with token dropping resume bitwise from their checkpoint") {
  // Dropping draws random priorities on every rank: each rank's generator is checkpointed.
  // Rerouting and the balancing biases ride along.
  const std::string base = test::scratch_dir("dist_exact_resume");
  test::CmdResult r = test::run(kTrain + tiny_args(base + "/straight", false) +
                                " --set moe.overflow=reroute --set moe.balance=bias --nproc 2 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  copy_run_at(base + "/straight", base + "/resumed", 30);
  r = test::run(kTrain + " --out " + base + "/resumed --resume --nproc 2 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  auto a = sw::read_metrics(base + "/straight/metrics.jsonl");
  auto b = sw::read_metrics(base + "/resumed/metrics.jsonl");
  REQUIRE(a.size() == b.size());
  CHECK(a.back()["val_loss"] == b.back()["val_loss"]);
  CHECK(a[a.size() - 2]["layers"] == b[b.size() - 2]["layers"]);
  CHECK_MESSAGE(test::read_file(base + "/straight/ckpt-000060/model.pt") ==
                    test::read_file(base + "/resumed/ckpt-000060/model.pt"),
                "weights after a 2-rank resume differ from the straight 2-rank run");
}

TEST_CASE("dist.overlap: the same bits as micro-batches one after another, at 2 and 4 ranks") {
  // Overlapped micro-batches exchange rows on lanes of their own; losses, routing counts and
  // weights must not move by a bit, with and without dropping (rerouting and biases too).
  const std::string base = test::scratch_dir("dist_overlap");
  const std::string short_run =
      " --set train.steps=20 --set train.eval_every=20 --set train.checkpoint_every=20 -q";
  struct Variant {
    const char* name;
    bool exact;
    std::string extra;
  };
  const std::vector<Variant> variants = {
      {"nodrop", true, ""},
      {"drop", false, " --set moe.capacity_factor=1.0"},
      {"reroute", false, " --set moe.overflow=reroute --set moe.balance=bias"}};
  for (int W : {2, 4})
    for (const Variant& v : variants) {
      if (W == 4 && std::string(v.name) == "reroute") continue;
      CAPTURE(W);
      CAPTURE(v.name);
      const std::string run = base + "/" + v.name + std::to_string(W);
      for (const char* overlap : {"false", "true"}) {
        const test::CmdResult r =
            test::run(kTrain + tiny_args(run + "-" + overlap, v.exact) + v.extra + short_run +
                      " --set dist.overlap=" + overlap + " --nproc " + std::to_string(W));
        INFO(r.output);
        REQUIRE(r.rc == 0);
      }
      CHECK(max_loss_diff(run + "-false/metrics.jsonl", run + "-true/metrics.jsonl") == 0);
      CHECK_MESSAGE(test::read_file(run + "-false/ckpt-000020/model.pt") ==
                        test::read_file(run + "-true/ckpt-000020/model.pt"),
                    "weights differ with dist.overlap");
      CHECK(nlohmann::json::parse(test::read_file(run + "-true/summary.json"))["overlap"] == true);
      CHECK(nlohmann::json::parse(test::read_file(run + "-false/summary.json"))["overlap"] ==
            false);
      // One thread computing hides only the gradients' sum, behind the expert weight
      // gradients; the lanes also hide their all-to-alls behind each other.
      auto hidden_ms = [](const std::string& metrics) {
        double hidden = 0;
        for (const auto& rec : sw::read_metrics(metrics))
          if (rec.contains("comm")) {
            CHECK(rec["comm"]["exposed_ms"].get<double>() > 0);
            hidden += rec["comm"]["hidden_ms"].get<double>();
          }
        return hidden;
      };
      const double hidden_sync = hidden_ms(run + "-false/metrics.jsonl");
      CHECK(hidden_ms(run + "-true/metrics.jsonl") > hidden_sync);
    }
}

// Two ranks started by hand, as torchrun or a scheduler would: RANK, WORLD_SIZE,
// MASTER_ADDR and MASTER_PORT only.
// `timeout` ends a rank that hangs (exit 124) where the test says so.
std::string by_hand(int rank, int64_t port, const std::string& args, bool limit = true) {
  return "RANK=" + std::to_string(rank) +
         " WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) +
         (limit ? " timeout 300 " : " ") + kTrain + args;
}

// The end of a script that ends `echo rc0=$? seconds=N` after rank 0's other rank died or
// stalled: rank 0 exited 1 naming that, N seconds later (returned).
int rank0_failed_after(const test::CmdResult& r, const std::string& rank0_log) {
  INFO(r.output);
  INFO(test::read_file(rank0_log));
  CHECK(test::contains(r.output, "rc0=1 "));
  CHECK(test::contains(test::read_file(rank0_log), "failed (another rank died or stalled?)"));
  const auto pos = r.output.find("seconds=");
  REQUIRE(pos != std::string::npos);
  return std::stoi(r.output.substr(pos + 8));
}

TEST_CASE("a rank killed mid-run makes the other exit with an error, not hang") {
  const std::string base = test::scratch_dir("dist_dead_rank");
  const sw::PortReservation reservation;
  const std::string args =
      tiny_args(base + "/run", false) + " --set train.steps=1000000 --set dist.timeout_s=100 -q";
  // Rank 1 is killed once both are training; rank 0 must notice well before any timeout
  // (`timeout` would end a hang with 124).
  test::CmdResult r = test::run(
      "(" + by_hand(0, reservation.port(), args) + " > " + base + "/rank0.log 2>&1 & p0=$!; " +
      by_hand(1, reservation.port(), args, false) + " > /dev/null 2>&1 & p1=$!; " +
      test::wait_for(base + "/run/metrics.jsonl", "\"kind\":\"train\"") + "; kill -9 $p1; " +
      "t0=$(date +%s); wait $p0; echo rc0=$? seconds=$(($(date +%s) - t0)))");
  const int seconds = rank0_failed_after(r, base + "/rank0.log");
  MESSAGE("rank 0 exited " << seconds << " s after rank 1 was killed");
  CHECK(seconds < 30);
}

TEST_CASE("a run launched by hand from RANK and WORLD_SIZE ends as --nproc 2's, bit for bit") {
  const std::string base = test::scratch_dir("dist_by_hand");
  test::CmdResult r = test::run(kTrain + tiny_args(base + "/nproc", false) + " --nproc 2 -q");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  const sw::PortReservation reservation;
  const std::string args = tiny_args(base + "/hand", false) + " -q";
  r = test::run("(" + by_hand(1, reservation.port(), args) + " > " + base + "/rank1.log 2>&1 & " +
                by_hand(0, reservation.port(), args) + "; echo rc0=$?; wait $!; echo rc1=$?)");
  INFO(r.output);
  INFO(test::read_file(base + "/rank1.log"));
  CHECK(test::contains(r.output, "rc0=0"));
  CHECK(test::contains(r.output, "rc1=0"));
  CHECK(test::read_file(base + "/hand/summary.json").size() > 0);
  CHECK(max_loss_diff(base + "/nproc/metrics.jsonl", base + "/hand/metrics.jsonl") == 0);
  CHECK(test::read_file(base + "/nproc/ckpt-000060/model.pt") ==
        test::read_file(base + "/hand/ckpt-000060/model.pt"));
}

TEST_CASE("a stalled rank makes the other fail after dist.timeout_s, naming the stall") {
  const std::string base = test::scratch_dir("dist_stalled_rank");
  const sw::PortReservation reservation;
  const std::string args =
      tiny_args(base + "/run", false) + " --set train.steps=1000000 --set dist.timeout_s=5 -q";
  // Rank 1 is stopped (SIGSTOP: alive, silent) once both train; rank 0 must give up about
  // dist.timeout_s later with exit 1, not wait for ever (`timeout` would end it with 124).
  test::CmdResult r = test::run(
      "(" + by_hand(0, reservation.port(), args) + " > " + base + "/rank0.log 2>&1 & p0=$!; " +
      by_hand(1, reservation.port(), args, false) + " > /dev/null 2>&1 & p1=$!; " +
      test::wait_for(base + "/run/metrics.jsonl", "\"kind\":\"train\"") +
      "; kill -STOP $p1; t0=$(date +%s); wait $p0; echo rc0=$? seconds=$(($(date +%s) - t0)); "
      "kill -9 $p1)");
  const int seconds = rank0_failed_after(r, base + "/rank0.log");
  MESSAGE("rank 0 exited " << seconds << " s after rank 1 stalled (dist.timeout_s = 5)");
  CHECK(seconds >= 3);
  CHECK(seconds < 60);
}

TEST_CASE("--nproc: a killed rank brings the run down with a non-zero exit naming it") {
  const std::string base = test::scratch_dir("dist_launcher_kill");
  test::CmdResult r =
      test::run("(" + kTrain + tiny_args(base + "/run", false) +
                " --set train.steps=1000000 -q --nproc 2 & lp=$!; " +
                test::wait_for(base + "/run/metrics.jsonl", "\"kind\":\"train\"") +
                "; kill -9 $(cut -d' ' -f2 /proc/$lp/task/$lp/children); t0=$(date +%s); " +
                "wait $lp; echo rc=$? seconds=$(($(date +%s) - t0)))");
  INFO(r.output);
  CHECK(test::contains(r.output, "switch-train: rank 1 was killed by signal 9; stopping"));
  CHECK(test::contains(r.output, "rc=137 "));
  const auto pos = r.output.find("seconds=");
  REQUIRE(pos != std::string::npos);
  CHECK(std::stoi(r.output.substr(pos + 8)) < 30);
}

TEST_CASE("--nproc: SIGINT or SIGTERM stops every rank after the same step with one checkpoint") {
  const std::string base = test::scratch_dir("dist_sigint");
  for (const std::string sig : {"INT", "TERM"}) {
    CAPTURE(sig);
    const std::string dir = base + "/run-" + sig;
    const std::string code = sig == "INT" ? "130" : "143";
    test::CmdResult r = test::run("(" + kTrain + tiny_args(dir, false) +
                                  " --set train.steps=1000000 -q --nproc 2 & lp=$!; " +
                                  test::wait_for(dir + "/metrics.jsonl", "\"kind\":\"train\"") +
                                  "; kill -" + sig + " $lp; wait $lp; echo rc=$?)");
    INFO(r.output);
    CHECK(test::contains(r.output, "rc=" + code));
    const int64_t ckpt_step = test::newest_checkpoint_step(dir);
    REQUIRE(ckpt_step > 0);
    // The launcher passes the signal on: both ranks stop by it after the same step.
    for (const std::string rank : {"0", "1"})
      CHECK(test::contains(r.output, "[rank " + rank + "] switch-train: stopped by SIG" + sig +
                                         " after step " + std::to_string(ckpt_step) + ";"));
    r = test::run(kTrain + " --out " + dir +
                  " --resume -q --nproc 2 --set train.steps=" + std::to_string(ckpt_step + 10));
    INFO(r.output);
    CHECK(r.rc == 0);
    CHECK(test::fs::exists(dir + "/summary.json"));
  }
}

TEST_CASE("--nproc and the dist keys: bad combinations exit 2 naming the key") {
  const std::string base = test::scratch_dir("dist_bad");
  struct Case {
    std::string args, message;
  };
  const std::vector<Case> cases = {
      {" --nproc 2 --set dist.expert_parallel=3",
       "dist.expert_parallel = 3: the run has 2 ranks; use 0 (all ranks), 1 (data parallel only) "
       "or 2"},
      {" --nproc 3", "train.batch_size = 8: the global batch must split evenly over 3 ranks"},
      {" --nproc 8 --set train.batch_size=16",
       "moe.n_experts = 4: must be divisible by the 8 expert-parallel ranks"},
      {" --set dist.expert_parallel=2",
       "dist.expert_parallel = 2: the run has 1 rank; use 0 or 1, or start 2 ranks "
       "(switch-train --nproc 2)"},
      {" --nproc 2 --set moe.strategy=loop",
       "moe.strategy = loop: expert parallelism over 2 ranks computes each rank's experts "
       "grouped; use moe.strategy=grouped, or dist.expert_parallel=1"},
      {" --nproc 0", "--nproc"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.args);
    test::CmdResult r = test::run(kTrain + tiny_args(base + "/run", false) + c.args);
    INFO(r.output);
    CHECK(r.rc == 2);
    CHECK(test::contains(r.output, c.message));
    CHECK_FALSE(test::fs::exists(base + "/run/config.json"));
  }
  test::CmdResult r =
      test::run("WORLD_SIZE=2 RANK=0 " + kTrain + tiny_args(base + "/run", false) + " --nproc 2");
  CHECK(r.rc == 2);
  CHECK(test::contains(r.output, "--nproc starts its own ranks"));
}
