// The expert strategies (loop, capacity, grouped) agree on outputs and on the gradients of
// inputs, router and expert weights for the same routing and drop decisions, across top-k,
// drop policies, dropping, scaling and edge cases; the grouped operation's backward matches
// finite differences; and weights trained with one strategy run with any other.
#include <array>
#include <cmath>

#include <doctest/doctest.h>

#include "helpers.h"
#include "model/small_gemm.h"
#include "model/switch_ffn.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace {

struct Result {
  torch::Tensor y, dx, d_router_w, d_router_b, d_w_in, d_b_in, d_w_out, d_b_out;
  int64_t dropped = 0;
  torch::Tensor counts_E;  // assignments the router sent to each expert
};

torch::Tensor grad_or_zeros(const torch::Tensor& p) {
  return p.grad().defined() ? p.grad().clone() : torch::zeros_like(p);
}

// One forward and backward of `layer` with strategy `s`; the seed is reset first so the
// random drop policy makes the same decisions for every strategy.
Result run(sw::SwitchFFN& layer, sw::Strategy s, const torch::Tensor& x0,
           const torch::Tensor& target) {
  layer->cfg.strategy = s;
  layer->zero_grad();
  torch::manual_seed(1234);
  torch::Tensor x = x0.clone().requires_grad_(true);
  sw::SwitchFFNOutput out = layer->forward(x);
  (out.y * target).sum().backward();
  Result r;
  r.y = out.y.detach();
  r.dx = grad_or_zeros(x);
  r.d_router_w = grad_or_zeros(layer->router->proj->weight);
  r.d_router_b = grad_or_zeros(layer->router->proj->bias);
  r.d_w_in = grad_or_zeros(layer->experts->w_in);
  r.d_b_in = grad_or_zeros(layer->experts->b_in);
  r.d_w_out = grad_or_zeros(layer->experts->w_out);
  r.d_b_out = grad_or_zeros(layer->experts->b_out);
  r.dropped = out.stats.dropped;
  r.counts_E = out.stats.counts_E.clone();
  return r;
}

double diff(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  return (a - b).abs().max().item<double>();
}

// Compares every strategy against the loop; returns the largest difference seen. `expect`
// (optional) checks the loop's result: the case's own precondition.
double check_all_strategies(const sw::MoeConfig& moe, int64_t T, int64_t D = 8, int64_t F = 12,
                            const std::function<void(sw::SwitchFFN&)>& tweak = nullptr,
                            sw::Activation act = sw::Activation::Gelu,
                            const std::function<void(const Result&)>& expect = nullptr) {
  torch::manual_seed(7);
  sw::SwitchFFN layer(D, F, moe, act);
  {
    torch::NoGradGuard no_grad;  // non-zero biases so that their gradients are exercised
    for (auto& p : layer->parameters())
      p.normal_(0.0, 0.5);
  }
  if (tweak) tweak(layer);
  torch::Tensor x = torch::randn({T, D}), target = torch::randn({T, D});
  Result ref = run(layer, sw::Strategy::Loop, x, target);
  if (expect) expect(ref);
  double worst = 0;
  for (sw::Strategy s : {sw::Strategy::Capacity, sw::Strategy::Grouped}) {
    Result r = run(layer, s, x, target);
    CHECK(r.dropped == ref.dropped);
    const double d = std::max(
        {diff(r.y, ref.y), diff(r.dx, ref.dx), diff(r.d_router_w, ref.d_router_w),
         diff(r.d_router_b, ref.d_router_b), diff(r.d_w_in, ref.d_w_in), diff(r.d_b_in, ref.d_b_in),
         diff(r.d_w_out, ref.d_w_out), diff(r.d_b_out, ref.d_b_out)});
    CHECK(d < 1e-5);  // float32 rounding: the largest seen is 3.8e-6
    worst = std::max(worst, d);
  }
  return worst;
}

sw::MoeConfig base_moe(int64_t E, int64_t k) {
  sw::MoeConfig m;
  m.n_experts = E;
  m.top_k = k;
  m.capacity_factor = 1.0;
  m.z_loss = 0;
  m.jitter = 0;
  return m;
}

}  // namespace

