// End to end through the library: a tiny run whose loss falls, its files, exact resume,
// micro-batches, checkpoint errors and non-finite steps.
#include <cmath>
#include <sstream>

#include <caffe2/serialize/inline_container.h>

#include <doctest/doctest.h>

#include "helpers.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/schedule.h"
#include "train/tensor_files.h"
#include "train/trainer.h"
#include "train/upcycle.h"
#include "util/error.h"

namespace {

nlohmann::ordered_json train_tiny(const std::string& dir, const sw::Config& c) {
  sw::TrainOptions opt;
  opt.out_dir = dir;
  opt.quiet = true;
  return sw::train(c, opt);
}

// The tiny model made dense, 30 steps: the source of the upcycling tests.
sw::Config dense_tiny_config() {
  sw::Config c = test::tiny_config();
  c.moe.every = 0;
  c.train.steps = 30;
  return c;
}

}  // namespace

TEST_CASE("a tiny run's loss falls and it writes every file of a run directory") {
  const std::string dir = test::scratch_dir("tiny_run");
  sw::Config c = test::tiny_config();
  nlohmann::ordered_json summary = train_tiny(dir, c);

  std::vector<nlohmann::json> records = sw::read_metrics(dir + "/metrics.jsonl");
  REQUIRE(!records.empty());
  const nlohmann::json& first = records.front();
  CHECK(first["kind"] == "train");
  // Every field the README documents for a single-process train record, with its meaning.
  for (const char* key :
       {"step", "time_s", "lr", "loss", "ce", "lb_loss", "z_loss", "drop_frac", "tokens_per_s",
        "grad_norm", "steps_in_record", "ms_forward", "ms_backward", "ms_optimizer", "layers"})
    CHECK_MESSAGE(first.contains(key), key);
  CHECK_FALSE(first.contains("comm"));          // several ranks only
  CHECK_FALSE(first.contains("balance_loss"));  // moe.balance = aux_loss: it is lb_loss
  CHECK(first["steps_in_record"] == 10);
  CHECK(first["step"] == 10);
  for (const char* phase : {"ms_forward", "ms_backward", "ms_optimizer"})
    CHECK_MESSAGE(first[phase].get<double>() > 0, phase);
  CHECK(first["z_loss"].get<double>() > 0);
  CHECK(first["grad_norm"].get<double>() > 0);
  CHECK(first["drop_frac"].get<double>() >= 0);
  CHECK(first["drop_frac"].get<double>() <= 1);
  // loss = ce + alpha * lb + z weight * z (the record's averages).
  CHECK(first["loss"].get<double>() ==
        doctest::Approx(first["ce"].get<double>() + c.moe.alpha * first["lb_loss"].get<double>() +
                        c.moe.z_loss * first["z_loss"].get<double>())
            .epsilon(1e-9));
  REQUIRE(first["layers"].size() == 2);
  const nlohmann::json& layer = first["layers"][0];
  CHECK(layer["counts"].size() == 4);
  CHECK(layer["prob_sum"].size() == 4);
  int64_t routed = 0;
  for (const auto& n : layer["counts"])
    routed += n.get<int64_t>();
  CHECK(routed == layer["tokens"].get<int64_t>());
  CHECK(layer["tokens"].get<int64_t>() == 10 * 8 * 32);  // log_every * batch * seq_len

  const double first_ce = first["ce"].get<double>();
  const double final_val = summary["final_val_loss"].get<double>();
  MESSAGE("first train ce " << first_ce << " -> final val loss " << final_val);
  CHECK(first_ce > 3.5);              // ~ln(65) at the start
  CHECK(final_val < first_ce - 0.5);  // it learned something

  int evals = 0;
  for (const auto& r : records) {
    evals += r["kind"] == "eval";
    // Each train record's lr is the schedule's at the record's last step (0-based step - 1).
    if (r["kind"] == "train")
      CHECK(r["lr"].get<double>() == sw::lr_at(c.train, r["step"].get<int64_t>() - 1));
  }
  // Warmup to train.lr over train.warmup steps, then down to min_lr at the last step.
  CHECK(records.front()["lr"].get<double>() == doctest::Approx(c.train.lr));  // step 10 = warmup
  CHECK(records[records.size() - 2]["lr"].get<double>() ==
        doctest::Approx(c.train.min_lr).epsilon(0.01));
  CHECK(evals == 2);  // steps 30 and 60
  for (const char* key :
       {"steps", "final_train_loss", "final_val_loss", "best_val_loss", "wall_s", "tokens_per_s",
        "tokens_trained", "params_total", "params_active", "threads", "ranks", "expert_parallel"})
    CHECK_MESSAGE(summary.contains(key), key);
  const nlohmann::json& last_eval = records.back();
  REQUIRE(last_eval["kind"] == "eval");
  for (const char* key : {"step", "time_s", "val_loss", "train_loss"})
    CHECK_MESSAGE(last_eval.contains(key), key);
  CHECK(summary["steps"] == 60);
  CHECK(summary["tokens_trained"] == 60 * 8 * 32);  // steps * batch * seq_len
  CHECK(summary["threads"] == 2);                   // train.threads of the tiny config
  CHECK(summary["ranks"] == 1);
  CHECK(summary["expert_parallel"] == false);
  CHECK(summary["final_val_loss"] == last_eval["val_loss"]);
  CHECK(summary["final_train_loss"] == last_eval["train_loss"]);
  CHECK(summary["best_val_loss"].get<double>() <= summary["final_val_loss"].get<double>());
  CHECK(summary["params_active"].get<int64_t>() < summary["params_total"].get<int64_t>());
  CHECK(test::fs::exists(dir + "/summary.json"));
  CHECK(test::fs::exists(dir + "/ckpt-000060/model.pt"));
  CHECK(test::fs::exists(dir + "/ckpt-000030/state.json"));

  sw::Config saved;
  sw::apply_file(saved, dir + "/config.json");
  CHECK(sw::to_json(saved) == sw::to_json(c));
}

