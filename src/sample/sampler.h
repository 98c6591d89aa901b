// Text generation from a trained run: loads the newest checkpoint of a run directory and
// samples characters one at a time (temperature, top-k), streaming them to a callback.
// The context is at most model.seq_len characters (the positions the model knows); when it
// is full, the older half is dropped. With the key/value cache each new character costs
// one position's computation; without it, the whole context is recomputed. Both see the
// same contexts, so they produce the same text for the same seed.
#pragma once

#include <functional>
#include <string>

#include "config/config.h"
#include "data/vocab.h"
#include "model/transformer.h"

namespace sw {

struct SampleOptions {
  std::string prompt = "\n";
  int64_t chars = 500;
  double temperature = 1.0;  // 0: always the most likely character
  int64_t top_k = 0;         // 0: all characters
  uint64_t seed = 1337;
  bool kv_cache = true;  // false: recompute the whole context for every character
};

class Sampler {
 public:
  // Loads <run_dir>'s newest complete checkpoint; throws sw::Error if there is none.
  explicit Sampler(const std::string& run_dir);

  const Vocab& vocab() const { return vocab_; }
  const Config& config() const { return cfg_; }
  const std::string& checkpoint_dir() const { return ckpt_dir_; }
  const Transformer& model() const { return model_; }

  // Generates opt.chars characters after opt.prompt and returns them. `emit`, if given, is
  // called with the prompt once it is validated, then with each new character (UTF-8). A prompt
  // character outside the vocabulary is an error naming it.
  std::string generate(const SampleOptions& opt,
                       const std::function<void(const std::string&)>& emit = nullptr);

 private:
  Config cfg_;
  Vocab vocab_;
  std::string ckpt_dir_;
  Transformer model_{nullptr};
};

}  // namespace sw
