#include "model/random.h"

namespace sw {
namespace {
thread_local at::Generator t_generator;  // undefined: the default CPU generator
}  // namespace

at::Generator current_generator() {
  return t_generator.defined() ? t_generator : at::detail::getDefaultCPUGenerator();
}

GeneratorScope::GeneratorScope(at::Generator gen) : previous_(t_generator) {
  t_generator = std::move(gen);
}

GeneratorScope::~GeneratorScope() {
  t_generator = previous_;
}

torch::Tensor apply_dropout(const torch::Tensor& x, double p, bool training) {
  if (!training || p <= 0) return x;
  if (p >= 1) return x * torch::zeros_like(x);
  torch::Tensor noise = torch::empty_like(x).bernoulli_(1.0 - p, current_generator());
  noise.div_(1.0 - p);
  return x * noise;
}

torch::Tensor apply_dropout(const torch::nn::Dropout& d, const torch::Tensor& x) {
  return apply_dropout(x, d->options.p(), d->is_training());
}

}  // namespace sw