TEST_CASE("resume from a checkpoint reproduces the straight run exactly") {
  // Also with every option of the lab on: the balancing biases are model state.
  sw::Config c = test::tiny_config();
  std::string tag;
  SUBCASE("the defaults") {}
  SUBCASE("bias balancing, rerouting, shared experts, swiglu, sigmoid") {
    c.moe.balance = sw::Balance::Bias;
    c.moe.overflow = sw::Overflow::Reroute;
    c.moe.shared_experts = 1;
    c.moe.score = sw::Score::Sigmoid;
    c.model.activation = sw::Activation::Swiglu;
    tag = "_lab";
  }
  const std::string straight = test::scratch_dir("resume_straight" + tag);
  train_tiny(straight, c);

  // Same run, then forget everything after step 30 and resume from ckpt-000030.
  const std::string resumed = test::scratch_dir("resume_resumed" + tag);
  train_tiny(resumed, c);
  test::fs::remove_all(resumed + "/ckpt-000060");
  test::fs::remove(resumed + "/summary.json");
  sw::TrainOptions opt;
  opt.out_dir = resumed;
  opt.quiet = true;
  opt.resume = true;
  sw::train(sw::resume_config(resumed), opt);

  const std::string a = test::read_file(straight + "/ckpt-000060/model.pt");
  const std::string b = test::read_file(resumed + "/ckpt-000060/model.pt");
  REQUIRE(!a.empty());
  CHECK_MESSAGE(a == b, "weights after resume differ from the straight run");

  auto ra = sw::read_metrics(straight + "/metrics.jsonl");
  auto rb = sw::read_metrics(resumed + "/metrics.jsonl");
  REQUIRE(ra.size() == rb.size());
  for (size_t i = 0; i < ra.size(); ++i) {
    CAPTURE(i);
    CHECK(ra[i]["step"] == rb[i]["step"]);
    const char* key = ra[i]["kind"] == "eval" ? "val_loss" : "ce";
    CHECK(ra[i][key].get<double>() == rb[i][key].get<double>());
  }
}

