// Config keys: defaults, files, overrides, round trips and every kind of bad value.
#include <doctest/doctest.h>

#include "config/config.h"
#include "helpers.h"
#include "util/error.h"

using sw::Config;

namespace {

std::string validate_error(const std::string& assignment) {
  Config c;
  sw::apply_override(c, assignment);
  return test::error_of([&] { sw::validate(c); });
}

}  // namespace

TEST_CASE("the compiled-in defaults are valid and equal configs/default.json") {
  Config c;
  CHECK_NOTHROW(sw::validate(c));
  Config from_file;
  sw::apply_file(from_file, test::source_path("configs/default.json"));
  CHECK(sw::to_json(from_file) == sw::to_json(Config{}));
  // And the file spells out every key, so it documents the defaults completely.
  nlohmann::json file =
      nlohmann::json::parse(test::read_file(test::source_path("configs/default.json")));
  CHECK(file == sw::to_json(Config{}));
}

TEST_CASE("every bundled config is valid and sets what its name says") {
  int n = 0;
  for (const auto& entry : test::fs::directory_iterator(test::source_path("configs"))) {
    if (entry.path().extension() != ".json") continue;
    CAPTURE(entry.path().string());
    Config c;
    CHECK_NOTHROW(sw::apply_file(c, entry.path().string()));
    CHECK_NOTHROW(sw::validate(c));
    ++n;
  }
  CHECK(n >= 4);
  Config tiny, dense, labml;
  sw::apply_file(tiny, test::source_path("configs/tiny.json"));
  CHECK(tiny.model.d_model == 32);
  // nanoGPT's CPU recipe: a dense GPT, 4 layers of width 128, context 64, batch 12, 2000 steps.
  sw::apply_file(dense, test::source_path("configs/dense_nanogpt.json"));
  CHECK(dense.moe.every == 0);
  CHECK(dense.model.n_layers == 4);
  CHECK(dense.model.d_model == 128);
  CHECK(dense.model.d_ff == 512);
  CHECK(dense.model.seq_len == 64);
  CHECK(dense.train.batch_size == 12);
  CHECK(dense.train.steps == 2000);
  CHECK(dense.train.lr == doctest::Approx(1e-3));
  // labml's Switch experiment: 6 layers, d_ff 256, 4 experts, capacity 1.2, no positions.
  sw::apply_file(labml, test::source_path("configs/labml.json"));
  CHECK(labml.model.n_layers == 6);
  CHECK(labml.model.d_ff == 256);
  CHECK_FALSE(labml.model.pos_emb);
  CHECK(labml.moe.n_experts == 4);
  CHECK(labml.moe.capacity_factor == doctest::Approx(1.2));
  CHECK(labml.moe.drop_tokens);
  CHECK(labml.train.batch_size == 32);
}

TEST_CASE("JSON round trip keeps every value") {
  Config c;
  c.model.d_model = 96;
  c.model.pos_emb = false;
  c.moe.capacity_factor = 1.7;
  c.moe.dropped = sw::DroppedOutput::Zero;
  c.moe.strategy = sw::Strategy::Loop;
  c.train.lr = 3e-4;
  c.data.path = "elsewhere/text.txt";
  Config back;
  sw::apply_json(back, sw::to_json(c), "round trip");
  CHECK(sw::to_json(back) == sw::to_json(c));
  CHECK(back.moe.capacity_factor == doctest::Approx(1.7));
  CHECK(back.data.path == "elsewhere/text.txt");
  CHECK_FALSE(back.model.pos_emb);
}

TEST_CASE("dotted keys and nested sections both work in files") {
  Config c;
  sw::apply_json(c, nlohmann::json::parse(R"({"moe.n_experts": 8, "model": {"n_layers": 3}})"),
                 "inline");
  CHECK(c.moe.n_experts == 8);
  CHECK(c.model.n_layers == 3);
}

TEST_CASE("--set parses each type") {
  Config c;
  sw::apply_override(c, "moe.n_experts=16");
  sw::apply_override(c, "moe.capacity_factor=2.5");
  sw::apply_override(c, "moe.drop_tokens=false");
  sw::apply_override(c, "model.activation=relu");
  sw::apply_override(c, "train.lr=1e-4");
  CHECK(c.moe.n_experts == 16);
  CHECK(c.moe.capacity_factor == doctest::Approx(2.5));
  CHECK_FALSE(c.moe.drop_tokens);
  CHECK(c.model.activation == sw::Activation::Relu);
  CHECK(c.train.lr == doctest::Approx(1e-4));
}