TEST_CASE("loop, capacity and grouped agree: top-k x drop policy x dropping x scaling x score") {
  double worst = 0;
  int cases = 0;
  for (int64_t k : {1, 2}) {
    for (const auto& policy : sw::choices<sw::DropPolicy>()) {
      for (bool drop : {true, false}) {
        for (bool scale : {true, false}) {
          for (const auto& dropped : sw::choices<sw::DroppedOutput>()) {
            sw::MoeConfig m = base_moe(4, k);
            m.drop_policy = policy.value;
            m.drop_tokens = drop;
            m.is_scale_prob = scale;
            m.dropped = dropped.value;
            CAPTURE(k);
            CAPTURE(policy.name);
            CAPTURE(drop);
            CAPTURE(scale);
            CAPTURE(dropped.name);
            worst = std::max(worst, check_all_strategies(m, 24));
            ++cases;
          }
        }
      }
    }
  }
  // Sigmoid scores, top-2 (top-1 gates are all 1) under each drop policy, and top-1.
  for (const auto& policy : sw::choices<sw::DropPolicy>())
    for (int64_t k : {2, 1}) {
      sw::MoeConfig m = base_moe(4, k);
      m.score = sw::Score::Sigmoid;
      m.drop_policy = policy.value;
      CAPTURE(k);
      CAPTURE(policy.name);
      worst = std::max(worst, check_all_strategies(m, 24));
      ++cases;
    }
  // The lab's options: SwiGLU experts, shared experts, rerouting, the balancing bias.
  for (int64_t k : {1, 2}) {
    sw::MoeConfig m = base_moe(4, k);
    CAPTURE(k);
    worst = std::max(worst, check_all_strategies(m, 24, 8, 12, nullptr, sw::Activation::Swiglu));
    m.shared_experts = 2;
    worst = std::max(worst, check_all_strategies(m, 24));
    m.shared_experts = 0;
    m.overflow = sw::Overflow::Reroute;
    m.balance = sw::Balance::Bias;
    worst = std::max(worst, check_all_strategies(m, 24, 8, 12, [](sw::SwitchFFN& l) {
                       torch::NoGradGuard no_grad;
                       l->router->expert_bias.copy_(torch::tensor({0.3f, -0.2f, 0.0f, 0.1f}));
                     }));
    cases += 3;
  }
  // The grouped operation's other path (a LibTorch matmul per expert, which large experts
  // with many rows take), forced, and the small-matrix products on the BLAS.
  for (auto backend :
       {sw::SmallGemmBackend::Off, sw::SmallGemmBackend::Kernel, sw::SmallGemmBackend::Blas})
    for (int64_t k : {1, 2}) {
      const test::BackendScope scope(backend);
      sw::MoeConfig m = base_moe(4, k);
      CAPTURE(k);
      CAPTURE(sw::small_gemm_name());
      worst = std::max(worst, check_all_strategies(m, 24));
      worst = std::max(worst, check_all_strategies(m, 24, 8, 12, nullptr, sw::Activation::Swiglu));
      cases += 2;
    }
  MESSAGE(cases << " configurations, max abs difference to the loop over outputs and all "
                   "gradients: "
                << worst);
}

TEST_CASE("swiglu: the grouped operation equals SwiGLU composed from plain ops, per expert") {
  // (silu(x W_gate) * (x W_up)) W_out with W_gate, W_up the two halves of w_in, written
  // here without the project's activation code.
  torch::manual_seed(9);
  const int64_t E = 3, D = 6, F = 5;
  const std::vector<int64_t> offsets = {0, 4, 4, 9};
  torch::Tensor x = torch::randn({9, D}), w_in = torch::randn({E, D, 2 * F}),
                b_in = torch::randn({E, 2 * F}), w_out = torch::randn({E, F, D}),
                b_out = torch::randn({E, D});
  torch::Tensor y = sw::grouped_ffn(x, w_in, b_in, w_out, b_out, offsets, sw::Activation::Swiglu);
  double worst = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    torch::Tensor xe = x.slice(0, offsets[e], offsets[e + 1]);
    torch::Tensor gate = xe.matmul(w_in[e].slice(1, 0, F)) + b_in[e].slice(0, 0, F);
    torch::Tensor up = xe.matmul(w_in[e].slice(1, F, 2 * F)) + b_in[e].slice(0, F, 2 * F);
    torch::Tensor h = gate / (1 + torch::exp(-gate)) * up;
    worst = std::max(worst,
                     diff(y.slice(0, offsets[e], offsets[e + 1]), h.matmul(w_out[e]) + b_out[e]));
  }
  MESSAGE("max |grouped swiglu - composed| = " << worst);
  CHECK(worst < 1e-4);
  // The dense FFN holds the same three matrices: fc_in of width 2F.
  sw::DenseFFN dense(D, F, sw::Activation::Swiglu);
  CHECK(dense->fc_in->weight.sizes() == torch::IntArrayRef({2 * F, D}));
  CHECK(dense->fc_out->weight.sizes() == torch::IntArrayRef({D, F}));
}

