// Every file switch reads is untrusted input: deep JSON, files that are not regular files,
// checkpoints of another model or with forged tensor records, links planted in a run
// folder, a full disk while the optimizer state is written, a folder of someone else's
// files as --out, switch-bench's own scratch space and numbers, signals during rendezvous.
// Each is refused with one line and exit 1 or 2, and nothing outside the run is touched.
#include <algorithm>
#include <sstream>

#include <caffe2/serialize/inline_container.h>
#include <doctest/doctest.h>
#include <fmt/format.h>

#include "distributed/comm.h"
#include "helpers.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/optimizer.h"

namespace {

const std::string kTrain = SWITCH_TRAIN_BIN;
const std::string kSample = SWITCH_SAMPLE_BIN;
const std::string kSweep = SWITCH_SWEEP_BIN;
const std::string kBench = SWITCH_BENCH_BIN;

std::string tiny_args(const std::string& out) {
  return " --config " + test::source_path("configs/tiny.json") +
         " --set data.path=" + test::data_path() + " --out " + out;
}

// A tiny run of `steps` steps with a checkpoint at the end; returns its newest checkpoint.
std::string tiny_run(const std::string& dir, int steps, const std::string& extra = "") {
  const test::CmdResult r =
      test::run(kTrain + tiny_args(dir) + " -q --set train.steps=" + std::to_string(steps) +
                " --set train.checkpoint_every=" + std::to_string(steps) + extra);
  INFO(r.output);
  REQUIRE(r.rc == 0);
  return sw::newest_checkpoint(dir).value();
}

std::string deep_json(size_t depth, const std::string& key = "a") {
  std::string s;
  for (size_t i = 0; i < depth; ++i)
    s += "{\"" + key + "\":";
  s += "1";
  s += std::string(depth, '}');
  return s;
}

size_t lines(const std::string& s) {
  return static_cast<size_t>(std::count(s.begin(), s.end(), '\n'));
}

// Rewrites the zip archive at `path` with `edit` applied to each record's bytes.
template <typename Edit>
void rewrite_archive(const std::string& path, Edit edit) {
  std::istringstream in(test::read_file(path));
  caffe2::serialize::PyTorchStreamReader reader(&in);
  std::ostringstream out;
  {
    caffe2::serialize::PyTorchStreamWriter writer([&](const void* buf, size_t n) {
      out.write(static_cast<const char*>(buf), static_cast<std::streamsize>(n));
      return n;
    });
    for (const std::string& name : reader.getAllRecords()) {
      if (name == "version" || name == ".data/version") continue;  // the writer adds its own
      at::DataPtr ptr;
      size_t size = 0;
      std::tie(ptr, size) = reader.getRecord(name);
      std::string bytes(static_cast<const char*>(ptr.get()), size);
      edit(name, bytes);
      writer.writeRecord(name, bytes.data(), bytes.size());
    }
    writer.writeEndOfFile();
  }
  test::write_file(path, out.str());
}

}  // namespace

TEST_CASE("untrusted: JSON nested 100,000 deep is refused, not a stack overflow") {
  const std::string dir = test::scratch_dir("untrusted_deep");
  test::write_file(dir + "/deep.json", "{\"model\": " + deep_json(100000) + "}");
  test::CmdResult r = test::run(kTrain + " --config " + dir + "/deep.json --print-config");
  INFO(r.output);
  CHECK(r.rc == 2);
  CHECK(test::contains(r.output, "deep.json:1:"));
  CHECK(test::contains(r.output, "JSON nested deeper than 64 levels"));
  // A sweep file (its "set" is dumped and applied: it recursed once per level).
  test::write_file(dir + "/sweep.json", "{\"set\": " + deep_json(100000) + "}");
  r = test::run(kSweep + " " + dir + "/sweep.json --dry-run");
  INFO(r.output);
  CHECK(r.rc == 2);
  CHECK(test::contains(r.output, "JSON nested deeper than 64 levels"));
  // A checkpoint's state.json, on resume and in the sampler.
  const std::string ck = tiny_run(dir + "/run", 5);
  const std::string state = test::read_file(ck + "/state.json");
  const std::string head = state.substr(0, state.rfind('}'));
  // The error names the last line: the one the nesting is on.
  const std::string at =
      fmt::format("/state.json:{}:", 1 + std::count(head.begin(), head.end(), '\n'));
  test::write_file(ck + "/state.json", head + ", \"x\": " + deep_json(100000) + "}");
  for (const std::string& cmd : {kTrain + " --out " + dir + "/run --resume -q --set train.steps=10",
                                 kSample + " --run " + dir + "/run --chars 5"}) {
    CAPTURE(cmd);
    r = test::run(cmd);
    CHECK(r.rc == 1);
    CHECK(test::contains(r.output, at));
    CHECK(test::contains(r.output, "JSON nested deeper than 64 levels"));
    CHECK(lines(r.output) == 1);
  }
  test::write_file(ck + "/state.json", state);
  // A deep line in metrics.jsonl (no record of ours) is skipped on resume, not followed.
  {
    std::ofstream m(dir + "/run/metrics.jsonl", std::ios::app);
    m << deep_json(100000, "kind") << "\n";
  }
  r = test::run(kTrain + " --out " + dir + "/run --resume -q --set train.steps=10");
  INFO(r.output);
  CHECK(r.rc == 0);
  for (const auto& rec : sw::read_metrics(dir + "/run/metrics.jsonl"))
    CHECK(rec.contains("step"));
}