TEST_CASE("--set errors name the key and what is accepted") {
  Config c;
  std::string e = test::error_of([&] { sw::apply_override(c, "moe.n_expert=4"); });
  CHECK(test::contains(e, "unknown config key 'moe.n_expert'"));
  CHECK(test::contains(e, "did you mean 'moe.n_experts'"));
  e = test::error_of([&] { sw::apply_override(c, "n_experts=4"); });
  CHECK(test::contains(e, "did you mean 'moe.n_experts'"));
  e = test::error_of([&] { sw::apply_override(c, "model.d_model=abc"); });
  CHECK(test::contains(e, "model.d_model"));
  CHECK(test::contains(e, "not an integer"));
  e = test::error_of([&] { sw::apply_override(c, "model.d_model=12x"); });
  CHECK(test::contains(e, "not an integer"));
  e = test::error_of([&] { sw::apply_override(c, "moe.drop_tokens=maybe"); });
  CHECK(test::contains(e, "true or false"));
  e = test::error_of([&] { sw::apply_override(c, "train.lr=fast"); });
  CHECK(test::contains(e, "train.lr"));
  e = test::error_of([&] { sw::apply_override(c, "moe.n_experts"); });
  CHECK(test::contains(e, "expected key=value"));
}

TEST_CASE("config files: wrong types, unknown keys, malformed JSON") {
  Config c;
  std::string e = test::error_of([&] {
    sw::apply_json(c, nlohmann::json::parse(R"({"model": {"d_model": "wide"}})"), "f.json");
  });
  CHECK(test::contains(e, "f.json: model.d_model must be an integer, got \"wide\""));
  e = test::error_of([&] {
    sw::apply_json(c, nlohmann::json::parse(R"({"model": {"d_model": 1.5}})"), "f.json");
  });
  CHECK(test::contains(e, "model.d_model must be an integer"));
  e = test::error_of(
      [&] { sw::apply_json(c, nlohmann::json::parse(R"({"moe": {"capacity": 1.0}})"), "f.json"); });
  CHECK(test::contains(e, "unknown config key 'moe.capacity'"));
  e = test::error_of(
      [&] { sw::apply_json(c, nlohmann::json::parse(R"({"optim": {"lr": 1}})"), "f.json"); });
  CHECK(test::contains(e, "unknown config key 'optim'"));
  e = test::error_of([&] { sw::apply_json(c, nlohmann::json::parse("[1, 2]"), "f.json"); });
  CHECK(test::contains(e, "must be a JSON object"));
  e = test::error_of(
      [&] { sw::parse_json_text("{\n  \"model\": {\n    \"d_model\": 12,,\n", "bad.json"); });
  CHECK(test::contains(e, "bad.json:3:"));
  CHECK(test::contains(e, "malformed JSON"));
  e = test::error_of([&] { sw::apply_file(c, "no/such/config.json"); });
  CHECK(test::contains(e, "no/such/config.json"));
}

TEST_CASE("an enumerated key takes the names of its table and nothing else") {
  Config c;
  CHECK(test::error_of([&] { sw::apply_override(c, "model.activation=tanh"); }) ==
        "--set model.activation: 'tanh' is not one of gelu | relu | swiglu");
  CHECK(test::error_of([&] { sw::apply_override(c, "moe.dropped=skip"); }) ==
        "--set moe.dropped: 'skip' is not one of pass | zero");
  const std::string e = test::error_of([&] {
    sw::apply_json(c, nlohmann::json::parse(R"({"moe": {"strategy": "magic"}})"), "f.json");
  });
  CHECK(e == "f.json: moe.strategy must be one of loop | capacity | grouped, got \"magic\"");
  CHECK(test::contains(test::error_of([&] {
                         sw::apply_json(c, nlohmann::json::parse(R"({"moe.drop_policy": 1})"),
                                        "g.json");
                       }),
                       "moe.drop_policy must be one of random | position | probability, got 1"));
  // Every name of every table round-trips through --set and the JSON of a config.
  int names = 0;
  for (const auto& k : sw::config_keys()) {
    if (k.kind != sw::Kind::Choice) continue;
    CHECK(k.choices.size() >= 2);
    for (const auto& [name, doc] : k.choices) {
      Config d;
      sw::apply_override(d, k.key + "=" + name);
      std::string pointer = "/" + k.key;
      std::replace(pointer.begin(), pointer.end(), '.', '/');
      CHECK(sw::to_json(d)[nlohmann::json::json_pointer(pointer)] == name);
      CHECK_FALSE(doc.empty());
      ++names;
    }
  }
  // activation, score, balance, overflow, drop_policy, dropped, strategy, on_nonfinite
  CHECK(names == 3 + 2 + 4 + 2 + 3 + 2 + 3 + 2);
}

