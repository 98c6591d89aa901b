#include "model/experts.h"

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

// h = act(x W_in + b_in), y = h W_out + b_out, expert by expert over row segments. The
// elementwise parts run once over all rows; only the matmuls go segment by segment.
struct GroupedFFNFunction : torch::autograd::Function<GroupedFFNFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x_ND,
                               const torch::Tensor& w_in, const torch::Tensor& b_in,
                               const torch::Tensor& w_out, const torch::Tensor& b_out,
                               const std::vector<int64_t>& offsets, int64_t act_id) {
    const Activation act = static_cast<Activation>(act_id);
    const int64_t F_in = w_in.size(2), D = w_out.size(2), N = x_ND.size(0);
    torch::Tensor x = x_ND.contiguous();
    torch::Tensor h_pre = torch::empty({N, F_in}, x.options());
    for_each_expert(offsets, false, [&](int64_t e, int64_t lo, int64_t hi) {
      torch::Tensor out = h_pre.slice(0, lo, hi);
      torch::addmm_out(out, b_in[e], x.slice(0, lo, hi), w_in[e]);
    });
    torch::Tensor h = activate(h_pre, act);
    torch::Tensor y = torch::empty({N, D}, x.options());
    for_each_expert(offsets, false, [&](int64_t e, int64_t lo, int64_t hi) {
      torch::Tensor out = y.slice(0, lo, hi);
      torch::addmm_out(out, b_out[e], h.slice(0, lo, hi), w_out[e]);
    });
    ctx->save_for_backward({x, w_in, w_out, h_pre, h});
    ctx->saved_data["offsets"] = offsets;
    ctx->saved_data["act"] = act_id;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &w_in = saved[1], &w_out = saved[2], &h_pre = saved[3],
                        &h = saved[4];
    const std::vector<int64_t> offsets = ctx->saved_data["offsets"].toIntVector();
    const Activation act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const int64_t E = w_in.size(0), N = x.size(0);
    torch::Tensor gy = grads[0].contiguous();

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
    return {gx, gw_in, gb_in, gw_out, gb_out, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor grouped_ffn(const torch::Tensor& x_ND, const torch::Tensor& w_in,
                          const torch::Tensor& b_in, const torch::Tensor& w_out,
                          const torch::Tensor& b_out, const std::vector<int64_t>& offsets,
                          Activation act) {
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == w_in.size(0) + 1,
              "grouped_ffn: offsets must have E + 1 entries");
  TORCH_CHECK(offsets.back() == x_ND.size(0), "grouped_ffn: offsets must cover every row");
  return GroupedFFNFunction::apply(x_ND, w_in, b_in, w_out, b_out, offsets,
                                   static_cast<int64_t>(act));
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
  return grouped_ffn(x_ND, w_in, b_in, w_out, b_out, d.offsets, act);
}

}  // namespace sw
