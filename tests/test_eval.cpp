// switch-eval: a checkpoint measured without training it. It gives back the losses its run
// recorded, its capacity curve ends dropless, a router built by hand gives the heatmap it
// must, its logits agree with switch-sample, and bad input is refused by name.
#include <unistd.h>

#include <cmath>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "eval/eval.h"
#include "eval/routing.h"
#include "helpers.h"
#include "train/evaluate.h"
#include "train/metrics.h"
#include "train/run_dir.h"
#include "train/trained_model.h"
#include "train/trainer.h"

namespace {

const std::string kEval = SWITCH_EVAL_BIN;
const std::string kSample = SWITCH_SAMPLE_BIN;

// The tiny run (60 steps, evaluations and checkpoints at 30 and 60), trained once per
// process: ctest runs each test case as a process of its own, several at once under -j, so
// each has its own folder (named by its pid), removed when it ends.
struct TinyRun {
  TinyRun() : dir(test::scratch_dir("eval_tiny_run_" + std::to_string(::getpid()))) {
    sw::TrainOptions opt;
    opt.out_dir = dir;
    opt.quiet = true;
    sw::train(test::tiny_config(), opt);
  }
  ~TinyRun() {
    std::error_code ec;
    test::fs::remove_all(dir, ec);
  }
  std::string dir;
};

const std::string& tiny_run() {
  static const TinyRun run;
  return run.dir;
}

nlohmann::json eval_json(const std::string& args) {
  const test::CmdResult r =
      test::run(kEval + " --run " + test::quote(tiny_run()) + args + " --json");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  // stderr (the files written) follows the document on the same stream.
  return nlohmann::json::parse(r.output.substr(0, r.output.rfind("}\n") + 1));
}

// The eval record of `step` in the run's metrics.jsonl.
nlohmann::json recorded_eval(int64_t step) {
  for (const auto& rec : sw::read_metrics(tiny_run() + "/metrics.jsonl"))
    if (rec["kind"] == "eval" && rec["step"] == step) return rec;
  FAIL("no eval record of step " << step);
  return {};
}

}  // namespace

TEST_CASE("switch-eval gives back the losses its run recorded, while the run holds its lock") {
  const std::string run = tiny_run();
  // A reader takes no lock: it reads a run whose writer still holds it.
  const sw::DirLock writer = sw::lock_run_dir(run);
  for (int64_t step : {30, 60}) {
    CAPTURE(step);
    const nlohmann::json rec = recorded_eval(step);
    const nlohmann::json val = eval_json(" --ckpt " + std::to_string(step));
    CHECK(val["checkpoint"]["step"] == step);
    CHECK(val["data"]["split"] == "val");
    CHECK(val["data"]["batches"] == 4);
    CHECK(std::abs(val["loss"].get<double>() - rec["val_loss"].get<double>()) < 1e-6);
    CHECK(val["bits_per_char"].get<double>() ==
          doctest::Approx(val["loss"].get<double>() / std::log(2.0)).epsilon(1e-12));
    const nlohmann::json train = eval_json(" --ckpt " + std::to_string(step) + " --split train");
    CHECK(std::abs(train["loss"].get<double>() - rec["train_loss"].get<double>()) < 1e-6);
  }
  // The newest checkpoint by default; a line per MoE layer in the text.
  const test::CmdResult r = test::run(kEval + " --run " + test::quote(run));
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::contains(r.output, "step 60"));
  CHECK(test::contains(r.output,
                       fmt::format("loss {:.4f}", recorded_eval(60)["val_loss"].get<double>())));
  CHECK(test::contains(r.output, "eval capacity factor 2, drop policy random"));
}