TEST_CASE("moe.balance and moe.score: the objective in the records is the one trained") {
  const std::string dir = test::scratch_dir("balance_records");
  sw::Config c = test::tiny_config();
  c.train.steps = 10;
  c.train.log_every = 5;
  c.moe.balance = sw::Balance::Variance;
  c.moe.score = sw::Score::Sigmoid;
  c.moe.alpha = 3.0;  // large enough that the term shows in the loss
  train_tiny(dir, c);
  int records = 0;
  for (const auto& r : sw::read_metrics(dir + "/metrics.jsonl")) {
    if (r["kind"] != "train") continue;
    ++records;
    REQUIRE(r.contains("balance_loss"));
    const double bal = r["balance_loss"].get<double>();
    CHECK(bal > 0);
    CHECK(bal < 0.25);  // a variance of probabilities that sum to 1
    CHECK(r["loss"].get<double>() == doctest::Approx(r["ce"].get<double>() + 3.0 * bal +
                                                     c.moe.z_loss * r["z_loss"].get<double>()));
    CHECK(r["lb_loss"].get<double>() > 0.5);  // the Switch loss, reported alongside
  }
  CHECK(records == 2);
  // The default records no separate term: its balancing term is lb_loss.
  const std::string plain = test::scratch_dir("balance_records_default");
  sw::Config d = test::tiny_config();
  d.train.steps = 5;
  train_tiny(plain, d);
  int plain_records = 0;
  for (const auto& r : sw::read_metrics(plain + "/metrics.jsonl")) {
    plain_records += r["kind"] == "train" ? 1 : 0;
    CHECK_FALSE(r.contains("balance_loss"));
  }
  CHECK(plain_records == 1);
  // What is trained: under `none` moe.alpha weighs nothing (bit for bit the same run), under
  // `variance` it changes the run.
  auto mean_ce = [&](sw::Balance b, double alpha, const std::string& name) {
    sw::Config e = test::tiny_config();
    e.train.steps = 6;
    e.train.log_every = 6;
    e.moe.balance = b;
    e.moe.alpha = alpha;
    const std::string run = test::scratch_dir(name);
    train_tiny(run, e);
    for (const auto& r : sw::read_metrics(run + "/metrics.jsonl"))
      if (r["kind"] == "train") return r["ce"].get<double>();
    return -1.0;
  };
  CHECK(mean_ce(sw::Balance::None, 0.0, "balance_none_0") ==
        mean_ce(sw::Balance::None, 5.0, "balance_none_5"));
  CHECK(mean_ce(sw::Balance::Variance, 0.0, "balance_variance_0") !=
        mean_ce(sw::Balance::Variance, 5.0, "balance_variance_5"));
}

TEST_CASE("micro-batches: the same bits on one thread and on two, resumed on the other") {
  sw::Config c = test::tiny_config();
  c.train.steps = 20;
  c.train.eval_every = 10;
  c.train.checkpoint_every = 10;
  c.train.micro_batches = 2;
  c.moe.jitter = 0.1;  // random draws in the router and the drop order, on every thread
  std::string weights[2];
  std::vector<nlohmann::json> records[2];
  for (int t = 0; t < 2; ++t) {
    c.train.threads = t + 1;
    const std::string dir = test::scratch_dir("micro_threads_" + std::to_string(t + 1));
    train_tiny(dir, c);
    weights[t] = test::read_file(dir + "/ckpt-000020/model.pt");
    records[t] = sw::read_metrics(dir + "/metrics.jsonl");
  }
  REQUIRE(!weights[0].empty());
  CHECK_MESSAGE(weights[0] == weights[1], "weights differ between 1 and 2 threads");
  REQUIRE(records[0].size() == records[1].size());
  for (size_t i = 0; i < records[0].size(); ++i) {
    CAPTURE(i);
    const char* key = records[0][i]["kind"] == "eval" ? "val_loss" : "grad_norm";
    CHECK(records[0][i][key].get<double>() == records[1][i][key].get<double>());
  }
  // The routing counts of both micro-batches are in the record.
  CHECK(records[0][0]["layers"][0]["tokens"].get<int64_t>() == 10 * 8 * 32);

  // Checkpointed at step 10 on one thread (the run above), resumed on two: the same bits.
  const std::string one = (test::fs::current_path() / "scratch" / "micro_threads_1").string();
  const std::string resumed = test::scratch_dir("micro_threads_resumed");
  test::fs::copy(one + "/config.json", resumed + "/config.json");
  test::fs::copy(one + "/ckpt-000010", resumed + "/ckpt-000010", test::fs::copy_options::recursive);
  test::fs::copy(one + "/metrics.jsonl", resumed + "/metrics.jsonl");
  sw::Config r = sw::resume_config(resumed);
  r.train.threads = 2;
  sw::TrainOptions opt;
  opt.out_dir = resumed;
  opt.quiet = true;
  opt.resume = true;
  opt.config_changed = true;
  const nlohmann::ordered_json summary = sw::train(r, opt);
  CHECK(summary["threads"] == 2);
  CHECK_MESSAGE(test::read_file(resumed + "/ckpt-000020/model.pt") == weights[0],
                "weights differ after resuming a 1-thread checkpoint on 2 threads");
}