TEST_CASE("untrusted: a FIFO, a directory or a device as a file is refused without blocking") {
  const std::string dir = test::scratch_dir("untrusted_fifo");
  REQUIRE(test::run("mkfifo " + dir + "/fifo").rc == 0);
  struct Case {
    std::string cmd, expect;
    int rc;
  };
  const std::vector<Case> cases = {
      {kTrain + " --config " + dir + "/fifo --print-config",
       "config file '" + dir + "/fifo' is not a regular file", 2},
      {kTrain + " --config " + dir + " --print-config", "", 2},  // CLI11: not a file
      {kSweep + " " + dir + "/fifo --dry-run",
       "sweep file '" + dir + "/fifo' is not a regular file", 2},
      {kTrain + tiny_args(dir + "/run1") + " --set data.path=" + dir + "/fifo -q",
       "data file '" + dir + "/fifo' does not exist or cannot be read", 1},
      {kTrain + tiny_args(dir + "/run2") + " --set data.path=/dev/zero -q",
       "data file '/dev/zero' does not exist or cannot be read", 1},
  };
  for (const auto& c : cases) {
    CAPTURE(c.cmd);
    // `timeout` turns a hang into exit 124, which fails the check below.
    const test::CmdResult r = test::run("timeout 60 " + c.cmd);
    INFO(r.output);
    CHECK(r.rc == c.rc);
    CHECK(test::contains(r.output, c.expect));
  }
}

TEST_CASE("untrusted: an optimizer state of another model is refused before the first step") {
  const std::string dir = test::scratch_dir("untrusted_optim");
  const std::string ck64 = tiny_run(dir + "/d64", 5);
  const std::string ck32 = tiny_run(dir + "/d32", 5, " --set model.d_ff=32");
  const std::string optim64 = test::read_file(ck64 + "/optim.pt");
  const std::string optim32 = test::read_file(ck32 + "/optim.pt");
  // The wider model's moments into the narrower model, and the other way round.
  for (const auto& [run, ck, foreign] :
       {std::tuple{dir + "/d32", ck32, optim64}, std::tuple{dir + "/d64", ck64, optim32}}) {
    CAPTURE(run);
    test::write_file(ck + "/optim.pt", foreign);
    const test::CmdResult r = test::run(kTrain + " --out " + run + " --resume --set train.steps=8");
    INFO(r.output);
    CHECK(r.rc == 1);
    CHECK(test::contains(r.output, ck + "/optim.pt: the first moment of parameter "));
    CHECK(test::contains(r.output, "(an optimizer state of another model?)"));
    CHECK(sw::newest_checkpoint(run).value() == ck);  // nothing trained, nothing saved
  }
}