TEST_CASE("strategies agree on the edge cases") {
  double worst = 0;
  const auto none = nullptr;
  const auto gelu = sw::Activation::Gelu;
  const auto all_on_expert_1 = [](sw::SwitchFFN& l) {
    torch::NoGradGuard g;
    l->router->proj->bias[1] = 1e4;
  };
  SUBCASE("an expert with no tokens") {
    worst = check_all_strategies(
        base_moe(4, 1), 16, 8, 12,
        [](sw::SwitchFFN& l) {
          torch::NoGradGuard g;
          l->router->proj->bias[2] = -1e4;
        },
        gelu, [](const Result& r) { CHECK(r.counts_E[2].item<int64_t>() == 0); });
  }
  SUBCASE("every token on one expert, with dropping") {
    sw::MoeConfig m = base_moe(4, 1);
    worst = check_all_strategies(m, 16, 8, 12, all_on_expert_1, gelu, [](const Result& r) {
      CHECK(r.counts_E[1].item<int64_t>() == 16);
      CHECK(r.dropped == 16 - 4);  // capacity int(1.0 * 16 / 4) = 4
    });
  }
  SUBCASE("every token on one expert, dropless") {
    sw::MoeConfig m = base_moe(4, 1);
    m.drop_tokens = false;
    worst = check_all_strategies(m, 16, 8, 12, all_on_expert_1, gelu, [](const Result& r) {
      CHECK(r.counts_E[1].item<int64_t>() == 16);
      CHECK(r.dropped == 0);
    });
  }
  SUBCASE("capacity 0: everything dropped") {
    sw::MoeConfig m = base_moe(4, 1);
    m.capacity_factor = 0.1;  // int(0.1 * 16 / 4) = 0
    worst = check_all_strategies(m, 16, 8, 12, none, gelu,
                                 [](const Result& r) { CHECK(r.dropped == 16); });
  }
  SUBCASE("capacity 1") {
    sw::MoeConfig m = base_moe(4, 1);
    m.capacity_factor = 0.25;  // int(0.25 * 16 / 4) = 1: at most one seat per expert
    worst = check_all_strategies(m, 16, 8, 12, none, gelu,
                                 [](const Result& r) { CHECK(r.dropped >= 16 - 4); });
  }
  SUBCASE("fewer tokens than experts") {
    sw::MoeConfig m = base_moe(8, 1);
    m.capacity_factor = 4.0;
    worst = check_all_strategies(m, 3, 8, 12, none, gelu, [](const Result& r) {
      CHECK((r.counts_E == 0).sum().item<int64_t>() >= 5);  // 3 tokens, 8 experts
      CHECK(r.dropped == 0);
    });
  }
  SUBCASE("k = E") {
    sw::MoeConfig m = base_moe(4, 4);
    worst = check_all_strategies(m, 12, 8, 12, none, gelu, [](const Result& r) {
      CHECK(r.counts_E.eq(12).all().item<bool>());  // every token on every expert
    });
  }
  SUBCASE("k = E, dropless") {
    sw::MoeConfig m = base_moe(4, 4);
    m.drop_tokens = false;
    worst = check_all_strategies(m, 12, 8, 12, none, gelu, [](const Result& r) {
      CHECK(r.counts_E.eq(12).all().item<bool>());
      CHECK(r.dropped == 0);
    });
  }
  MESSAGE("max abs difference to the loop: " << worst);
}

