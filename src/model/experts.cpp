#include "model/experts.h"

#include <algorithm>

#include "model/small_gemm.h"
#include "util/parallel.h"

namespace sw {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradient at the activation's input from the gradient at its output. GELU and ReLU
// work in place in grad_h, so the backward holds one [N, F] gradient buffer instead of two;
// SwiGLU's input is twice as wide: with gate a, up b and s = sigmoid(a),
// d/da = g b s (1 + a (1 - s)) and d/db = g a s.
torch::Tensor activation_backward(torch::Tensor grad_h, const torch::Tensor& h_pre,
                                  Activation act) {
  switch (act) {
    case Activation::Gelu:
      return at::gelu_backward_out(grad_h, grad_h, h_pre);
    case Activation::Relu:
      return grad_h.masked_fill_(h_pre <= 0, 0);
    case Activation::Swiglu: {
      const auto halves = h_pre.chunk(2, /*dim=*/-1);
      const torch::Tensor &a = halves[0], &b = halves[1];
      const torch::Tensor s = torch::sigmoid(a), silu = a * s;
      torch::Tensor g_ab = torch::empty_like(h_pre);
      torch::Tensor ga = g_ab.narrow(1, 0, a.size(1)), gb = g_ab.narrow(1, a.size(1), a.size(1));
      torch::mul_out(gb, grad_h, silu);
      torch::mul_out(ga, grad_h, b);
      ga.mul_(s * (1 + a * (1 - s)));
      return g_ab;
    }
  }
  return grad_h;
}

// Runs fn(e, lo, hi) for every expert e with rows [lo, hi). Many small segments run in
// parallel across experts, each matmul single-threaded: a matmul of a few rows cannot use
// two threads well, and splitting each one costs a fork and join per call. Few large
// segments run one after another, each matmul using every thread.
template <typename Fn>
void for_each_expert(const std::vector<int64_t>& offsets, bool include_empty, const Fn& fn) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t rows = offsets.back();
  const bool across = at::get_num_threads() > 1 && E >= 2 * at::get_num_threads() &&
                      rows <= 64 * E;  // on average at most 64 rows per expert
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      if (include_empty || offsets[e + 1] > offsets[e]) fn(e, offsets[e], offsets[e + 1]);
  };
  if (across)
    sw::parallel_for(0, E, /*grain_size=*/1, body);
  else
    body(0, E);
}

// Whether the grouped operation takes the few-rows path: at most kFewRows rows per expert
// on average, or experts of at most kSmallExpert input weights (and the path not turned
// off for a comparison). Decided by the shapes alone, so the same on any thread count.
bool few_rows(const std::vector<int64_t>& offsets, const torch::Tensor& w_in) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  const bool small = w_in.size(1) * w_in.size(2) <= kSmallExpert;
  return (offsets.back() <= kFewRows * E || small) && small_gemm_backend() != SmallGemmBackend::Off;
}

thread_local int64_t t_micro_batch = 0;

// The few-rows path's products, on raw memory; each expert's rows on one thread.
// out = x W[e] + b[e] for every expert e's rows (W: [E, K, N]).
template <typename T>
void few_rows_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                     const std::vector<int64_t>& offsets, torch::Tensor& out) {
  const int64_t K = w.size(1), N = w.size(2);
  const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>(), *bp = b.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for_each_expert(offsets, false, [&](int64_t e, int64_t lo, int64_t hi) {
    rows_mm<T>(hi - lo, N, K, xp + lo * K, K, wp + e * K * N, N, bp + e * N, op + lo * N, N);
  });
}

// out = x W[e] + b[e] for every expert e's rows, on the few-rows path or by a LibTorch
// matmul per expert.
void expert_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                   const std::vector<int64_t>& offsets, bool few, torch::Tensor& out) {
  if (few) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_ffn", [&] {
      few_rows_linear<scalar_t>(x, w, b.contiguous(), offsets, out);
    });
    return;
  }
  for_each_expert(offsets, false, [&](int64_t e, int64_t lo, int64_t hi) {
    torch::Tensor rows = out.slice(0, lo, hi);
    torch::addmm_out(rows, b[e], x.slice(0, lo, hi), w[e]);
  });
}

