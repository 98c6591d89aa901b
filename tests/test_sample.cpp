// Sampling from a trained run: determinism per seed, greedy decoding, the prompt's check,
// and the key/value cache against full recomputation.
#include <doctest/doctest.h>

#include "helpers.h"
#include "sample/sampler.h"
#include "train/trainer.h"

namespace {

void train_tiny(const std::string& dir) {
  sw::TrainOptions opt;
  opt.out_dir = dir;
  opt.quiet = true;
  sw::train(test::tiny_config(), opt);
}

}  // namespace

TEST_CASE("sampling: deterministic per seed, temperature 0 is greedy, prompt checked") {
  const std::string dir = test::scratch_dir("sampling");
  train_tiny(dir);
  sw::Sampler s(dir);
  sw::SampleOptions opt;
  opt.chars = 80;
  opt.prompt = "ROMEO:";
  opt.seed = 5;
  const std::string a = s.generate(opt), b = s.generate(opt);
  CHECK(a == b);
  CHECK(a.size() == 80);  // the vocabulary is ASCII
  opt.seed = 6;
  CHECK(s.generate(opt) != a);
  opt.top_k = 1;
  const std::string top1 = s.generate(opt);
  opt.top_k = 0;
  opt.temperature = 0;
  CHECK(s.generate(opt) == top1);

  std::string streamed;
  s.generate(opt, [&](const std::string& piece) { streamed += piece; });
  CHECK(streamed == "ROMEO:" + top1);

  opt.prompt = "caf\xC3\xA9";
  std::string e = test::error_of([&] { s.generate(opt); });
  CHECK(test::contains(e, "U+00E9"));
  CHECK(test::contains(e, "position 3"));
}

TEST_CASE("sampling with the key/value cache gives the text of full recomputation") {
  const std::string dir = test::scratch_dir("sampling_cache");
  train_tiny(dir);
  sw::Sampler s(dir);
  REQUIRE(s.config().model.seq_len == 32);
  sw::SampleOptions opt;
  opt.chars = 300;  // the context fills and is halved many times
  for (const std::string& prompt : {std::string("\n"), std::string(40, 'a')}) {  // 2nd: too long
    for (double temperature : {0.0, 1.0}) {
      CAPTURE(temperature);
      opt.prompt = prompt;
      opt.temperature = temperature;
      opt.seed = 11;
      opt.kv_cache = true;
      const std::string cached = s.generate(opt);
      opt.kv_cache = false;
      const std::string full = s.generate(opt);
      CHECK(cached.size() == 300);
      CHECK(cached == full);
    }
  }
  // The cached logits themselves match a full forward pass over the same context.
  sw::Transformer& m = const_cast<sw::Transformer&>(s.model());
  torch::NoGradGuard no_grad;
  torch::Tensor idx = torch::randint(0, s.vocab().size(), {1, 32}, torch::kInt64);
  std::vector<sw::KVCache> caches;
  torch::Tensor part = m->forward_cached(idx.narrow(1, 0, 20), caches);
  std::vector<torch::Tensor> steps = {part};
  for (int64_t t = 20; t < 32; ++t)
    steps.push_back(m->forward_cached(idx.narrow(1, t, 1), caches));
  const double diff =
      (torch::cat(steps, 1) - m->forward(idx).logits_BSV).abs().max().item<double>();
  MESSAGE("max |cached - full| logit difference: " << diff);
  CHECK(diff < 1e-4);
}