TEST_CASE("held-back expert gradients: a step's gradient is the one of the old path") {
  // The tiny model's experts take the small-matrix path with their weight gradients held
  // back to the end of the passes; with that path off (a LibTorch matmul per expert,
  // gradients per micro-batch) the step's loss and gradient norm must be the same up to
  // rounding: a lost or doubled expert gradient would move the norm.
  sw::Config c = test::tiny_config();
  c.train.steps = 1;
  c.train.log_every = 1;
  c.train.eval_every = 1;
  for (int64_t m : {1, 2}) {
    c.train.micro_batches = m;
    double norm[3], ce[3];
    int i = 0;
    for (auto backend :
         {sw::SmallGemmBackend::Dnnl, sw::SmallGemmBackend::Kernel, sw::SmallGemmBackend::Off}) {
      const test::BackendScope scope(backend);
      const std::string dir =
          test::scratch_dir("held_back_" + std::to_string(m) + "_" + std::to_string(i));
      train_tiny(dir, c);
      const nlohmann::json first = sw::read_metrics(dir + "/metrics.jsonl").front();
      norm[i] = first["grad_norm"].get<double>();
      ce[i] = first["ce"].get<double>();
      ++i;
    }
    CAPTURE(m);
    MESSAGE(m << " micro-batches: gradient norm " << norm[0] << " held back (oneDNN), " << norm[1]
              << " held back (kernel), " << norm[2] << " per micro-batch");
    for (int b : {0, 1}) {
      CHECK(ce[b] == doctest::Approx(ce[2]).epsilon(1e-6));
      CHECK(norm[b] == doctest::Approx(norm[2]).epsilon(1e-5));
    }
  }
}

TEST_CASE("micro-batches: without dropping or balancing losses, the gradient of one batch") {
  // Two routing groups differ from one only through capacity and the balancing losses; with
  // neither, the step's gradient is the whole batch's up to rounding.
  sw::Config c = test::tiny_config();
  c.train.steps = 1;
  c.train.log_every = 1;
  c.train.eval_every = 1;
  c.moe.drop_tokens = false;
  c.moe.alpha = 0;
  c.moe.z_loss = 0;
  double norm[2], ce[2];
  for (int m = 1; m <= 2; ++m) {
    c.train.micro_batches = m;
    const std::string dir = test::scratch_dir("micro_grad_" + std::to_string(m));
    train_tiny(dir, c);
    const nlohmann::json first = sw::read_metrics(dir + "/metrics.jsonl").front();
    norm[m - 1] = first["grad_norm"].get<double>();
    ce[m - 1] = first["ce"].get<double>();
  }
  MESSAGE("gradient norm " << norm[0] << " (one batch) vs " << norm[1] << " (two micro-batches)");
  CHECK(ce[1] == doctest::Approx(ce[0]).epsilon(1e-6));
  CHECK(norm[1] == doctest::Approx(norm[0]).epsilon(1e-5));
}

TEST_CASE("a run directory that already holds a run is refused and left untouched") {
  const std::string dir = test::scratch_dir("existing_run");
  sw::Config c = test::tiny_config();
  c.train.steps = 10;
  train_tiny(dir, c);
  const std::string before = test::read_file(dir + "/metrics.jsonl");
  std::string e = test::error_of([&] { train_tiny(dir, c); });
  CHECK(test::contains(e, "already holds a run"));
  CHECK(test::contains(e, "--resume"));
  CHECK(test::read_file(dir + "/metrics.jsonl") == before);
}

TEST_CASE("checkpoint errors: truncated weights, another architecture, another version") {
  const std::string dir = test::scratch_dir("ckpt_errors");
  sw::Config c = test::tiny_config();
  c.train.steps = 10;
  train_tiny(dir, c);
  const std::string ckpt = dir + "/ckpt-000010";
  sw::CheckpointMeta meta = sw::read_checkpoint_meta(ckpt);
  CHECK(meta.state.step == 10);
  CHECK(meta.vocab.size() == 65);

  SUBCASE("another architecture names the tensor") {
    sw::Config other = meta.config;
    other.model.d_model = 48;
    other.model.n_heads = 2;
    sw::Transformer m(other, 65);
    std::string e = test::error_of([&] { sw::load_weights(ckpt, *m); });
    CHECK(test::contains(e, "tok_emb.weight"));
    CHECK(test::contains(e, "shape 65x32"));
  }
  SUBCASE("truncated weights file") {
    std::string bytes = test::read_file(ckpt + "/model.pt");
    test::write_file(ckpt + "/model.pt", bytes.substr(0, bytes.size() / 2));
    sw::Transformer m(meta.config, 65);
    std::string e = test::error_of([&] { sw::load_weights(ckpt, *m); });
    CHECK(test::contains(e, "model.pt"));
  }
  SUBCASE("another format version") {
    std::string state = test::read_file(ckpt + "/state.json");
    const std::string key = "\"format_version\": 1";
    REQUIRE(test::contains(state, key));
    state.replace(state.find(key), key.size(), "\"format_version\": 99");
    test::write_file(ckpt + "/state.json", state);
    std::string e = test::error_of([&] { sw::read_checkpoint_meta(ckpt); });
    CHECK(test::contains(e, "format version 99"));
  }
}