// gh = gy W_out^T for every expert's rows.
template <typename T>
void few_rows_grad_h(const torch::Tensor& gy, const torch::Tensor& w_out,
                     const std::vector<int64_t>& offsets, torch::Tensor& gh) {
  const int64_t F = w_out.size(1), D = w_out.size(2);
  const T *gp = gy.data_ptr<T>(), *wp = w_out.data_ptr<T>();
  T* hp = gh.data_ptr<T>();
  for_each_expert(offsets, false, [&](int64_t e, int64_t lo, int64_t hi) {
    rows_mm_bt<T>(hi - lo, F, D, gp + lo * D, D, wp + e * F * D, D, hp + lo * F, F);
  });
}

// The weight gradients' factors of one expert's rows [lo, hi): (x, gh_pre) for W_in and
// (h, gy) for W_out.
template <typename T>
std::pair<RowPair<T>, RowPair<T>> grad_pairs(const torch::Tensor& x, const torch::Tensor& gh_pre,
                                             const torch::Tensor& h, const torch::Tensor& gy,
                                             int64_t lo, int64_t hi) {
  const int64_t D = x.size(1), F_in = gh_pre.size(1), F = h.size(1);
  return {RowPair<T>{x.data_ptr<T>() + lo * D, gh_pre.data_ptr<T>() + lo * F_in, hi - lo, D, F_in},
          RowPair<T>{h.data_ptr<T>() + lo * F, gy.data_ptr<T>() + lo * D, hi - lo, F, D}};
}

// gx = gh_pre W_in^T for every expert's rows and, when `grads` holds the four gradient
// tensors (w_in, b_in, w_out, b_out), each expert's weight gradients from its rows.
template <typename T>
void few_rows_grad_x(const torch::Tensor& x, const torch::Tensor& gh_pre, const torch::Tensor& h,
                     const torch::Tensor& gy, const torch::Tensor& w_in,
                     const std::vector<int64_t>& offsets, torch::Tensor& gx,
                     std::vector<torch::Tensor>* grads) {
  const int64_t D = w_in.size(1), F_in = w_in.size(2), F = h.size(1);
  const T *gp = gh_pre.data_ptr<T>(), *wp = w_in.data_ptr<T>();
  T* xp = gx.data_ptr<T>();
  for_each_expert(offsets, grads != nullptr, [&](int64_t e, int64_t lo, int64_t hi) {
    rows_mm_bt<T>(hi - lo, D, F_in, gp + lo * F_in, F_in, wp + e * D * F_in, F_in, xp + lo * D, D);
    if (!grads) return;
    const auto [in, out] = grad_pairs<T>(x, gh_pre, h, gy, lo, hi);
    std::vector<torch::Tensor>& g = *grads;
    weight_grad<T>({in}, D, F_in, g[0].data_ptr<T>() + e * D * F_in, F_in,
                   g[1].data_ptr<T>() + e * F_in, false);
    weight_grad<T>({out}, F, D, g[2].data_ptr<T>() + e * F * D, D, g[3].data_ptr<T>() + e * D,
                   false);
  });
}

