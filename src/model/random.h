// Where the model's random draws come from (random drop order, router jitter, dropout).
// By default the process-wide CPU generator; a GeneratorScope gives the calling thread its
// own, so that micro-batches running at once on several threads draw the same numbers
// whatever the thread count.
#pragma once

#include <torch/torch.h>

namespace sw {

// The generator this thread draws from: the innermost GeneratorScope's, else the default.
at::Generator current_generator();

class GeneratorScope {
 public:
  explicit GeneratorScope(at::Generator gen);
  ~GeneratorScope();
  GeneratorScope(const GeneratorScope&) = delete;
  GeneratorScope& operator=(const GeneratorScope&) = delete;

 private:
  at::Generator previous_;
};

// Inverted dropout drawing from current_generator(): the draws and the arithmetic of
// torch::dropout, which always uses the default generator.
torch::Tensor apply_dropout(const torch::Tensor& x, double p, bool training);
// The same with a Dropout module's probability and train/eval mode.
torch::Tensor apply_dropout(const torch::nn::Dropout& d, const torch::Tensor& x);

}  // namespace sw