TEST_CASE("checkpoint weights: torch.save's dict, safetensors and the older model.pt load alike") {
  const std::string dir = test::scratch_dir("ckpt_weight_files");
  sw::Config c = test::tiny_config();
  c.train.steps = 10;
  train_tiny(dir, c);
  const std::string ckpt = dir + "/ckpt-000010";
  const sw::CheckpointMeta meta = sw::read_checkpoint_meta(ckpt);
  sw::Transformer ref(meta.config, meta.vocab.size());
  sw::load_weights(ckpt, *ref);
  const auto want = sw::state_dict(*ref);
  REQUIRE(want.size() > 10);
  auto loads_as_ref = [&](const std::string& what) {
    CAPTURE(what);
    sw::Transformer m(meta.config, meta.vocab.size());
    sw::load_weights(ckpt, *m);
    const auto got = sw::state_dict(*m);
    for (const auto& e : want)
      CHECK(torch::equal(got.at(e.key()), e.value()));
  };

  // model.pt: the pickle Python's torch.save writes for a plain dict; no TorchScript type tag.
  std::istringstream in(test::read_file(ckpt + "/model.pt"));
  caffe2::serialize::PyTorchStreamReader reader(&in);
  at::DataPtr pkl;
  size_t pkl_size = 0;
  std::tie(pkl, pkl_size) = reader.getRecord("data.pkl");
  const std::string pickle(static_cast<const char*>(pkl.get()), pkl_size);
  CHECK(pickle.rfind(std::string("\x80\x02}(X", 5), 0) == 0);  // PROTO 2, EMPTY_DICT, MARK, str
  CHECK_FALSE(test::contains(pickle, "restore_type_tag"));
  CHECK(test::contains(pickle, "torch._utils\n_rebuild_tensor_v2\n"));
  CHECK(reader.hasRecord("byteorder"));
  CHECK(reader.getAllRecords().size() == want.size() + 3);  // data.pkl, byteorder, version

  // model.safetensors: the same tensors, the config and vocabulary in its metadata.
  const std::string st_path = ckpt + "/model.safetensors";
  const sw::Safetensors st = sw::read_safetensors(test::read_file(st_path), st_path);
  REQUIRE(st.tensors.size() == want.size());
  for (const auto& [name, t] : st.tensors)
    CHECK(torch::equal(t, want.at(name)));
  CHECK(st.metadata.at("format") == "pt");
  CHECK(st.metadata.at("step") == "10");
  CHECK(nlohmann::json::parse(st.metadata.at("config")) == sw::to_json(meta.config));
  CHECK(sw::utf8_decode(st.metadata.at("vocab"), "vocab") == meta.vocab.chars());

  // Without model.pt the weights come from model.safetensors; the older c10::Dict pickle
  // (torch::pickle_save, the model.pt of earlier versions) still loads.
  test::fs::remove(ckpt + "/model.pt");
  loads_as_ref("model.safetensors");
  const std::vector<char> older = torch::pickle_save(want);
  test::write_file(ckpt + "/model.pt", std::string(older.begin(), older.end()));
  loads_as_ref("the older model.pt");
  test::fs::remove(ckpt + "/model.safetensors");
  loads_as_ref("the older model.pt alone");
  test::fs::remove(ckpt + "/model.pt");
  CHECK(test::contains(test::error_of([&] { sw::load_weights(ckpt, *ref); }), ckpt + "/model.pt"));
}