// h = act(x W_in + b_in), y = h W_out + b_out, expert by expert over row segments. The
// elementwise parts run once over all rows; only the matmuls go segment by segment.
struct GroupedFFNFunction : torch::autograd::Function<GroupedFFNFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x_ND,
                               const torch::Tensor& w_in_, const torch::Tensor& b_in,
                               const torch::Tensor& w_out_, const torch::Tensor& b_out,
                               const std::vector<int64_t>& offsets, int64_t act_id,
                               const at::IValue& deferred) {
    const Activation act = static_cast<Activation>(act_id);
    const torch::Tensor w_in = w_in_.contiguous(), w_out = w_out_.contiguous();
    const int64_t F_in = w_in.size(2), D = w_out.size(2), N = x_ND.size(0);
    const bool few = few_rows(offsets, w_in);
    torch::Tensor x = x_ND.contiguous();
    torch::Tensor h_pre = torch::empty({N, F_in}, x.options());
    expert_linear(x, w_in, b_in, offsets, few, h_pre);
    torch::Tensor h = activate(h_pre, act).contiguous();
    torch::Tensor y = torch::empty({N, D}, x.options());
    expert_linear(h, w_out, b_out, offsets, few, y);
    ctx->save_for_backward({x, w_in, w_out, h_pre, h});
    ctx->saved_data["offsets"] = offsets;
    ctx->saved_data["act"] = act_id;
    ctx->saved_data["few"] = few;
    ctx->saved_data["micro_batch"] = t_micro_batch;
    if (few) ctx->saved_data["deferred"] = deferred;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &w_in = saved[1], &w_out = saved[2], &h_pre = saved[3],
                        &h = saved[4];
    const std::vector<int64_t> offsets = ctx->saved_data["offsets"].toIntVector();
    const Activation act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const torch::Tensor gy = grads[0].contiguous();
    const torch::Tensor none;
    if (!ctx->saved_data["few"].toBool()) {
      const auto g = many_rows_backward(x, w_in, w_out, h_pre, h, gy, offsets, act);
      return {g[0], g[1], g[2], g[3], g[4], none, none, none};
    }
    torch::Tensor gh = torch::empty_like(h);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_ffn_backward",
                               [&] { few_rows_grad_h<scalar_t>(gy, w_out, offsets, gh); });
    const torch::Tensor gh_pre = activation_backward(gh, h_pre, act).contiguous();
    torch::Tensor gx = torch::empty_like(x);
    const at::IValue deferred = ctx->saved_data["deferred"];
    bool weights = false;  // whether the weights' gradients are wanted at all
    for (size_t i = 1; i <= 4; ++i)
      weights = weights || ctx->needs_input_grad(i);
    if (deferred.isCapsule() || !weights) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_ffn_backward", [&] {
        few_rows_grad_x<scalar_t>(x, gh_pre, h, gy, w_in, offsets, gx, nullptr);
      });
      if (weights) {  // they wait for the step's other rows (detached: the graph can go)
        auto stash = c10::static_intrusive_pointer_cast<DeferredGrads>(deferred.toCapsule());
        const std::lock_guard<std::mutex> lock(stash->mutex);
        stash->parts.push_back({ctx->saved_data["micro_batch"].toInt(), x.detach(), gh_pre.detach(),
                                h.detach(), gy.detach(), offsets});
      }
      return {gx, none, none, none, none, none, none, none};
    }
    const int64_t E = w_in.size(0);
    std::vector<torch::Tensor> g = {
        torch::empty_like(w_in), torch::empty({E, w_in.size(2)}, x.options()),
        torch::empty_like(w_out), torch::empty({E, w_out.size(2)}, x.options())};
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_ffn_backward", [&] {
      few_rows_grad_x<scalar_t>(x, gh_pre, h, gy, w_in, offsets, gx, &g);
    });
    return {gx, g[0], g[1], g[2], g[3], none, none, none};
  }

  // The backward of segments of many rows: LibTorch's matmuls, each on every thread.
  static std::vector<torch::Tensor> many_rows_backward(
      const torch::Tensor& x, const torch::Tensor& w_in, const torch::Tensor& w_out,
      const torch::Tensor& h_pre, const torch::Tensor& h, const torch::Tensor& gy,
      const std::vector<int64_t>& offsets, Activation act) {
    const int64_t E = w_in.size(0), N = x.size(0);
    torch::Tensor gh = torch::empty_like(h);
    for_each_expert(offsets, false, [&](int64_t e, int64_t lo, int64_t hi) {
      torch::Tensor out = gh.slice(0, lo, hi);
      torch::mm_out(out, gy.slice(0, lo, hi), w_out[e].t());
    });
    const torch::Tensor gh_pre = activation_backward(gh, h_pre, act);

    torch::Tensor gx = torch::empty({N, x.size(1)}, x.options());
    torch::Tensor gw_in = torch::empty_like(w_in), gw_out = torch::empty_like(w_out);
    torch::Tensor gb_in = torch::empty({E, w_in.size(2)}, x.options());
    torch::Tensor gb_out = torch::empty({E, w_out.size(2)}, x.options());
    for_each_expert(offsets, true, [&](int64_t e, int64_t lo, int64_t hi) {
      torch::Tensor gw_in_e = gw_in[e], gw_out_e = gw_out[e], gb_in_e = gb_in[e],
                    gb_out_e = gb_out[e];
      if (hi == lo) {  // an expert without rows gets zero gradients and costs nothing else
        gw_in_e.zero_();
        gw_out_e.zero_();
        gb_in_e.zero_();
        gb_out_e.zero_();
        return;
      }
      const torch::Tensor x_e = x.slice(0, lo, hi), gh_pre_e = gh_pre.slice(0, lo, hi);
      const torch::Tensor gy_e = gy.slice(0, lo, hi);
      torch::mm_out(gw_in_e, x_e.t(), gh_pre_e);
      torch::mm_out(gw_out_e, h.slice(0, lo, hi).t(), gy_e);
      torch::sum_out(gb_in_e, gh_pre_e, /*dim=*/{0});
      torch::sum_out(gb_out_e, gy_e, /*dim=*/{0});
      torch::Tensor gx_e = gx.slice(0, lo, hi);
      torch::mm_out(gx_e, gh_pre_e, w_in[e].t());
    });
    return {gx, gw_in, gb_in, gw_out, gb_out};
  }
};

}  // namespace