TEST_CASE("top-2 gates are renormalized and the layer sums both experts") {
  torch::manual_seed(11);
  sw::MoeConfig m = base_moe(4, 2);
  m.drop_tokens = false;
  sw::SwitchFFN layer(6, 10, m, sw::Activation::Relu);
  torch::Tensor x = torch::randn({5, 6});
  sw::Routing r = layer->route(x);
  CHECK(torch::allclose(r.gate_TK.sum(-1), torch::ones({5})));
  torch::Tensor y = layer->forward(x).y;
  // By hand: y_t = sum_j g_tj * expert_{e_tj}(x_t).
  auto& ex = layer->experts;
  for (int64_t t = 0; t < 5; ++t) {
    torch::Tensor expect = torch::zeros({6});
    for (int64_t j = 0; j < 2; ++j) {
      const int64_t e = r.expert_TK[t][j].item<int64_t>();
      torch::Tensor h = torch::relu(torch::matmul(x[t], ex->w_in[e]) + ex->b_in[e]);
      expect += r.gate_TK[t][j] * (torch::matmul(h, ex->w_out[e]) + ex->b_out[e]);
    }
    CHECK(diff(y[t], expect) < 1e-5);
  }
}

TEST_CASE("grouped operation: backward against central finite differences (float64)") {
  torch::manual_seed(5);
  const int64_t E = 3, D = 4, F = 5;
  // Expert 1 has no rows. The small-matrix path, then LibTorch's matmul per expert (the
  // path of large experts with many rows), forced.
  const std::vector<int64_t> offsets = {0, 3, 3, 7};
  const int64_t N = offsets.back();
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  const char* names[] = {"x", "w_in", "b_in", "w_out", "b_out"};
  for (const auto& choice : sw::choices<sw::Activation>())
    for (auto backend : {sw::SmallGemmBackend::Kernel, sw::SmallGemmBackend::Off}) {
      const test::BackendScope scope(backend);
      const std::string path = sw::small_gemm_name() == "off" ? "matmul per expert" : "small";
      CAPTURE(path);
      torch::Tensor R = torch::randn({N, D}, opts);
      const sw::Activation act = choice.value;
      const int64_t F_in = sw::input_width(F, act);  // 2F for swiglu
      std::vector<torch::Tensor> inputs = {
          torch::randn({N, D}, opts), torch::randn({E, D, F_in}, opts),
          torch::randn({E, F_in}, opts), torch::randn({E, F, D}, opts), torch::randn({E, D}, opts)};
      auto loss = [&](const std::vector<torch::Tensor>& in) {
        return (sw::grouped_ffn(in[0], in[1], in[2], in[3], in[4], offsets, act) * R).sum();
      };
      std::vector<torch::Tensor> leaves;
      for (auto& t : inputs)
        leaves.push_back(t.clone().requires_grad_(true));
      loss(leaves).backward();
      torch::NoGradGuard no_grad;
      const double eps = 1e-6;
      double worst = 0;
      for (size_t i = 0; i < inputs.size(); ++i) {
        torch::Tensor numeric = torch::zeros_like(inputs[i]);
        auto flat = inputs[i].view({-1});
        for (int64_t j = 0; j < flat.numel(); ++j) {
          const double v = flat[j].item<double>();
          flat[j] = v + eps;
          const double up = loss(inputs).item<double>();
          flat[j] = v - eps;
          const double down = loss(inputs).item<double>();
          flat[j] = v;
          numeric.view({-1})[j] = (up - down) / (2 * eps);
        }
        const double d = diff(leaves[i].grad(), numeric);
        CAPTURE(std::string(names[i]));
        CHECK(d < 1e-6);
        worst = std::max(worst, d);
      }
      // Expert 1 had no rows: its gradients are exactly zero.
      CHECK(leaves[1].grad()[1].abs().sum().item<double>() == 0.0);
      CHECK(leaves[4].grad()[1].abs().sum().item<double>() == 0.0);
      MESSAGE(std::string(choice.name)
              << ", " << path << ": max |analytic - finite difference| = " << worst);
    }
}