namespace {

// Sets one element of tensor `name` in a checkpoint's model.pt to NaN.
// Sets a NaN in tensor `name` of a checkpoint's weights: its first element, or the whole
// row `row`.
void poison(const std::string& ckpt, const std::string& name, int64_t row = -1) {
  const std::string path = ckpt + "/model.pt";
  const std::string bytes = test::read_file(path);
  auto dict = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end())).toGenericDict();
  torch::Tensor t = dict.at(name).toTensor();
  if (row < 0)
    t.view({-1})[0] = std::nan("");
  else
    t[row].fill_(std::nan(""));
  const std::vector<char> out = torch::pickle_save(dict);
  test::write_file(path, std::string(out.begin(), out.end()));
}

}  // namespace

TEST_CASE("a non-finite loss stops the run naming the step and the layer, keeping the checkpoint") {
  struct Case {
    std::string tensor, where;
  };
  const std::vector<Case> cases = {
      {"blocks.1.ffn.router.proj.weight",
       "first non-finite: block 1: router logits "
       "(blocks.1.ffn.router)"},
      {"blocks.0.ffn.experts.w_out",
       "first non-finite: block 0: experts' output "
       "(blocks.0.ffn.experts)"},
      {"blocks.1.attn.qkv.weight", "first non-finite: block 1: attention (blocks.1.attn)"},
  };
  for (const auto& k : cases) {
    CAPTURE(k.tensor);
    const std::string dir = test::scratch_dir("nonfinite");
    sw::Config c = test::tiny_config();
    c.train.steps = 30;
    train_tiny(dir, c);
    poison(dir + "/ckpt-000030", k.tensor);
    sw::Config r = sw::resume_config(dir);
    r.train.steps = 60;
    sw::TrainOptions opt;
    opt.out_dir = dir;
    opt.quiet = true;
    opt.resume = true;
    const std::string e = test::error_of([&] { sw::train(r, opt); });
    CHECK(test::contains(e, "step 31: the loss is not finite"));
    CHECK_MESSAGE(test::contains(e, k.where), e);
    CHECK(test::contains(e, "The last checkpoint is kept"));
    CHECK(sw::newest_checkpoint(dir).value_or("") == dir + "/ckpt-000030");

    // Skipping cannot help with poisoned weights: it skips, then stops after 10 in a row.
    r.train.on_nonfinite = sw::OnNonfinite::Skip;
    const std::string e2 = test::error_of([&] { sw::train(r, opt); });
    CHECK_MESSAGE(test::contains(e2, "step 41: the loss is not finite"), e2);
    CHECK(test::contains(e2, "(11 steps in a row)"));
  }
}

TEST_CASE("on_nonfinite = skip: steps a rare character poisons are skipped, the run finishes") {
  // The embedding of 'Z' (198 of Tiny Shakespeare's 1.1M characters) set to NaN: a batch
  // that holds a Z gives a NaN loss, the others are sound. Stopping ends the run at the
  // first such batch; skipping leaves those steps out (the NaN never reaches the other
  // weights) and the run reaches its end with finite losses, counting what it skipped.
  const std::string dir = test::scratch_dir("nonfinite_skip");
  sw::Config c = test::tiny_config();
  c.train.steps = 30;
  train_tiny(dir, c);
  const std::string ckpt = dir + "/ckpt-000030";
  const nlohmann::json state = nlohmann::json::parse(test::read_file(ckpt + "/state.json"));
  const size_t z = state["vocab"].get<std::string>().find('Z');
  REQUIRE(z != std::string::npos);
  poison(ckpt, "tok_emb.weight", static_cast<int64_t>(z));
  sw::Config r = sw::resume_config(dir);
  r.train.steps = 200;
  r.train.eval_every = 1000;  // evaluated once, at the end
  sw::TrainOptions opt;
  opt.out_dir = dir;
  opt.quiet = true;
  opt.resume = true;
  // Stopping: the run ends at the first batch with a Z.
  const std::string e = test::error_of([&] { sw::train(r, opt); });
  CHECK(test::contains(e, "the loss is not finite"));
  CHECK(test::contains(e, "the embeddings"));
  // Skipping: it finishes.
  r.train.on_nonfinite = sw::OnNonfinite::Skip;
  const nlohmann::ordered_json summary = sw::train(r, opt);
  CHECK(summary["steps"] == 200);
  const int64_t skipped = summary["skipped_steps"].get<int64_t>();
  CHECK(skipped >= 1);
  CHECK(skipped <= 40);  // rare: about one batch in twenty holds a Z
  CHECK(std::isfinite(summary["final_train_loss"].get<double>()));
  // The train records carry the count so far, rising to the same total; every train loss
  // they average is finite (a skipped step's loss is not in it).
  int64_t recorded = 0, last_step = 0;
  for (const auto& rec : sw::read_metrics(dir + "/metrics.jsonl")) {
    if (rec["kind"] != "train" || rec["step"].get<int64_t>() <= last_step) continue;
    last_step = rec["step"].get<int64_t>();
    const int64_t count = rec.value("skipped_steps", int64_t{0});
    CHECK(count >= recorded);
    recorded = count;
    CHECK(std::isfinite(rec["loss"].get<double>()));
  }
  CHECK(last_step == 200);
  CHECK(recorded == skipped);
  // Only Z's row is NaN in the end: nothing else was touched by a skipped step.
  sw::Transformer model(r, static_cast<int64_t>(state["vocab"].get<std::string>().size()));
  sw::load_weights(dir + "/ckpt-000200", *model);
  for (const auto& p : model->named_parameters()) {
    CAPTURE(p.key());
    if (p.key() == "tok_emb.weight") {
      CHECK(torch::isnan(p.value()[static_cast<int64_t>(z)]).all().item<bool>());
      const torch::Tensor others = torch::cat({p.value().slice(0, 0, static_cast<int64_t>(z)),
                                               p.value().slice(0, static_cast<int64_t>(z) + 1)});
      CHECK(torch::isfinite(others).all().item<bool>());
    } else {
      CHECK(torch::isfinite(p.value()).all().item<bool>());
    }
  }
}