TEST_CASE("untrusted: forged tensor records in model.pt and rng.pt are refused") {
  const std::string dir = test::scratch_dir("untrusted_records");
  const std::string ck = tiny_run(dir + "/run", 5);
  const std::string model = test::read_file(ck + "/model.pt");
  sw::CheckpointMeta meta = sw::read_checkpoint_meta(ck);
  sw::Transformer m(meta.config, meta.vocab.size());
  REQUIRE_NOTHROW(sw::load_weights(ck, *m));

  // A storage record shorter than the tensor the pickle declares on it.
  rewrite_archive(ck + "/model.pt", [](const std::string& name, std::string& bytes) {
    if (name == "data/0") bytes.resize(bytes.size() / 2);
  });
  std::string msg = test::error_of([&] { sw::load_weights(ck, *m); });
  CHECK(test::contains(msg, ck + "/model.pt: a tensor of shape "));
  CHECK(test::contains(msg, "does not lie whole in the data its archive holds"));
  test::CmdResult r = test::run(kSample + " --run " + dir + "/run --chars 5 --temperature 0");
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "does not lie whole"));

  // A storage offset far past the record (the first tensor's BININT1 0 made a BININT of
  // 2^31 - 1): refused, not read.
  test::write_file(ck + "/model.pt", model);
  size_t patched = 0;
  rewrite_archive(ck + "/model.pt", [&](const std::string& name, std::string& bytes) {
    if (name != "data.pkl") return;
    // The first tensor: BINPERSID, then the offset as BININT1 0.
    const size_t at = bytes.find(std::string("QK\x00", 3));
    if (at == std::string::npos) return;
    bytes.replace(at + 1, 2, std::string("J\xff\xff\xff\x7f", 5));
    ++patched;
  });
  REQUIRE(patched == 1);
  msg = test::error_of([&] { sw::load_weights(ck, *m); });
  CHECK(test::contains(msg, ck + "/model.pt: "));
  CHECK(lines(msg) == 0);
  r = test::run(kSample + " --run " + dir + "/run --chars 5 --temperature 0");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(lines(r.output) == 1);
  r = test::run(kTrain + " --out " + dir + "/run --resume -q --set train.steps=8");
  CHECK(r.rc == 1);
  CHECK(lines(r.output) == 1);

  // A record missing altogether, and garbage instead of an archive.
  test::write_file(ck + "/model.pt", model.substr(0, model.size() / 2));
  msg = test::error_of([&] { sw::load_weights(ck, *m); });
  CHECK(test::contains(msg, "not a readable archive (truncated or corrupted?)"));
  CHECK(lines(msg) == 0);

  // Non-string keys, tensors of another dtype, something else than a dict.
  c10::Dict<int64_t, at::Tensor> by_number;
  by_number.insert(0, torch::zeros({2}));
  const std::vector<char> numbered = torch::pickle_save(by_number);
  test::write_file(ck + "/model.pt", std::string(numbered.begin(), numbered.end()));
  CHECK(test::contains(test::error_of([&] { sw::load_weights(ck, *m); }),
                       "holds an entry with a key of type Int, not a parameter name"));
  c10::Dict<std::string, at::Tensor> doubles;
  doubles.insert("tok_emb.weight", torch::zeros({2}, torch::kFloat64));
  const std::vector<char> dbl = torch::pickle_save(doubles);
  test::write_file(ck + "/model.pt", std::string(dbl.begin(), dbl.end()));
  CHECK(test::contains(test::error_of([&] { sw::load_weights(ck, *m); }),
                       "tensor 'tok_emb.weight' has dtype Double; switch's weights are float32"));
  const std::vector<char> list =
      torch::pickle_save(c10::List<at::Tensor>({torch::zeros({2}), torch::ones({3})}));
  test::write_file(ck + "/model.pt", std::string(list.begin(), list.end()));
  CHECK(test::contains(test::error_of([&] { sw::load_weights(ck, *m); }),
                       "global 'torch.jit._pickle.build_tensorlist' is not one a tensor archive "
                       "uses"));
  c10::Dict<std::string, int64_t> numbers;
  numbers.insert("tok_emb.weight", 3);
  const std::vector<char> nums = torch::pickle_save(numbers);
  test::write_file(ck + "/model.pt", std::string(nums.begin(), nums.end()));
  CHECK(test::contains(test::error_of([&] { sw::load_weights(ck, *m); }),
                       "entry 'tok_emb.weight' holds a Int, not a tensor"));
  test::write_file(ck + "/model.pt", model);
  REQUIRE_NOTHROW(sw::load_weights(ck, *m));

  // optim.pt with a short record: refused on resume with one line.
  const std::string optim = test::read_file(ck + "/optim.pt");
  rewrite_archive(ck + "/optim.pt", [](const std::string& name, std::string& bytes) {
    if (name == "data/1") bytes.resize(bytes.size() / 2);
  });
  r = test::run(kTrain + " --out " + dir + "/run --resume -q --set train.steps=8");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "optim.pt: a tensor of shape "));
  CHECK(lines(r.output) == 1);
  test::write_file(ck + "/optim.pt", optim);

  // rng.pt with a short record: refused on resume with one line, the run untouched.
  rewrite_archive(ck + "/rng.pt", [](const std::string& name, std::string& bytes) {
    if (name.rfind("data/", 0) == 0) bytes.resize(bytes.size() / 3);
  });
  r = test::run(kTrain + " --out " + dir + "/run --resume -q --set train.steps=8");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "rng.pt: a tensor of shape "));
  CHECK(lines(r.output) == 1);
}