TEST_CASE("validation: every out-of-range value names its key") {
  CHECK(test::contains(validate_error("moe.n_experts=0"), "moe.n_experts = 0: must be >= 1"));
  CHECK(test::contains(validate_error("dist.spin_us=-1"), "dist.spin_us = -1: must be >= 0"));
  CHECK(test::contains(validate_error("dist.spin_us=2000000"),
                       "dist.spin_us = 2000000: must be <= 1000000"));
  CHECK(test::contains(validate_error("moe.capacity_factor=0"), "moe.capacity_factor"));
  CHECK(test::contains(validate_error("moe.capacity_factor=-1"), "moe.capacity_factor"));
  CHECK(test::contains(validate_error("model.n_heads=3"), "divisible by model.n_heads = 3"));
  CHECK(test::contains(validate_error("model.d_model=0"), "model.d_model"));
  CHECK(test::contains(validate_error("model.n_layers=0"), "model.n_layers"));
  CHECK(test::contains(validate_error("model.d_ff=0"), "model.d_ff"));
  CHECK(test::contains(validate_error("model.seq_len=0"), "model.seq_len"));
  CHECK(test::contains(validate_error("model.dropout=1"), "model.dropout"));
  CHECK(test::contains(validate_error("moe.every=-1"), "moe.every"));
  CHECK(test::contains(validate_error("moe.every=9"), "leaves no MoE layer"));
  CHECK(test::contains(validate_error("moe.alpha=-0.1"), "moe.alpha"));
  CHECK(test::contains(validate_error("data.val_fraction=0"), "data.val_fraction"));
  CHECK(test::contains(validate_error("data.val_fraction=1"), "data.val_fraction"));
  CHECK(test::contains(validate_error("data.path="), "data.path"));
  CHECK(test::contains(validate_error("train.steps=0"), "train.steps"));
  CHECK(test::contains(validate_error("train.batch_size=0"), "train.batch_size"));
  CHECK(test::contains(validate_error("train.lr=0"), "train.lr"));
  CHECK(test::contains(validate_error("train.min_lr=1"), "train.min_lr"));
  CHECK(test::contains(validate_error("train.warmup=-5"), "train.warmup"));
  CHECK(test::contains(validate_error("train.beta1=1"), "train.beta1"));
  CHECK(test::contains(validate_error("train.beta2=-0.1"), "train.beta2"));
  CHECK(test::contains(validate_error("train.weight_decay=-1"), "train.weight_decay"));
  CHECK(test::contains(validate_error("train.grad_clip=-1"), "train.grad_clip"));
  CHECK(test::contains(validate_error("train.eval_every=0"), "train.eval_every"));
  CHECK(test::contains(validate_error("train.eval_batches=0"), "train.eval_batches"));
  CHECK(test::contains(validate_error("train.log_every=0"), "train.log_every"));
  CHECK(test::contains(validate_error("train.checkpoint_every=0"), "train.checkpoint_every"));
  CHECK(test::contains(validate_error("train.keep_checkpoints=0"), "train.keep_checkpoints"));
  CHECK(test::contains(validate_error("train.seed=-1"), "train.seed"));
  CHECK(test::contains(validate_error("train.threads=-2"), "train.threads"));
  CHECK(test::contains(validate_error("train.micro_batches=0"), "train.micro_batches = 0"));
  CHECK(test::contains(validate_error("train.micro_batches=3"),
                       "train.micro_batches = 3: train.batch_size = 16 must split evenly"));
}

TEST_CASE("moe.every picks the MoE layers") {
  Config c;
  c.model.n_layers = 4;
  c.moe.every = 1;
  CHECK(c.n_moe_layers() == 4);
  c.moe.every = 2;
  CHECK_FALSE(c.is_moe_layer(0));
  CHECK(c.is_moe_layer(1));
  CHECK_FALSE(c.is_moe_layer(2));
  CHECK(c.is_moe_layer(3));
  c.moe.every = 0;
  CHECK(c.n_moe_layers() == 0);
}

TEST_CASE("every key has a help text and a unique name") {
  std::set<std::string> seen;
  for (const auto& k : sw::config_keys()) {
    CHECK_FALSE(k.help.empty());
    CHECK(seen.insert(k.key).second);
  }
  CHECK(seen.size() == sw::config_keys().size());
}
