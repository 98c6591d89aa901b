#include "train/evaluate.h"

#include <ATen/CPUGeneratorImpl.h>

#include "model/random.h"
#include "util/parallel.h"

namespace sw {

std::vector<Batch> fixed_batches(const Dataset& data, Split split, const TrainConfig& t,
                                 uint64_t salt) {
  Rng rng(static_cast<uint64_t>(t.seed) ^ salt);
  std::vector<Batch> out;
  for (int64_t i = 0; i < t.eval_batches; ++i)
    out.push_back(data.sample(split, t.batch_size, rng));
  return out;
}

double evaluate(Transformer& model, const std::vector<Batch>& batches, const Ranks& ranks) {
  auto gen = at::detail::getDefaultCPUGenerator();
  const torch::Tensor rng_state = gen.get_state();
  model->eval();
  std::vector<double> losses(batches.size());
  auto run = [&](int64_t begin, int64_t end) {
    torch::NoGradGuard no_grad;
    for (int64_t i = begin; i < end; ++i) {
      const Batch& b = batches[static_cast<size_t>(i)];
      // Random drop order (over eval_capacity_factor) from a generator of the batch's own.
      GeneratorScope scope(
          at::make_generator<at::CPUGeneratorImpl>(0x6576616cULL + static_cast<uint64_t>(i)));
      ModelOutput out = model->forward(ranks.share(b.x_BS));
      const int64_t V = out.logits_BSV.size(-1);
      losses[static_cast<size_t>(i)] = torch::cross_entropy_loss(out.logits_BSV.reshape({-1, V}),
                                                                 ranks.share(b.y_BS).reshape({-1}))
                                           .item<double>();
    }
  };
  const auto n = static_cast<int64_t>(batches.size());
  if (ranks.expert_parallel)
    run(0, n);
  else
    sw::parallel_for(0, n, 1, run);
  model->train();
  gen.set_state(rng_state);
  double sum = 0;
  for (double l : losses)
    sum += l;  // in batch order
  if (ranks.comm) {
    torch::Tensor t = torch::tensor({sum}, torch::kFloat64);
    ranks.comm->all_reduce_sum(t);
    sum = t.item<double>() / static_cast<double>(ranks.world);
  }
  return sum / static_cast<double>(batches.size());
}

}  // namespace sw