TEST_CASE("switch-eval reads a run that is training and pruning its checkpoints") {
  const std::string dir = test::scratch_dir("eval_while_training");
  const std::string run = test::quote(dir + "/run");
  const std::string script =
      std::string(SWITCH_TRAIN_BIN) + " --config " +
      test::quote(test::source_path("configs/tiny.json")) +
      " --set data.path=" + test::quote(test::data_path()) +
      " --set train.steps=1000000 --set train.checkpoint_every=2 --set train.keep_checkpoints=1"
      " --set train.eval_every=1000000 --set train.threads=1 -q --out " +
      run + " & tp=$!; " + "for i in $(seq 1200); do ls " + run +
      " 2>/dev/null | grep -q '^ckpt-[0-9]*$' && break; sleep 0.1; done; " +
      "ok=0; for i in 1 2 3 4 5 6 7 8; do " + kEval + " --run " + run +
      " --batches 1 --threads 1 > /dev/null && ok=$((ok+1)); done; " +
      "kill -INT $tp; wait $tp; echo \"trainer exit $?, evaluations done: $ok\"";
  const test::CmdResult r = test::run(script);
  INFO(r.output);
  CHECK(test::contains(r.output, "trainer exit 130, evaluations done: 8"));
}

TEST_CASE("switch-eval's capacity curve: dropped falls as the factor grows and none is dropless") {
  const nlohmann::json doc =
      eval_json(" --capacity-factors 0.25,0.5,1,2,1000,none --drop-policies random,position");
  const nlohmann::json& curve = doc["capacity_curve"];
  REQUIRE(curve.size() == 12);
  for (size_t p = 0; p < 2; ++p) {
    const nlohmann::json* prev = nullptr;
    for (size_t i = 0; i < 6; ++i) {
      const nlohmann::json& pt = curve[p * 6 + i];
      CHECK(pt["drop_policy"] == (p == 0 ? "random" : "position"));
      REQUIRE(pt["layers"].size() == 2);
      // In the first MoE layer the count dropped depends on the capacity alone, not on who
      // is dropped (later layers route what the earlier drops made).
      const nlohmann::json& first = pt["layers"][0];
      CHECK(first["dropped_pct"] == curve[i]["layers"][0]["dropped_pct"]);
      if (prev != nullptr)
        CHECK(first["dropped_pct"].get<double>() <=
              (*prev)["layers"][0]["dropped_pct"].get<double>());
      prev = &pt;
    }
    CHECK(curve[p * 6]["dropped_pct"].get<double>() > 10);  // a quarter of the seats
    CHECK(curve[p * 6 + 5]["capacity_factor"] == "none");
    CHECK(curve[p * 6 + 5]["dropped_pct"] == 0.0);
    CHECK(curve[p * 6 + 4]["dropped_pct"] == 0.0);
    // With nothing dropped, a capacity routes as dropless does.
    CHECK(std::abs(curve[p * 6 + 4]["loss"].get<double>() -
                   curve[p * 6 + 5]["loss"].get<double>()) < 1e-6);
  }
  // Who is dropped matters when many are.
  CHECK(curve[0]["loss"] != curve[6]["loss"]);
  // The run's own factor and policy give the plain evaluation.
  CHECK(std::abs(curve[3]["loss"].get<double>() - doc["loss"].get<double>()) < 1e-12);

  // `none` is the loss of the same model evaluated in this process without capacity.
  sw::TrainedModel t = sw::load_trained_model(tiny_run(), -1, "evaluate");
  t.model->configure_moe([](sw::MoeConfig& m) { m.drop_tokens = false; });
  const sw::Config& cfg = t.meta.config;
  const sw::Dataset data(sw::Dataset::read_text(cfg.data.path), t.meta.vocab, cfg.data.val_fraction,
                         cfg.model.seq_len);
  const sw::EvalResult dropless = sw::evaluate_shares(
      t.model, sw::fixed_batches(data, sw::Split::Val, cfg.train, sw::kValSalt), 1);
  CHECK(std::abs(curve[5]["loss"].get<double>() - dropless.loss) < 1e-6);
  for (const sw::LayerEval& l : dropless.layers)
    CHECK(l.dropped == 0);

  // The pictures and eval.json, in the folder asked for.
  const std::string out = test::scratch_dir("eval_curve_out");
  const test::CmdResult r = test::run(kEval + " --run " + test::quote(tiny_run()) +
                                      " --capacity-factors 0.5,2,none --out " + test::quote(out));
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::contains(r.output, "capacity curve"));
  CHECK(nlohmann::json::parse(test::read_file(out + "/eval.json"))["capacity_curve"].size() == 3);
  CHECK(test::fs::file_size(out + "/capacity.png") > 1000);

  // A run's folder as --out gets the evaluation's pictures, not the run's.
  const test::CmdResult in_run =
      test::run(kEval + " --run " + test::quote(tiny_run()) + " --capacity-factors 1 --out " +
                test::quote(tiny_run()));
  INFO(in_run.output);
  CHECK(in_run.rc == 0);
  CHECK(test::fs::file_size(tiny_run() + "/capacity.png") > 1000);
  CHECK_FALSE(test::fs::exists(tiny_run() + "/plots"));
  test::fs::remove(tiny_run() + "/capacity.png");
  test::fs::remove(tiny_run() + "/eval.json");
}

