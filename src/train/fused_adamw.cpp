#include "train/fused_adamw.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "train/adamw_state.h"
#include "util/parallel.h"

namespace sw {
namespace {

// One pass over elements [begin, end): p <- p * (1 - lr wd); m <- b1 m + (1 - b1) g;
// v <- b2 v + (1 - b2) g^2; p <- p - step_size * m / (sqrt(v) / sqrt(bc2) + eps), with
// g = scale * grad.
struct FloatUpdate {
  float *p, *m, *v;
  const float* g;
  int64_t n;
  float decay, step_size, inv_sqrt_bc2, scale, b1, b2, eps;
};
void update_float(const FloatUpdate& u, int64_t begin, int64_t end) {
  float *p = u.p, *m = u.m, *v = u.v;
  const float* g = u.g;
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i] * u.scale;
    const float mi = m[i] * u.b1 + (1.0f - u.b1) * gi;
    const float vi = v[i] * u.b2 + (1.0f - u.b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * u.decay - u.step_size * mi / (std::sqrt(vi) * u.inv_sqrt_bc2 + u.eps);
  }
}

}  // namespace

torch::Tensor FusedAdamW::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  using Key = typename std::decay_t<decltype(state_)>::key_type;
  std::vector<FloatUpdate> floats;
  for (auto& group : param_groups_) {
    auto& o = static_cast<torch::optim::AdamWOptions&>(group.options());
    TORCH_CHECK(!o.amsgrad(), "FusedAdamW does not implement amsgrad");
    const double b1 = std::get<0>(o.betas()), b2 = std::get<1>(o.betas());
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      const Key key = state_key<Key>(p.unsafeGetTensorImpl());
      auto it = state_.find(key);
      if (it == state_.end()) {
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->step(0);
        s->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        s->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        it = state_.emplace(key, std::move(s)).first;
      }
      auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
      s.step(s.step() + 1);
      const double bc1 = 1 - std::pow(b1, static_cast<double>(s.step()));
      const double bc2 = 1 - std::pow(b2, static_cast<double>(s.step()));
      const double step_size = o.lr() / bc1;
      const double decay = 1 - o.lr() * o.weight_decay();
      torch::Tensor grad = p.grad();
      torch::Tensor m = s.exp_avg(), v = s.exp_avg_sq();
      if (p.scalar_type() == torch::kFloat32 && p.is_contiguous() && grad.is_contiguous() &&
          m.is_contiguous() && v.is_contiguous() && p.device().is_cpu()) {
        floats.push_back({p.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
                          grad.data_ptr<float>(), p.numel(), static_cast<float>(decay),
                          static_cast<float>(step_size), static_cast<float>(1.0 / std::sqrt(bc2)),
                          static_cast<float>(grad_scale_), static_cast<float>(b1),
                          static_cast<float>(b2), static_cast<float>(o.eps())});
      } else {  // the same update with tensor operations (other dtypes, devices, layouts)
        torch::Tensor g = grad_scale_ == 1.0 ? grad : grad * grad_scale_;
        p.mul_(decay);
        m.mul_(b1).add_(g, 1 - b1);
        v.mul_(b2).addcmul_(g, g, 1 - b2);
        p.addcdiv_(m, v.sqrt().div_(std::sqrt(bc2)).add_(o.eps()), -step_size);
      }
    }
  }
  // The float32 updates in one parallel region: each thread takes its slice of every
  // parameter (one region per step instead of one per parameter).
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  sw::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (const FloatUpdate& u : floats)
        update_float(u, u.n * t / T, u.n * (t + 1) / T);
  });
  grad_scale_ = 1.0;
  return loss;
}

GradNorm grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  // Each parameter's norm alone on one thread, the squares summed in parameter order: the
  // same bits whatever the thread count.
  std::vector<double> sq(params.size(), 0.0);
  sw::parallel_for(0, static_cast<int64_t>(params.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const torch::Tensor& g = params[static_cast<size_t>(i)].grad();
      if (!g.defined()) continue;
      const double n = g.norm().item<double>();
      sq[static_cast<size_t>(i)] = n * n;
    }
  });
  double sum_sq = 0;
  for (double s : sq)
    sum_sq += s;
  const double norm = std::sqrt(sum_sq);
  const double coef = max_norm / (norm + 1e-6);
  return {norm, coef < 1.0 ? coef : 1.0};
}

}  // namespace sw