torch::Tensor grouped_ffn(const torch::Tensor& x_ND, const torch::Tensor& w_in,
                          const torch::Tensor& b_in, const torch::Tensor& w_out,
                          const torch::Tensor& b_out, const std::vector<int64_t>& offsets,
                          Activation act, const c10::intrusive_ptr<DeferredGrads>& deferred) {
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == w_in.size(0) + 1,
              "grouped_ffn: offsets must have E + 1 entries");
  TORCH_CHECK(offsets.back() == x_ND.size(0), "grouped_ffn: offsets must cover every row");
  return GroupedFFNFunction::apply(x_ND, w_in, b_in, w_out, b_out, offsets,
                                   static_cast<int64_t>(act),
                                   deferred ? at::IValue::make_capsule(deferred) : at::IValue());
}

MicroBatchScope::MicroBatchScope(int64_t index) : previous_(t_micro_batch) {
  t_micro_batch = index;
}

MicroBatchScope::~MicroBatchScope() {
  t_micro_batch = previous_;
}

ExpertsImpl::ExpertsImpl(int64_t n_experts_, int64_t d_model_, int64_t d_ff_, Activation act_)
    : n_experts(n_experts_), d_model(d_model_), d_ff(d_ff_), act(act_) {
  // Same fan-in uniform init as torch::nn::Linear; the transformer re-initialises anyway.
  const double bound_in = 1.0 / std::sqrt(static_cast<double>(d_model));
  const double bound_out = 1.0 / std::sqrt(static_cast<double>(d_ff));
  const int64_t F_in = input_width(d_ff, act);
  w_in = register_parameter("w_in",
                            torch::empty({n_experts, d_model, F_in}).uniform_(-bound_in, bound_in));
  b_in = register_parameter("b_in", torch::empty({n_experts, F_in}).uniform_(-bound_in, bound_in));
  w_out = register_parameter(
      "w_out", torch::empty({n_experts, d_ff, d_model}).uniform_(-bound_out, bound_out));
  b_out = register_parameter("b_out",
                             torch::empty({n_experts, d_model}).uniform_(-bound_out, bound_out));
}

torch::Tensor ExpertsImpl::forward(const torch::Tensor& x_ND, const Dispatch& d, Strategy s) {
  switch (s) {
    case Strategy::Loop:
      return forward_loop(x_ND, d);
    case Strategy::Capacity:
      return forward_capacity(x_ND, d);
    case Strategy::Grouped:
      return forward_grouped(x_ND, d);
  }
  return {};
}

torch::Tensor ExpertsImpl::forward_loop(const torch::Tensor& x_ND, const Dispatch& d) {
  // unbind: one autograd node whose backward stacks the per-expert gradients once, as the
  // seed's separate per-expert modules would have them.
  const auto w_in_e = w_in.unbind(0), b_in_e = b_in.unbind(0);
  const auto w_out_e = w_out.unbind(0), b_out_e = b_out.unbind(0);
  std::vector<torch::Tensor> outs;
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t lo = d.offsets[e], hi = d.offsets[e + 1];
    if (hi == lo) continue;
    torch::Tensor h = activate(torch::addmm(b_in_e[e], x_ND.slice(0, lo, hi), w_in_e[e]), act);
    outs.push_back(torch::addmm(b_out_e[e], h, w_out_e[e]));
  }
  if (outs.empty()) return torch::zeros({0, d_model}, x_ND.options());
  return torch::cat(outs);
}