TEST_CASE("switch-eval: a dropless run's curve point is its own setting, dropless") {
  const std::string dir = test::scratch_dir("eval_dropless_run");
  sw::Config cfg = test::tiny_config();
  cfg.moe.drop_tokens = false;
  cfg.train.steps = 10;
  sw::TrainOptions opt;
  opt.out_dir = dir;
  opt.quiet = true;
  sw::train(cfg, opt);
  const test::CmdResult r =
      test::run(kEval + " --run " + test::quote(dir) + " --drop-policies random,position --json");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  const nlohmann::json doc = nlohmann::json::parse(r.output.substr(0, r.output.rfind("}\n") + 1));
  REQUIRE(doc["capacity_curve"].size() == 2);
  for (const auto& pt : doc["capacity_curve"]) {
    CHECK(pt["capacity_factor"] == "none");
    CHECK(pt["dropped_pct"] == 0.0);
    CHECK(pt["loss"] == doc["loss"]);
  }
}

TEST_CASE("switch-eval --routing: a router made by hand gives the heatmap it must") {
  // One MoE block whose router reads the character alone: no position embedding, the
  // attention's output projection zero, character c's embedding 1 at dimension c % 4 (the
  // LayerNorm keeps that dimension the largest), the router the identity on dimensions 0..3.
  sw::Config cfg = test::tiny_config();
  cfg.model.n_layers = 1;
  cfg.model.d_model = 8;
  cfg.model.pos_emb = false;
  cfg.moe.n_experts = 4;
  const int64_t V = 10, E = 4;
  sw::Transformer model(cfg, V);
  {
    torch::NoGradGuard no_grad;
    model->tok_emb->weight.zero_();
    for (int64_t c = 0; c < V; ++c)
      model->tok_emb->weight[c][c % E] = 1.0;
    const sw::Block& b = model->block_list.at(0);
    b->attn->proj->weight.zero_();
    b->attn->proj->bias.zero_();
    auto& router = b->switch_->router->proj;
    router->weight.zero_();
    router->bias.zero_();
    for (int64_t e = 0; e < E; ++e)
      router->weight[e][e] = 1.0;
  }
  std::u32string chars;
  for (int64_t c = 0; c < V; ++c)
    chars += static_cast<char32_t>(U'a' + c);
  const sw::Vocab vocab(chars);
  // Character c appears c + 1 times, in rows of 8 positions, over two batches of 4 rows.
  std::vector<int64_t> ids;
  for (int64_t c = 0; c < V; ++c)
    ids.insert(ids.end(), static_cast<size_t>(c + 1), c);
  ids.resize(64, 9);  // the rest: 'j'
  const torch::Tensor all = torch::tensor(ids, torch::kInt64).view({2, 4, 8});
  const std::vector<sw::Batch> batches = {{all[0], all[0]}, {all[1], all[1]}};
  for (int64_t world : {1, 2}) {
    CAPTURE(world);
    sw::RoutingAnalysis analysis(vocab, E, 1, 3);
    analysis.reserve(batches.size() * static_cast<size_t>(world));
    sw::evaluate_shares(
        model, batches, world,
        [&](size_t batch, int64_t share, const torch::Tensor& x, const sw::ModelOutput& out) {
          analysis.observe(static_cast<size_t>(share) * batches.size() + batch, x, out);
        });
    const nlohmann::ordered_json j = analysis.json(analysis.combine());
    // Characters by frequency: 'j' (10 + the 9 that fill the rows), then i, h, ..., a.
    const auto& rows = j["characters"];
    REQUIRE(rows.size() == 10);
    CHECK(rows[0]["char"] == "j");
    CHECK(rows[0]["count"] == 19);
    for (int64_t i = 1; i < 10; ++i) {
      CHECK(rows[i]["char"] == std::string(1, static_cast<char>('i' - (i - 1))));
      CHECK(rows[i]["count"] == 9 - (i - 1));
    }
    const auto& layer = j["layers"][0];
    for (size_t i = 0; i < 10; ++i) {
      const int64_t c = rows[i]["char"].get<std::string>()[0] - 'a';
      for (int64_t e = 0; e < E; ++e)
        CHECK(layer["fraction"][i][e] == (e == c % E ? 1.0 : 0.0));
    }
    // The character says all there is about the expert.
    CHECK(layer["mutual_information_bits"].get<double>() ==
          doctest::Approx(layer["expert_entropy_bits"].get<double>()).epsilon(1e-9));
    // Expert 1 gets b (2), f (6) and j (19): 27 of 64.
    CHECK(layer["load"][1].get<double>() == doctest::Approx(27.0 / 64));
    for (int64_t e = 0; e < E; ++e)
      for (const auto& s : layer["experts"][e]["surest"])
        CHECK((s["token"].get<std::string>()[0] - 'a') % E == e);
  }
}