TEST_CASE("weights trained with one strategy run with every other") {
  const std::string dir = test::scratch_dir("strategy_ckpt");
  sw::Config c = test::tiny_config();
  c.train.steps = 20;
  c.moe.strategy = sw::Strategy::Grouped;
  c.moe.drop_policy =
      sw::DropPolicy::Position;  // deterministic drops, so logits must match exactly
  sw::TrainOptions opt;
  opt.out_dir = dir;
  opt.quiet = true;
  sw::train(c, opt);
  const std::string ckpt = *sw::newest_checkpoint(dir);
  torch::Tensor idx = torch::randint(0, 65, {4, 32}, torch::kInt64);
  torch::Tensor reference;
  for (const auto& s : sw::choices<sw::Strategy>()) {
    sw::Config cs = c;
    cs.moe.strategy = s.value;
    sw::Transformer m(cs, 65);
    sw::load_weights(ckpt, *m);
    m->eval();
    torch::NoGradGuard no_grad;
    torch::Tensor logits = m->forward(idx).logits_BSV;
    if (!reference.defined()) reference = logits;
    CAPTURE(s);
    CHECK(diff(logits, reference) < 1e-5);
  }
}

namespace {

// a (m x k) times b: (k x n), or b^T when b is (n x k), in float64.
torch::Tensor reference_mm(const torch::Tensor& a, const torch::Tensor& b, bool b_t) {
  return torch::matmul(a.to(torch::kFloat64), (b_t ? b.t() : b).to(torch::kFloat64));
}

// Checks the three small-matrix products of float at one shape against float64; returns the
// largest error relative to the largest reference value (at least 1). A tile that computes
// a wrong or no value is off by O(1); rounding is off by ~1e-7 per term.
double check_small_gemm_shape(int64_t m, int64_t n, int64_t k) {
  const torch::Tensor A = torch::randn({m, k}), B = torch::randn({k, n}), Bt = torch::randn({n, k});
  const torch::Tensor bias = torch::randn({n});
  double worst = 0;
  auto err = [&](const torch::Tensor& got, const torch::Tensor& want) {
    if (got.numel() == 0) return;
    const double scale = std::max(1.0, want.abs().max().item<double>());
    const double e = (got.to(torch::kFloat64) - want).abs().max().item<double>() / scale;
    worst = std::max(worst, std::isnan(e) ? 1e9 : e);
  };
  torch::Tensor C = torch::full({m, n}, std::nanf(""));  // every element must be written
  sw::rows_mm<float>(m, n, k, A.data_ptr<float>(), k, B.data_ptr<float>(), n,
                     bias.data_ptr<float>(), C.data_ptr<float>(), n);
  err(C, reference_mm(A, B, false) + bias.to(torch::kFloat64));
  C.fill_(std::nanf(""));
  sw::rows_mm_bt<float>(m, n, k, A.data_ptr<float>(), k, Bt.data_ptr<float>(), k,
                        C.data_ptr<float>(), n);
  err(C, reference_mm(A, Bt, true));
  // Weight gradient over two row blocks (m and 3 rows), overwriting, then added to W.
  const torch::Tensor A2 = torch::randn({3, k}), G = torch::randn({m, n}),
                      G2 = torch::randn({3, n});
  const std::vector<sw::RowPair<float>> pairs = {
      {A.data_ptr<float>(), G.data_ptr<float>(), m, k, n},
      {A2.data_ptr<float>(), G2.data_ptr<float>(), 3, k, n}};
  torch::Tensor W = torch::full({k, n}, std::nanf("")), b = torch::full({n}, std::nanf(""));
  sw::weight_grad<float>(pairs, k, n, W.data_ptr<float>(), n, b.data_ptr<float>(), false);
  const torch::Tensor want_W = reference_mm(A.t(), G, false) + reference_mm(A2.t(), G2, false);
  const torch::Tensor want_b = (G.sum(0) + G2.sum(0)).to(torch::kFloat64);
  err(W, want_W);
  err(b, want_b);
  const torch::Tensor W0 = torch::randn({k, n}), b0 = torch::randn({n});
  W.copy_(W0);
  b.copy_(b0);
  sw::weight_grad<float>(pairs, k, n, W.data_ptr<float>(), n, b.data_ptr<float>(), true);
  err(W, want_W + W0.to(torch::kFloat64));
  err(b, want_b + b0.to(torch::kFloat64));
  return worst;
}

}  // namespace