torch::Tensor ExpertsImpl::forward_capacity(const torch::Tensor& x_ND, const Dispatch& d) {
  const int64_t C = d.capacity >= 0 ? d.capacity : d.max_load();
  if (C == 0) return torch::zeros({0, d_model}, x_ND.options());
  torch::Tensor seat_N = d.expert_N * C + d.slot_N;
  torch::Tensor buf_ECD = torch::zeros({n_experts * C, d_model}, x_ND.options())
                              .index_copy(0, seat_N, x_ND)
                              .view({n_experts, C, d_model});
  torch::Tensor h_ECF = activate(torch::baddbmm(b_in.unsqueeze(1), buf_ECD, w_in), act);
  torch::Tensor y_ECD = torch::baddbmm(b_out.unsqueeze(1), h_ECF, w_out);
  return y_ECD.view({n_experts * C, d_model}).index_select(0, seat_N);
}

torch::Tensor ExpertsImpl::forward_grouped(const torch::Tensor& x_ND, const Dispatch& d) {
  return grouped_ffn(x_ND, w_in, b_in, w_out, b_out, d.offsets, act, deferred);
}

void ExpertsImpl::defer_weight_grads(bool on) {
  if (!on) flush_weight_grads();
  deferred = on ? c10::make_intrusive<DeferredGrads>() : c10::intrusive_ptr<DeferredGrads>();
}

namespace {

// The parameter's gradient to write into: its .grad (true: add to it), or a new one.
std::pair<torch::Tensor, bool> grad_target(torch::Tensor& p) {
  if (p.grad().defined()) {
    if (!p.grad().is_contiguous()) p.mutable_grad() = p.grad().contiguous();
    return {p.grad(), true};
  }
  p.mutable_grad() = torch::empty_like(p, at::MemoryFormat::Contiguous);
  return {p.grad(), false};
}

}  // namespace

void ExpertsImpl::flush_weight_grads() {
  if (!deferred) return;
  std::vector<DeferredGrads::Part> parts;
  {
    const std::lock_guard<std::mutex> lock(deferred->mutex);
    parts.swap(deferred->parts);
  }
  if (parts.empty()) return;
  std::stable_sort(parts.begin(), parts.end(),
                   [](const auto& a, const auto& b) { return a.micro_batch < b.micro_batch; });
  const std::pair<torch::Tensor, bool> t[] = {grad_target(w_in), grad_target(b_in),
                                              grad_target(w_out), grad_target(b_out)};
  const torch::Tensor &gw_in = t[0].first, &gb_in = t[1].first, &gw_out = t[2].first,
                      &gb_out = t[3].first;
  const bool add_in = t[0].second, add_out = t[2].second;
  TORCH_CHECK(t[1].second == add_in && t[3].second == add_out,
              "flush_weight_grads: an expert bias's gradient is set and its weight's is not");
  const int64_t E = w_in.size(0), D = w_in.size(1), F_in = w_in.size(2), F = w_out.size(1);
  AT_DISPATCH_FLOATING_TYPES(w_in.scalar_type(), "flush_weight_grads", [&] {
    using T = scalar_t;
    sw::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        std::vector<RowPair<T>> in, out;
        for (const auto& p : parts) {
          const auto [i, o] =
              grad_pairs<T>(p.x, p.gh_pre, p.h, p.gy, p.offsets[e], p.offsets[e + 1]);
          in.push_back(i);
          out.push_back(o);
        }
        weight_grad<T>(in, D, F_in, gw_in.data_ptr<T>() + e * D * F_in, F_in,
                       gb_in.data_ptr<T>() + e * F_in, add_in);
        weight_grad<T>(out, F, D, gw_out.data_ptr<T>() + e * F * D, D, gb_out.data_ptr<T>() + e * D,
                       add_out);
      }
    });
  });
}

}  // namespace sw