TEST_CASE("moe.balance = bias: the biases are in the weights file and in every train record") {
  sw::Config c = test::tiny_config();
  c.moe.balance = sw::Balance::Bias;
  c.moe.overflow = sw::Overflow::Reroute;
  c.moe.capacity_factor = 1.0;
  const std::string dir = test::scratch_dir("bias_records");
  train_tiny(dir, c);
  sw::Transformer model(c, 65);
  sw::load_weights(dir + "/ckpt-000060", *model);
  const torch::Tensor bias = model->named_buffers()["blocks.1.ffn.router.expert_bias"];
  REQUIRE(bias.defined());
  // 60 updates of +-0.001 each: every bias moved, none further than 60 steps.
  CHECK(bias.abs().min().item<double>() > 0);
  CHECK(bias.abs().max().item<double>() <= 60 * 0.001 + 1e-6);
  int64_t records = 0, rerouted = 0;
  for (const auto& r : sw::read_metrics(dir + "/metrics.jsonl")) {
    if (r["kind"] != "train") continue;
    ++records;
    for (const auto& l : r["layers"]) {
      CHECK(l["bias"].size() == 4);
      rerouted += l["rerouted"].get<int64_t>();
    }
    if (r["step"] == 60) {
      const auto last = r["layers"][1]["bias"];
      for (int64_t e = 0; e < 4; ++e)
        CHECK(last[e].get<double>() == doctest::Approx(bias[e].item<double>()).epsilon(1e-7));
    }
  }
  CHECK(records == 6);
  CHECK(rerouted > 0);
  // The default model has no bias buffer: its weights file is unchanged.
  sw::Config plain = test::tiny_config();
  CHECK(sw::Transformer(plain, 65)->named_buffers().find("blocks.1.ffn.router.expert_bias") ==
        nullptr);
}