TEST_CASE("untrusted: links planted in a run folder are replaced, never written through") {
  const std::string base = test::scratch_dir("untrusted_links");
  const std::string dir = base + "/run";
  tiny_run(dir, 10);
  test::write_file(base + "/victim", "keep me\n");
  // Where a temporary file will be created, and the metrics file itself, made links.
  test::fs::create_symlink(base + "/victim", dir + "/config.json.tmp");
  test::fs::create_symlink(base + "/victim", dir + "/summary.json.tmp");
  test::fs::create_symlink(base + "/victim", dir + "/metrics.jsonl.tmp");
  test::fs::remove(dir + "/metrics.jsonl");
  test::fs::create_symlink(base + "/created-outside", dir + "/metrics.jsonl");  // dangling
  const test::CmdResult r =
      test::run(kTrain + " --out " + dir + " --resume -q --set train.steps=20");
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::read_file(base + "/victim") == "keep me\n");
  CHECK_FALSE(test::fs::exists(base + "/created-outside"));
  CHECK_FALSE(test::fs::is_symlink(dir + "/metrics.jsonl"));
  CHECK(test::fs::exists(dir + "/summary.json"));
  CHECK(test::contains(test::read_file(dir + "/config.json"), "\"steps\": 20"));

  // The metrics file a link to a file outside: resuming rewrites the run's own file in its
  // place (the link goes, the file it pointed to stays as it was).
  const std::string dir2 = base + "/run2";
  tiny_run(dir2, 10);
  test::fs::remove(dir2 + "/metrics.jsonl");
  test::fs::create_symlink(base + "/victim", dir2 + "/metrics.jsonl");
  const test::CmdResult r2 =
      test::run(kTrain + " --out " + dir2 + " --resume -q --set train.steps=20");
  INFO(r2.output);
  CHECK(r2.rc == 0);
  CHECK(test::read_file(base + "/victim") == "keep me\n");
  CHECK_FALSE(test::fs::is_symlink(dir2 + "/metrics.jsonl"));
  // The writer itself never appends through a link.
  test::fs::create_symlink(base + "/victim", base + "/link.jsonl");
  CHECK(test::contains(test::error_of([&] { sw::MetricsWriter w(base + "/link.jsonl"); }),
                       "cannot open '" + base + "/link.jsonl' for appending"));
  CHECK(test::read_file(base + "/victim") == "keep me\n");
}

TEST_CASE(
    "untrusted: a full disk while optim.pt is written is one line, the last checkpoint stays") {
  const std::string dir = test::scratch_dir("untrusted_disk_full") + "/run";
  const std::string ck = tiny_run(dir, 10);
  REQUIRE(test::fs::file_size(ck + "/model.pt") < 250 * 1024);
  REQUIRE(test::fs::file_size(ck + "/optim.pt") > 300 * 1024);
  // 256 KiB per file (bash counts ulimit -f in KiB): model.pt fits, optim.pt does not.
  const test::CmdResult r =
      test::run("bash -c " + test::quote("ulimit -f 256; " + kTrain + " --out " + dir +
                                         " --resume -q --set train.steps=20"));
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "cannot write '" + dir + "/ckpt-000020.tmp/optim.pt.tmp'"));
  CHECK(test::contains(r.output, "File too large"));
  CHECK_FALSE(test::contains(r.output, "terminate called"));
  CHECK(lines(r.output) == 1);
  CHECK_FALSE(test::fs::exists(dir + "/ckpt-000020.tmp"));
  CHECK(sw::newest_checkpoint(dir).value() == ck);
}

