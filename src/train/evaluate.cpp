#include "train/evaluate.h"

#include <ATen/CPUGeneratorImpl.h>

#include "model/random.h"
#include "util/parallel.h"

namespace sw {

namespace {

// Batch `index`'s rows `x_BS` through the model in eval mode, its random drop order (over
// eval_capacity_factor) from a generator of the batch's own: every rank and every share of
// a batch draws from the same one.
ModelOutput forward_batch(Transformer& model, const torch::Tensor& x_BS, size_t index) {
  GeneratorScope scope(at::make_generator<at::CPUGeneratorImpl>(0x6576616cULL + index));
  return model->forward(x_BS);
}

double mean_cross_entropy(const ModelOutput& out, const torch::Tensor& y_BS) {
  const int64_t V = out.logits_BSV.size(-1);
  return torch::cross_entropy_loss(out.logits_BSV.reshape({-1, V}), y_BS.reshape({-1}))
      .item<double>();
}

// Runs `f` in eval mode without gradients and leaves the model in training mode and the
// default generator as it found them.
template <typename F>
void in_eval_mode(Transformer& model, F f) {
  auto gen = at::detail::getDefaultCPUGenerator();
  const torch::Tensor rng_state = gen.get_state();
  const bool was_training = model->is_training();
  model->eval();
  f();
  model->train(was_training);
  gen.set_state(rng_state);
}

}  // namespace

std::vector<Batch> fixed_batches(const Dataset& data, Split split, const TrainConfig& t,
                                 uint64_t salt) {
  Rng rng(static_cast<uint64_t>(t.seed) ^ salt);
  std::vector<Batch> out;
  for (int64_t i = 0; i < t.eval_batches; ++i)
    out.push_back(data.sample(split, t.batch_size, rng));
  return out;
}

double evaluate(Transformer& model, const std::vector<Batch>& batches, const Ranks& ranks) {
  std::vector<double> losses(batches.size());
  in_eval_mode(model, [&] {
    auto run = [&](int64_t begin, int64_t end) {
      torch::NoGradGuard no_grad;
      for (int64_t i = begin; i < end; ++i) {
        const Batch& b = batches[static_cast<size_t>(i)];
        losses[static_cast<size_t>(i)] = mean_cross_entropy(
            forward_batch(model, ranks.share(b.x_BS), static_cast<size_t>(i)), ranks.share(b.y_BS));
      }
    };
    const auto n = static_cast<int64_t>(batches.size());
    if (ranks.expert_parallel)
      run(0, n);
    else
      sw::parallel_for(0, n, 1, run);
  });
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

EvalResult evaluate_shares(Transformer& model, const std::vector<Batch>& batches, int64_t world,
                           const EvalObserver& observe) {
  const auto n = static_cast<int64_t>(batches.size());
  struct Part {
    double loss = 0;
    int64_t tokens = 0;  // 0: a share with no rows (its batch was routed whole)
    std::vector<LayerEval> moe;
  };
  std::vector<Part> parts(static_cast<size_t>(n * world));  // share-major, as ranks sum
  in_eval_mode(model, [&] {
    sw::parallel_for(0, n * world, 1, [&](int64_t begin, int64_t end) {
      torch::NoGradGuard no_grad;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t share = p / n, i = p % n;
        const Batch& b = batches[static_cast<size_t>(i)];
        // A batch whose rows the ranks could not have shared (a shorter last batch of
        // every-window scoring) is routed whole, as share 0.
        const bool whole = b.x_BS.size(0) % world != 0;
        if (whole && share > 0) continue;
        Ranks ranks;
        ranks.rank = whole ? 0 : share;
        ranks.world = whole ? 1 : world;
        const torch::Tensor x_BS = ranks.share(b.x_BS), y_BS = ranks.share(b.y_BS);
        ModelOutput out = forward_batch(model, x_BS, static_cast<size_t>(i));
        Part& part = parts[static_cast<size_t>(p)];
        part.loss = mean_cross_entropy(out, y_BS);
        part.tokens = y_BS.numel();
        if (observe) observe(static_cast<size_t>(i), share, x_BS, out);
        for (const MoeStats& s : out.moe)  // the counts only: the rest is per token
          part.moe.push_back({s.layer, s.assignments, s.dropped, s.rerouted, s.counts_E});
      }
    });
  });
  EvalResult r;
  bool equal = true;
  for (const Part& p : parts) {
    r.tokens += p.tokens;
    equal = equal && p.tokens == parts.front().tokens;
  }
  // Equal shares: each rank's sum over the batches, summed over the ranks, as evaluate()
  // and its all-reduce do. Otherwise every character weighs the same.
  double total = 0;
  for (int64_t share = 0; share < world; ++share) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      const Part& p = parts[static_cast<size_t>(share * n + i)];
      if (p.tokens > 0) sum += equal ? p.loss : p.loss * static_cast<double>(p.tokens);
    }
    total += sum;
  }
  r.loss = equal ? total / static_cast<double>(world) / static_cast<double>(n)
                 : total / static_cast<double>(r.tokens);
  for (const Part& p : parts)
    for (size_t l = 0; l < p.moe.size(); ++l) {
      const LayerEval& s = p.moe[l];
      if (r.layers.size() <= l)
        r.layers.push_back({s.layer, 0, 0, 0, torch::zeros_like(s.counts_E)});
      LayerEval& e = r.layers[l];
      e.assignments += s.assignments;
      e.dropped += s.dropped;
      e.rerouted += s.rerouted;
      e.counts_E += s.counts_E;
    }
  return r;
}

}  // namespace sw