TEST_CASE("small-matrix kernels: every tile shape and tail against float64, on each backend") {
  torch::manual_seed(3);
  for (sw::SmallGemmBackend backend : test::kProductBackends) {
    const test::BackendScope scope(backend);
    const std::string name = sw::small_gemm_name();
    double worst = 0;
    for (int64_t m : {1, 2, 5, 6, 7, 13, 40})
      for (int64_t n : {1, 15, 16, 17, 64, 65, 130})
        for (int64_t k : {1, 15, 16, 33, 128}) {
          CAPTURE(name);
          CAPTURE(m);
          CAPTURE(n);
          CAPTURE(k);
          const double e = check_small_gemm_shape(m, n, k);
          CHECK(e < 2e-6);
          worst = std::max(worst, e);
        }
    MESSAGE(name << ": max error against float64, relative to the largest value = " << worst);
  }
  CHECK(sw::small_gemm_name() == "dnnl (oneDNN)");  // the default
  const test::BackendScope scope(sw::SmallGemmBackend::Kernel);
  if (__builtin_cpu_supports("avx512f")) CHECK(sw::small_gemm_name() == "kernel (AVX-512)");
}

TEST_CASE("deferred weight gradients: one product over the micro-batches, in their order") {
  // Two micro-batches through one grouped operation: the weight gradients held back and
  // added by one product per expert equal autograd's sum of the two, whichever backward
  // runs first (bit for bit), and the input gradients are untouched.
  torch::manual_seed(9);
  const int64_t E = 4, D = 20, F = 36;
  sw::Experts ex(E, D, F, sw::Activation::Gelu);
  const std::vector<int64_t> off0 = {0, 5, 5, 12, 30}, off1 = {0, 9, 17, 17, 22};
  const torch::Tensor x0 = torch::randn({30, D}), x1 = torch::randn({22, D});
  const torch::Tensor r0 = torch::randn({30, D}), r1 = torch::randn({22, D});
  auto grads = [&]() {
    return std::vector<torch::Tensor>{ex->w_in.grad().clone(), ex->b_in.grad().clone(),
                                      ex->w_out.grad().clone(), ex->b_out.grad().clone()};
  };
  // Autograd's own accumulation.
  ex->zero_grad(/*set_to_none=*/true);
  torch::Tensor gx[2];
  for (int i = 0; i < 2; ++i) {
    torch::Tensor x = (i == 0 ? x0 : x1).clone().requires_grad_(true);
    (sw::grouped_ffn(x, ex->w_in, ex->b_in, ex->w_out, ex->b_out, i == 0 ? off0 : off1, ex->act) *
     (i == 0 ? r0 : r1))
        .sum()
        .backward();
    gx[i] = x.grad();
  }
  const std::vector<torch::Tensor> want = grads();
  // Deferred, the backward passes in either order.
  std::vector<torch::Tensor> got[2];
  ex->defer_weight_grads(true);
  for (int order = 0; order < 2; ++order) {
    ex->zero_grad(/*set_to_none=*/true);
    torch::Tensor loss[2], xs[2];
    for (int i = 0; i < 2; ++i) {
      const sw::MicroBatchScope tag(i);
      xs[i] = (i == 0 ? x0 : x1).clone().requires_grad_(true);
      loss[i] = (sw::grouped_ffn(xs[i], ex->w_in, ex->b_in, ex->w_out, ex->b_out,
                                 i == 0 ? off0 : off1, ex->act, ex->deferred) *
                 (i == 0 ? r0 : r1))
                    .sum();
    }
    for (int i : {order, 1 - order}) {
      loss[i].backward();
      CHECK(torch::equal(xs[i].grad(), gx[i]));
    }
    CHECK(!ex->w_in.grad().defined());  // held back until the flush
    ex->flush_weight_grads();
    got[order] = grads();
  }
  ex->defer_weight_grads(false);
  CHECK(!ex->deferred);
  for (size_t j = 0; j < want.size(); ++j) {
    CAPTURE(j);
    CHECK(torch::equal(got[0][j], got[1][j]));
    CHECK(diff(got[0][j], want[j]) < 1e-5);
  }
  // A flush onto gradients already set adds to them: grad + (the part's own sum).
  auto one_pass = [&](bool deferred) {
    const sw::MicroBatchScope tag(0);
    torch::Tensor x = x0.clone().requires_grad_(true);
    (sw::grouped_ffn(x, ex->w_in, ex->b_in, ex->w_out, ex->b_out, off0, ex->act,
                     deferred ? ex->deferred : c10::intrusive_ptr<sw::DeferredGrads>()) *
     r0)
        .sum()
        .backward();
  };
  ex->zero_grad(/*set_to_none=*/true);
  one_pass(false);
  const std::vector<torch::Tensor> single = grads();
  ex->defer_weight_grads(true);
  for (auto* p : {&ex->w_in, &ex->b_in, &ex->w_out, &ex->b_out})
    p->mutable_grad() = torch::ones_like(*p);
  one_pass(true);
  ex->flush_weight_grads();
  const std::vector<torch::Tensor> added = grads();
  for (size_t j = 0; j < single.size(); ++j) {
    CAPTURE(j);
    CHECK(torch::equal(added[j], single[j] + 1));
  }
  ex->defer_weight_grads(false);
}