TEST_CASE("untrusted: a folder of other files is no --out for a new run and keeps its files") {
  const std::string base = test::scratch_dir("untrusted_foreign");
  // An old run's checkpoints without its config.json: taken as new, its checkpoints were
  // kept and the new run's pruned.
  const std::string old_run = base + "/old";
  tiny_run(old_run, 10);
  test::fs::remove(old_run + "/config.json");
  test::fs::remove(old_run + "/metrics.jsonl");
  test::CmdResult r = test::run(kTrain + tiny_args(old_run) + " -q --set train.steps=5");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "'" + old_run + "' is not empty and holds no run ('"));
  CHECK(test::contains(r.output, "a new run needs a new or empty --out"));
  CHECK(test::fs::exists(old_run + "/ckpt-000010"));
  // Someone's own file.
  test::fs::create_directories(base + "/mine");
  test::write_file(base + "/mine/notes.txt", "mine\n");
  r = test::run(kTrain + tiny_args(base + "/mine") + " -q --set train.steps=5");
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "('notes.txt' is there)"));
  CHECK(test::read_file(base + "/mine/notes.txt") == "mine\n");
  // An empty folder is fine.
  test::fs::create_directories(base + "/empty");
  CHECK(test::run(kTrain + tiny_args(base + "/empty") + " -q --set train.steps=5").rc == 0);
}

TEST_CASE("untrusted: switch-bench keeps to a temporary folder of its own and checks its numbers") {
  const std::string dir = test::scratch_dir("untrusted_bench");
  // A user's file where an older switch-bench put (and deleted) its scratch runs.
  test::fs::create_directories(dir + "/runs/.bench-E1");
  test::write_file(dir + "/runs/.bench-E1/keep", "mine\n");
  test::fs::create_directories(dir + "/tmp");
  test::CmdResult r = test::run("cd " + dir + " && TMPDIR=" + dir + "/tmp " + kBench +
                                " --no-layer --no-attention --train-experts 1 --train-steps 3 "
                                "--data " +
                                test::data_path());
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::read_file(dir + "/runs/.bench-E1/keep") == "mine\n");
  CHECK(test::fs::is_empty(dir + "/tmp"));  // its own folder, removed after
  for (const std::string bad :
       {"--reps 0", "--reps -3", "--d-model 0", "--d-ff -5", "--tokens 0", "--experts 4,0",
        "--top-k 0", "--train-steps 0", "--threads -1", "--capacity-factor 0"}) {
    CAPTURE(bad);
    r = test::run(kBench + " " + bad);
    CHECK(r.rc == 2);
    CHECK(test::contains(r.output, bad.substr(0, bad.find(' '))));
    CHECK_FALSE(test::contains(r.output, "terminate"));
  }
}

TEST_CASE("untrusted: SIGINT or SIGTERM stop a rank waiting in the rendezvous at once") {
  const std::string dir = test::scratch_dir("untrusted_rendezvous");
  for (const auto& [sig, code] : {std::pair{"TERM", 143}, std::pair{"INT", 130}}) {
    CAPTURE(sig);
    const std::string out = dir + "/run-" + sig;
    // Rank 0 of 2 with no rank 1: it waits (dist.timeout_s = 300) until signalled.
    const sw::PortReservation reservation;
    const std::string rank0 = "RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
                              std::to_string(reservation.port()) + " " + kTrain + tiny_args(out) +
                              " --set dist.timeout_s=300";
    const test::CmdResult r = test::run(
        "(" + rank0 + " > " + out + ".log 2>&1 & p=$!; " + test::wait_for(out + ".log", "memory:") +
        "; kill -" + sig + " $p; s=$(date +%s); wait $p; echo rc=$? took=$(( $(date +%s) - s )))");
    INFO(r.output);
    INFO(test::read_file(out + ".log"));
    CHECK(test::contains(r.output, "rc=" + std::to_string(code)));
    const size_t at = r.output.find("took=");
    REQUIRE(at != std::string::npos);
    CHECK(std::stoi(r.output.substr(at + 5)) <= 5);
  }
}