TEST_CASE("switch-eval --logits: a dict torch.load reads, whose argmax is switch-sample's text") {
  const std::string out = test::scratch_dir("eval_logits");
  const test::CmdResult s = test::run(kSample + " --run " + test::quote(tiny_run()) +
                                      " --prompt ROMEO: --temperature 0 --chars 12");
  REQUIRE(s.rc == 0);
  REQUIRE(s.output.size() == 19);  // "ROMEO:", 12 characters (the vocabulary is ASCII), "\n"
  const std::string text = s.output.substr(0, 18);
  const std::string file = out + "/logits.pt";
  const test::CmdResult r =
      test::run(kEval + " --run " + test::quote(tiny_run()) + " --logits " + test::quote(file) +
                " --prompt " + test::quote(text.substr(0, 17)));
  INFO(r.output);
  REQUIRE(r.rc == 0);
  CHECK(test::contains(r.output, "logits of 17 characters"));
  const std::string bytes = test::read_file(file);
  const c10::IValue v = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  REQUIRE(v.isGenericDict());
  const auto dict = v.toGenericDict();
  const torch::Tensor logits = dict.at("logits").toTensor(), vocab = dict.at("vocab").toTensor();
  REQUIRE(logits.sizes() == torch::IntArrayRef({1, 17, vocab.size(0)}));
  CHECK(std::string(c10::toString(logits.scalar_type())) == "Float");
  const torch::Tensor next = logits[0].argmax(-1);
  for (int64_t pos = 5; pos < 17; ++pos) {
    CAPTURE(pos);
    CHECK(vocab[next[pos].item<int64_t>()].item<int64_t>() == text[static_cast<size_t>(pos) + 1]);
  }
  const torch::Tensor ids = dict.at("input_ids").toTensor();
  CHECK(vocab[ids[0][0].item<int64_t>()].item<int64_t>() == 'R');

  // Without a prompt: the first seq_len characters of the split.
  const test::CmdResult d =
      test::run(kEval + " --run " + test::quote(tiny_run()) + " --logits " + test::quote(file));
  CHECK(d.rc == 0);
  CHECK(test::contains(d.output, "logits of 32 characters"));
}