TEST_CASE("small-matrix kernels: row strides wider than the rows, and empty weight gradients") {
  torch::manual_seed(4);
  for (sw::SmallGemmBackend backend : test::kProductBackends) {
    const test::BackendScope scope(backend);
    CAPTURE(sw::small_gemm_name());
    const int64_t m = 7, n = 70, k = 19;
    // Each operand inside a wider buffer; the padding columns must come out untouched.
    const torch::Tensor Abuf = torch::randn({m, k + 3}), Bbuf = torch::randn({k, n + 5});
    const torch::Tensor Btbuf = torch::randn({n, k + 2});
    const torch::Tensor A = Abuf.narrow(1, 0, k), B = Bbuf.narrow(1, 0, n);
    const torch::Tensor Bt = Btbuf.narrow(1, 0, k);
    torch::Tensor Cbuf = torch::full({m, n + 2}, 7.0f);
    sw::rows_mm<float>(m, n, k, Abuf.data_ptr<float>(), k + 3, Bbuf.data_ptr<float>(), n + 5,
                       nullptr, Cbuf.data_ptr<float>(), n + 2);
    CHECK(torch::allclose(Cbuf.narrow(1, 0, n), torch::matmul(A, B), 1e-5, 1e-5));
    CHECK(torch::equal(Cbuf.narrow(1, n, 2), torch::full({m, 2}, 7.0f)));
    Cbuf.fill_(7.0f);
    sw::rows_mm_bt<float>(m, n, k, Abuf.data_ptr<float>(), k + 3, Btbuf.data_ptr<float>(), k + 2,
                          Cbuf.data_ptr<float>(), n + 2);
    CHECK(torch::allclose(Cbuf.narrow(1, 0, n), torch::matmul(A, Bt.t()), 1e-5, 1e-5));
    CHECK(torch::equal(Cbuf.narrow(1, n, 2), torch::full({m, 2}, 7.0f)));
    // Weight gradients with strided rows and a block of no rows.
    const torch::Tensor Gbuf = torch::randn({m, n + 4});
    const std::vector<sw::RowPair<float>> pairs = {
        {Abuf.data_ptr<float>(), Gbuf.data_ptr<float>(), 0, k + 3, n + 4},
        {Abuf.data_ptr<float>(), Gbuf.data_ptr<float>(), m, k + 3, n + 4}};
    torch::Tensor Wbuf = torch::full({k, n + 1}, 7.0f), b = torch::full({n}, 7.0f);
    sw::weight_grad<float>(pairs, k, n, Wbuf.data_ptr<float>(), n + 1, b.data_ptr<float>(), false);
    const torch::Tensor G = Gbuf.narrow(1, 0, n);
    CHECK(torch::allclose(Wbuf.narrow(1, 0, n), torch::matmul(A.t(), G), 1e-5, 1e-5));
    CHECK(torch::equal(Wbuf.narrow(1, n, 1), torch::full({k, 1}, 7.0f)));
    CHECK(torch::allclose(b, G.sum(0), 1e-5, 1e-5));
    // No terms (k = 0): the bias, or zeros.
    torch::Tensor Z = torch::full({m, n}, 7.0f);
    const torch::Tensor bias0 = torch::randn({n});
    sw::rows_mm<float>(m, n, 0, Abuf.data_ptr<float>(), 1, Bbuf.data_ptr<float>(), n + 5,
                       bias0.data_ptr<float>(), Z.data_ptr<float>(), n);
    CHECK(torch::equal(Z, bias0.expand({m, n})));
    sw::rows_mm_bt<float>(m, n, 0, Abuf.data_ptr<float>(), 1, Btbuf.data_ptr<float>(), 1,
                          Z.data_ptr<float>(), n);
    CHECK(torch::equal(Z, torch::zeros({m, n})));
    // No rows at all: zeros when overwriting, nothing added when accumulating.
    const std::vector<sw::RowPair<float>> none;
    torch::Tensor W = torch::full({k, n}, 7.0f), b2 = torch::full({n}, 7.0f);
    sw::weight_grad<float>(none, k, n, W.data_ptr<float>(), n, b2.data_ptr<float>(), true);
    CHECK(torch::equal(W, torch::full({k, n}, 7.0f)));
    CHECK(torch::equal(b2, torch::full({n}, 7.0f)));
    sw::weight_grad<float>(none, k, n, W.data_ptr<float>(), n, b2.data_ptr<float>(), false);
    CHECK(torch::equal(W, torch::zeros({k, n})));
    CHECK(torch::equal(b2, torch::zeros({n})));
  }
}