TEST_CASE("--init-from: an upcycled model computes the dense model's logits at step 0") {
  // Top-1 sigmoid gates are 1 and nothing is dropped: every expert is the dense FFN, so the
  // router's choice does not matter.
  const sw::Config dense_cfg = dense_tiny_config();
  const std::string dense_dir = test::scratch_dir("upcycle_dense");
  train_tiny(dense_dir, dense_cfg);

  sw::Config moe_cfg = test::tiny_config();
  moe_cfg.moe.score = sw::Score::Sigmoid;
  moe_cfg.moe.drop_tokens = false;
  const sw::UpcycleSource src = sw::upcycle_source(dense_dir, moe_cfg);
  CHECK(src.meta.state.step == 30);
  sw::Transformer moe(moe_cfg, src.meta.vocab.size());
  sw::upcycle(src, moe);
  sw::Transformer dense(dense_cfg, src.meta.vocab.size());
  sw::load_weights(src.meta.dir, *dense);
  moe->eval();
  dense->eval();
  const torch::Tensor idx = torch::randint(0, src.meta.vocab.size(), {2, 32}, torch::kInt64);
  double d = 0;
  {
    torch::NoGradGuard no_grad;
    d = (moe->forward(idx).logits_BSV - dense->forward(idx).logits_BSV).abs().max().item<double>();
  }
  MESSAGE("max |upcycled - dense| logit difference at step 0: " << d);
  CHECK(d < 1e-5);
  // Each expert is a copy; the router is not the dense run's (it has none) but a fresh one.
  const auto p = moe->named_parameters();
  CHECK(torch::equal(p["blocks.0.ffn.experts.w_in"][3],
                     dense->named_parameters()["blocks.0.ffn.fc_in.weight"].t()));

  // What cannot be upcycled is refused, naming the key.
  sw::Config wide = moe_cfg;
  wide.model.d_model = 64;
  CHECK(test::contains(test::error_of([&] { sw::upcycle_source(dense_dir, wide); }),
                       "model.d_model is 32 there but 64 here"));
  sw::Config narrow = moe_cfg;
  narrow.moe.d_expert = 32;
  CHECK(test::contains(test::error_of([&] { sw::upcycle_source(dense_dir, narrow); }),
                       "moe.d_expert is 32 here"));
  narrow.moe.d_expert = 64;  // = model.d_ff: the same shapes
  CHECK(sw::upcycle_source(dense_dir, narrow).meta.state.step == 30);
  sw::Config shared = moe_cfg;
  shared.moe.shared_experts = 1;
  CHECK(test::contains(test::error_of([&] { sw::upcycle_source(dense_dir, shared); }),
                       "moe.shared_experts = 1"));
  const std::string moe_dir = test::scratch_dir("upcycle_from_moe");
  sw::Config small = moe_cfg;
  small.train.steps = 2;
  train_tiny(moe_dir, small);
  CHECK(test::contains(test::error_of([&] { sw::upcycle_source(moe_dir, moe_cfg); }),
                       "that run is not dense (moe.every = 1)"));
  CHECK(test::contains(
      test::error_of([&] { sw::upcycle_source(test::scratch_dir("upcycle_none"), moe_cfg); }),
      "no complete checkpoint"));
}

TEST_CASE("--init-from: a run stopped before its first checkpoint upcycles again on resume") {
  const std::string dense_dir = test::scratch_dir("reupcycle_dense");
  train_tiny(dense_dir, dense_tiny_config());
  sw::Config c = test::tiny_config();
  c.train.steps = 20;
  c.train.checkpoint_every = 1000;  // only the last step writes one
  sw::TrainOptions opt;
  opt.quiet = true;
  opt.init_from = dense_dir;
  const std::string straight = test::scratch_dir("reupcycle_straight");
  opt.out_dir = straight;
  sw::train(c, opt);
  CHECK(test::contains(test::read_file(straight + "/init_from.json"), "ckpt-000030"));
  // The same run, then as if killed before its checkpoint: config and record are left.
  const std::string again = test::scratch_dir("reupcycle_again");
  opt.out_dir = again;
  sw::train(c, opt);
  test::fs::remove_all(again + "/ckpt-000020");
  test::fs::remove(again + "/summary.json");
  opt.resume = true;
  opt.init_from.clear();
  sw::train(sw::resume_config(again), opt);
  const std::string a = test::read_file(straight + "/ckpt-000020/model.pt");
  REQUIRE(!a.empty());
  CHECK_MESSAGE(a == test::read_file(again + "/ckpt-000020/model.pt"),
                "resumed before its first checkpoint, the upcycled run is not the straight one");
}

TEST_CASE("train.grad_clip: 0 turns clipping off, a small one changes the run") {
  const std::string base = test::scratch_dir("grad_clip");
  auto weights_after = [&](double clip) {
    sw::Config c = test::tiny_config();
    c.train.steps = 10;
    c.train.eval_every = 10;
    c.train.checkpoint_every = 10;
    c.train.grad_clip = clip;
    const std::string dir = base + "/clip-" + std::to_string(clip);
    train_tiny(dir, c);
    return test::read_file(dir + "/ckpt-000010/model.pt");
  };
  const std::string off = weights_after(0), huge = weights_after(1e9), small = weights_after(0.01);
  REQUIRE(!off.empty());
  // A bound no gradient reaches scales by exactly 1: the same bits as no clipping at all.
  CHECK(off == huge);
  CHECK(off != small);
  // The records say the norm before clipping, which a small bound would have cut.
  for (const auto& r : sw::read_metrics(base + "/clip-0.010000/metrics.jsonl"))
    if (r["kind"] == "train") CHECK(r["grad_norm"].get<double>() > 0.01);
}