TEST_CASE("untrusted: the values of state.json are range-checked") {
  const std::string dir = test::scratch_dir("untrusted_state");
  const std::string ck = tiny_run(dir + "/run", 5);
  const nlohmann::json good = nlohmann::json::parse(test::read_file(ck + "/state.json"));
  REQUIRE_NOTHROW(sw::parse_checkpoint_state(good.dump(), "state.json"));
  struct Case {
    const char* key;
    nlohmann::json value;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"step", -1, "step -1 is negative"},
      {"time_s", -5.0, "time_s -5 is not a finite number of seconds >= 0"},
      {"data_rng", {0, 0, 0, 0}, "'data_rng' is all zeros"},
      {"data_rng", {1, 2, 3}, "'data_rng' must be 4 unsigned integers"},
      {"best_val_loss", -1.0, "best_val_loss -1 is not a loss"},
      {"skipped_steps", 9, "skipped_steps 9 is not between 0 and step 5"},
      {"vocab", "", "the vocabulary is empty"},
      {"format_version", 99, "checkpoint format version 99 is not supported"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.key);
    nlohmann::json bad = good;
    bad[c.key] = c.value;
    const std::string msg =
        test::error_of([&] { sw::parse_checkpoint_state(bad.dump(), "state.json"); });
    CHECK(test::contains(msg, "state.json: " + c.expect));
  }
}

TEST_CASE("untrusted: numbers that would size threads or samples, and overlong paths") {
  const std::string dir = test::scratch_dir("untrusted_numbers");
  struct Case {
    std::string cmd, expect;
    int rc;
  };
  const std::string run = dir + "/run";
  tiny_run(run, 2);
  const std::string long_name(300, 'n');
  const std::vector<Case> cases = {
      {kTrain + tiny_args(dir + "/t") + " --set train.threads=1000000 --print-config",
       "train.threads = 1000000: must be <= 1024", 2},
      {kSample + " --run " + run + " --threads 1000000", "--threads", 2},
      {kSample + " --run " + run + " --temperature nan", "--temperature nan: must be a finite", 1},
      {kSample + " --run " + run + " --temperature inf", "must be a finite number >= 0", 1},
      {kTrain + tiny_args(dir + "/" + long_name) + " -q",
       "cannot create run directory '" + dir + "/" + long_name + "': File name too long", 1},
  };
  for (const auto& c : cases) {
    CAPTURE(c.cmd);
    const test::CmdResult r = test::run(c.cmd);
    INFO(r.output);
    CHECK(r.rc == c.rc);
    CHECK(test::contains(r.output, c.expect));
    CHECK(lines(r.output) <= 2);  // one line (CLI11 adds its "Run with --help" hint)
  }
}

TEST_CASE("untrusted: optim.pt is a plain dict, and the older module format is refused") {
  const std::string dir = test::scratch_dir("untrusted_optim_formats");
  const std::string args = " --set train.steps=20 --set train.checkpoint_every=10 -q";
  REQUIRE(test::run(kTrain + tiny_args(dir + "/run") + args).rc == 0);
  const std::string ck = dir + "/run/ckpt-000010";
  // The plain dict: three entries per parameter, read back by switch's own reader.
  const std::string bytes = test::read_file(ck + "/optim.pt");
  const c10::IValue plain = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  REQUIRE(plain.isGenericDict());
  CHECK(plain.toGenericDict().contains("state.0.exp_avg"));
  CHECK(plain.toGenericDict().contains("state.0.step"));
  // The same state as torch::save of the optimizer writes it (a TorchScript module archive
  // whose code LibTorch's loader would compile and run): refused, not loaded.
  sw::CheckpointMeta meta = sw::read_checkpoint_meta(ck);
  sw::Transformer m(meta.config, meta.vocab.size());
  auto opt = sw::make_optimizer(*m, meta.config.train);
  sw::load_optimizer_and_rng(ck, *opt, 0, 1);
  std::ostringstream legacy;
  torch::save(*opt, legacy);
  test::write_file(ck + "/optim.pt", legacy.str());
  test::fs::remove_all(dir + "/run/ckpt-000020");
  const test::CmdResult r = test::run(kTrain + " --out " + dir + "/run --resume -q");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, ck + "/optim.pt: an optimizer state in LibTorch's module format"));
  CHECK(test::contains(r.output, "TorchScript code, which switch does not run"));
  CHECK(lines(r.output) == 1);
  CHECK_FALSE(test::fs::exists(dir + "/run/ckpt-000020"));
}