TEST_CASE("switch-eval scores any text: every character once, unknown ones named or left out") {
  const std::string dir = test::scratch_dir("eval_text");
  const std::string file = dir + "/text.txt";
  const std::string speech = "First Citizen:\nBefore we proceed any further, hear me speak.\n";
  test::write_file(file, speech);
  const nlohmann::json doc = eval_json(" --data " + test::quote(file));
  CHECK(doc["data"]["split"] == "all");
  CHECK(doc["data"]["batches"] == "all");
  CHECK(doc["data"]["characters"] == speech.size() - 1);  // each but the first predicted
  CHECK(doc["loss"].get<double>() > 0);

  test::write_file(file, "caf\xC3\xA9 au lait, caf\xC3\xA9 noir\xE2\x80\xA6");
  test::CmdResult r =
      test::run(kEval + " --run " + test::quote(tiny_run()) + " --data " + test::quote(file));
  INFO(r.output);
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "3 characters are not in the model's vocabulary"));
  CHECK(test::contains(r.output, "U+00E9 'é' at positions 3, 17"));
  CHECK(test::contains(r.output, "U+2026"));
  CHECK(test::contains(r.output, "--skip-unknown"));
  const nlohmann::json skipped = eval_json(" --data " + test::quote(file) + " --skip-unknown");
  CHECK(skipped["data"]["skipped"] == 3);
  CHECK(skipped["data"]["characters"] == 24 - 3 - 1);
}

TEST_CASE("switch-eval refuses bad input by name") {
  const std::string run = test::quote(tiny_run());
  struct Case {
    std::string args;
    int rc;
    std::string says;
  };
  const std::vector<Case> cases = {
      {" --ckpt 45", 1, "has no complete checkpoint of step 45; it has steps 30, 60"},
      {" --ckpt=-2", 2, "--ckpt -2"},
      {" --capacity-factors 0.5,x", 2, "'x' is not a positive number (up to 1e6) or 'none'"},
      {" --capacity-factors 1,,2", 2, "'' is not a positive number"},
      {" --capacity-factors 0", 2, "'0' is not a positive number"},
      {" --capacity-factors=-1", 2, "'-1' is not a positive number"},
      {" --capacity-factors inf", 2, "'inf' is not a positive number"},
      {" --drop-policies random,bogus", 2,
       "'bogus' is not a drop policy (one of random | position"},
      {" --batches 0", 2, "--batches '0'"},
      {" --batches ten", 2, "--batches 'ten'"},
      {" --split tset", 2, "--split 'tset': give val, train, test or all"},
      {" --split test", 1, "the run holds out no test part (its data.test_fraction is 0)"},
      {" --prompt hi", 2, "--prompt requires --logits"},
      {" --top-tokens 3", 2, "--top-tokens requires --routing"},
      {" --logits /nonexistent-dir/l.pt", 1, "/nonexistent-dir/l.pt"},
      {" --logits x.pt --prompt " + std::string(40, 'a'), 1,
       "--prompt holds 40 characters: give 1 to 32"},
      {" --logits x.pt --prompt caf\xC3\xA9", 1, "U+00E9 'é' at position 3"},
      {" --data /nonexistent.txt", 1, "data file '/nonexistent.txt' does not exist"},
      {" --routing --out " + test::quote(tiny_run() + "/config.json"), 1,
       "config.json' is a file, not a folder"},
      {" --capacity-factors 1e300", 2, "'1e300' is not a positive number (up to 1e6)"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.args);
    const test::CmdResult r = test::run(kEval + " --run " + run + c.args);
    CHECK(r.rc == c.rc);
    CHECK(test::contains(r.output, c.says));
    CHECK_FALSE(test::contains(r.output, "internal error"));
  }
  const test::CmdResult missing = test::run(kEval + " --run /nonexistent-run");
  CHECK(missing.rc == 1);
  CHECK(test::contains(missing.output, "--run '/nonexistent-run' is not a directory"));
  const std::string empty = test::scratch_dir("eval_empty_run");
  const test::CmdResult none = test::run(kEval + " --run " + test::quote(empty));
  CHECK(none.rc == 1);
  CHECK(test::contains(none.output, "has no complete checkpoint (ckpt-*/) to evaluate"));
  test::fs::remove("x.pt");
}