TEST_CASE("small-matrix products: the same bits wherever the operands lie, on any thread count") {
  // A product's bits may depend on the shapes only: not on where in memory (how aligned) its
  // operands are, nor on the threads the caller has (oneDNN and the BLAS are held to one, and
  // the caller's thread count is what it was).
  struct Threads {  // sets the intra-op threads while it lives
    explicit Threads(int n) : before(at::get_num_threads()) { at::set_num_threads(n); }
    ~Threads() { at::set_num_threads(before); }
    int before;
  };
  torch::manual_seed(6);
  for (const auto& [m, n, k] : {std::array<int64_t, 3>{13, 70, 37}, {256, 512, 128}}) {
    const torch::Tensor A = torch::randn({m, k}), B = torch::randn({k, n});
    const torch::Tensor Bt = torch::randn({n, k}), G = torch::randn({m, n});
    for (sw::SmallGemmBackend backend : test::kProductBackends) {
      const test::BackendScope scope(backend);
      CAPTURE(sw::small_gemm_name());
      CAPTURE(m);
      std::vector<torch::Tensor> first;
      for (int64_t shift : {0, 1, 3}) {
        for (int threads : {1, 2}) {
          CAPTURE(shift);
          CAPTURE(threads);
          const Threads use(threads);
          // Each operand copied `shift` floats into a fresh buffer.
          auto placed = [&](const torch::Tensor& t) {
            return torch::cat({torch::zeros({shift}), t.flatten()}).narrow(0, shift, t.numel());
          };
          const torch::Tensor a = placed(A), b = placed(B), bt = placed(Bt), g = placed(G);
          torch::Tensor C = torch::empty({m * n}), Ct = torch::empty({m * n});
          torch::Tensor W = torch::empty({k * n}), bias = torch::empty({n});
          sw::rows_mm<float>(m, n, k, a.data_ptr<float>(), k, b.data_ptr<float>(), n, nullptr,
                             C.data_ptr<float>(), n);
          sw::rows_mm_bt<float>(m, n, k, a.data_ptr<float>(), k, bt.data_ptr<float>(), k,
                                Ct.data_ptr<float>(), n);
          const int64_t half = m / 2;
          const std::vector<sw::RowPair<float>> pairs = {
              {a.data_ptr<float>(), g.data_ptr<float>(), half, k, n},
              {a.data_ptr<float>() + half * k, g.data_ptr<float>() + half * n, m - half, k, n}};
          sw::weight_grad<float>(pairs, k, n, W.data_ptr<float>(), n, bias.data_ptr<float>(),
                                 false);
          CHECK(at::get_num_threads() == threads);
          const std::vector<torch::Tensor> got = {C, Ct, W, bias};
          if (first.empty()) {
            first = got;
            CHECK(torch::allclose(C.view({m, n}), torch::matmul(A, B), 1e-4, 1e-4));
            CHECK(torch::allclose(W.view({k, n}), torch::matmul(A.t(), G), 1e-4, 1e-4));
            continue;
          }
          for (size_t i = 0; i < got.size(); ++i) {
            CAPTURE(i);
            CHECK(torch::equal(got[i], first[i]));
          }
        }
      }
    }
  }
}