TEST_CASE("untrusted: a malformed model.safetensors is refused, naming what is wrong") {
  const std::string dir = test::scratch_dir("untrusted_safetensors");
  const std::string ck = tiny_run(dir + "/run", 5);
  const std::string path = ck + "/model.safetensors";
  const std::string good = test::read_file(path);
  test::fs::remove(ck + "/model.pt");  // the weights then come from model.safetensors
  sw::CheckpointMeta meta = sw::read_checkpoint_meta(ck);
  sw::Transformer m(meta.config, meta.vocab.size());
  REQUIRE_NOTHROW(sw::load_weights(ck, *m));
  // A file of `header` (padded to 8) and `data` bytes.
  auto file = [](std::string header, const std::string& data) {
    header.append((8 - header.size() % 8) % 8, ' ');
    std::string out;
    for (int i = 0; i < 8; ++i)
      out.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
    return out + header + data;
  };
  const std::string f8(8, '\0');
  struct Case {
    std::string bytes, expect;
  };
  const std::vector<Case> cases = {
      {"abc", "3 bytes, shorter than the 8-byte header length"},
      {good.substr(0, 100), "a header of "},
      {std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}", "a header of "},
      {file("not json", ""), "the header is not JSON"},
      {file("[1, 2]", ""), "the header is not a JSON object"},
      {file(R"({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}})", f8),
       "tensor 'a': dtype \"F99\" is not one of F64, F32"},
      {file(R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", f8),
       "tensor 'a': shape [3] of F32 takes 12 bytes, data_offsets [0,8] hold 8"},
      {file(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", f8),
       "reach past the 8 bytes of data (truncated?)"},
      {file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", f8),
       "tensor 'a' starts at data byte 4, where 0 were expected"},
      {file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
            R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
            f8),
       "starts at data byte 4, where 8 were expected"},
      {file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", f8),
       "the tensors cover 4 of the 8 bytes of data"},
      {file(R"({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", f8),
       "holds a size that is not an integer in [0, 2^48]"},
      {file(R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})",
            f8),
       "spans more than 2^62 elements"},
      {file(R"({"a": {"dtype": "F32", "shape": [281474976710656, 281474976710656, 0],)"
            R"( "data_offsets": [0, 0]}})",
            ""),
       "spans more than 2^62 elements"},
      {file(
           R"({"__metadata__": null, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
           f8),
       "has no tensor 'tok_emb.weight' that this model needs"},  // null metadata: none
      {file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", f8),
       "is not [begin, end] with begin <= end"},
      {file(R"({"__metadata__": {"k": 1}})", ""), "__metadata__ entry 'k' is not a string"},
      {file(R"({"tok_emb.weight": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", f8),
       "tensor 'tok_emb.weight' has dtype Double; switch's weights are float32"},
      {file(R"({"extra": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", f8),
       "has no tensor 'tok_emb.weight' that this model needs"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.expect);
    test::write_file(path, c.bytes);
    const std::string msg = test::error_of([&] { sw::load_weights(ck, *m); });
    CHECK(test::contains(msg, path + ": "));
    CHECK(test::contains(msg, c.expect));
    CHECK(lines(msg) == 0);
  }
  // Through the binaries: one line, exit 1; the good file samples again.
  test::write_file(path, cases[3].bytes);
  const test::CmdResult r = test::run(kSample + " --run " + dir + "/run --chars 5");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "not a valid safetensors file"));
  CHECK(lines(r.output) == 1);
  test::write_file(path, good);
  CHECK(test::run(kSample + " --run " + dir + "/run --chars 5").rc == 0);
}