TEST_CASE("a multi-script text of 3,000 characters: train, sample and eval on its test split") {
  // Words over Latin, Greek, Cyrillic, Hebrew, Arabic, Devanagari, kana, CJK, Hangul and
  // emoji: 3,000 distinct characters (uint16 ids), each at least once, then a skewed draw.
  std::u32string pool;
  for (const auto& [first, count] : std::vector<std::pair<char32_t, int>>{{0xC0, 60},
                                                                          {0x391, 50},
                                                                          {0x410, 60},
                                                                          {0x5D0, 27},
                                                                          {0x628, 20},
                                                                          {0x905, 50},
                                                                          {0x3041, 80},
                                                                          {0x4E00, 2400},
                                                                          {0xAC00, 200},
                                                                          {0x1F600, 53}})
    for (int i = 0; i < count; ++i)
      pool.push_back(first + static_cast<char32_t>(i));
  REQUIRE(pool.size() == 3000);
  std::u32string text = pool;
  uint64_t state = 12345;
  while (text.size() < 60000) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const uint64_t r = state >> 33;
    text.push_back(r % 7 == 0 ? U' ' : r % 61 == 0 ? U'\n' : pool[(r % 3000) * (r % 3000) / 3000]);
  }
  const std::string dir = test::scratch_dir("eval_multiscript");
  test::write_file(dir + "/scripts.txt", sw::utf8_encode(text));
  const test::CmdResult t =
      test::run(std::string(SWITCH_TRAIN_BIN) + " --config " +
                test::quote(test::source_path("configs/tiny.json")) +
                " --set data.path=" + test::quote(dir + "/scripts.txt") +
                " --set data.test_fraction=0.1 --set train.steps=20 --set train.eval_every=10"
                " --set train.checkpoint_every=20 --out " +
                test::quote(dir + "/run"));
  INFO(t.output);
  REQUIRE(t.rc == 0);
  CHECK(
      test::contains(t.output, "vocabulary 3002, train 48000 / val 6000 / test 6000; uint16 ids"));

  const sw::Vocab vocab = sw::Vocab::from_text(text);
  const test::CmdResult s =
      test::run(kSample + " --run " + test::quote(dir + "/run") + " --chars 300 --seed 5");
  REQUIRE(s.rc == 0);
  const std::u32string sampled = sw::utf8_decode(s.output, "sample");
  CHECK(sampled.size() >= 300);
  int outside_ascii = 0;
  for (char32_t c : sampled) {
    CHECK(vocab.contains(c));
    outside_ascii += c >= 0x80;
  }
  CHECK(outside_ascii > 100);

  const test::CmdResult e = test::run(kEval + " --run " + test::quote(dir + "/run") +
                                      " --split test --batches all --json --no-plot");
  REQUIRE(e.rc == 0);
  const auto j = nlohmann::json::parse(e.output.substr(0, e.output.rfind("}\n") + 1));
  CHECK(j["data"]["split"] == "test");
  CHECK(j["data"]["characters"] == 5999);  // every character of the test part but the first
  const double loss = j["loss"].get<double>();
  CHECK(std::isfinite(loss));
  CHECK(loss < std::log(3002.0));  // learnt something of the skewed draw in 20 steps

  const test::CmdResult no_test =
      test::run(kEval + " --run " + test::quote(tiny_run()) + " --split test");
  CHECK(no_test.rc != 0);
  CHECK(test::contains(no_test.output,
                       "--split test: the run holds out no test part (its data.test_fraction "
                       "is 0)"));
}