TEST_CASE("untrusted: a malformed data.pkl never reaches LibTorch's unpickler") {
  const std::string dir = test::scratch_dir("untrusted_pickle");
  const std::string ck = tiny_run(dir + "/run", 5);
  const std::string model = test::read_file(ck + "/model.pt");
  sw::CheckpointMeta meta = sw::read_checkpoint_meta(ck);
  sw::Transformer m(meta.config, meta.vocab.size());
  std::string deep = "\x80\x02";
  for (int i = 0; i < 1000000; ++i)
    deep += "](";
  deep += std::string(1000000, 'e') + ".";
  std::string chain = "\x80\x02]";
  for (int i = 0; i < 100; ++i)
    chain += "]";
  chain += std::string(100, 'a') + ".";
  struct Case {
    std::string pkl, expect;
  };
  const std::vector<Case> cases = {
      {std::string("\x80\x02\x85.", 4), "TUPLEn with too few items"},
      {std::string("\x80\x02K\x01R.", 6), "REDUCE with too few items"},
      {std::string("\x80\x02\x81.", 4), "opcode 0x81 is not one a tensor archive uses"},
      {std::string("\x80\x02h\x05.", 5), "GET of a memo entry never PUT"},
      {std::string("\x80\x02(K\x01"
                   "d.",
                   7),
       "DICT of an odd number of items"},
      {std::string("\x80\x02X\xff\xff\xff\xff", 7), "a string longer than the data"},
      {std::string("\x80\x02") + "cos\nsystem\n.", "global 'os.system' is not one"},
      {std::string("\x80\x02r\xff\xff\xff\x7f.", 8), "a memo index out of range"},
      {deep, "too many open MARKs"},
      {chain, "nested deeper than 32"},
      {std::string("\x80\x02K\x01", 4), "ends without STOP"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.expect);
    test::write_file(ck + "/model.pt", model);
    rewrite_archive(ck + "/model.pt", [&](const std::string& name, std::string& bytes) {
      if (name == "data.pkl") bytes = c.pkl;
    });
    const std::string msg = test::error_of([&] { sw::load_weights(ck, *m); });
    CHECK(test::contains(msg, ck + "/model.pt (data.pkl): malformed pickle at byte "));
    CHECK(test::contains(msg, c.expect));
  }
  // Through the binaries: one line, exit 1.
  const test::CmdResult r = test::run(kSample + " --run " + dir + "/run --chars 5");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(lines(r.output) == 1);
  test::write_file(ck + "/model.pt", model);
  CHECK_NOTHROW(sw::load_weights(ck, *m));
}

TEST_CASE("untrusted: odd checkpoint folders and metrics lines are passed over") {
  const std::string dir = test::scratch_dir("untrusted_odd_run");
  const std::string run = dir + "/run";
  const std::string ck = tiny_run(run, 5);
  // A step past int64 in a folder name, a folder that links to itself.
  test::fs::create_directories(run + "/ckpt-99999999999999999999");
  test::fs::copy_file(ck + "/state.json", run + "/ckpt-99999999999999999999/state.json");
  test::fs::create_directory_symlink("ckpt-000077", run + "/ckpt-000077");
  CHECK(sw::newest_checkpoint(run).value() == ck);
  // Metrics lines of other types than switch writes.
  {
    std::ofstream f(run + "/metrics.jsonl", std::ios::app);
    f << R"({"kind":"train","step":"x"})"
      << "\n"
      << R"({"kind":"train","step":1e300})"
      << "\n"
      << R"({"kind":"train","step":3,"layers":[{}]})"
      << "\n"
      << R"({"kind":"train","step":3,"layers":[{"counts":["a"]}]})"
      << "\n"
      << R"({"kind":"eval","step":3,"time_s":"soon","val_loss":1})"
      << "\n";
  }
  const size_t kept = sw::read_metrics(run + "/metrics.jsonl").size();
  CHECK(test::run(kTrain + " --out " + run + " --resume -q --set train.steps=10").rc == 0);
  CHECK(sw::read_metrics(run + "/metrics.jsonl").size() > kept - 1);
  // A FIFO as the metrics file is refused, not waited on.
  test::fs::remove(run + "/metrics.jsonl");
  REQUIRE(test::run("mkfifo " + run + "/metrics.jsonl").rc == 0);
  const test::CmdResult r =
      test::run("timeout 60 " + kTrain + " --out " + run + " --resume -q --set train.steps=12");
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "metrics.jsonl' is not a regular file"));
}
