// small-gemm-libs: the grouped expert operation's three products, timed with each library
// made for small matrices that Debian offers, at the shapes a training step gives them.
//
// One pass is what one MoE layer asks of its experts in one step: per expert, for every
// micro-batch, the forward (x W_in, h W_out) and the input gradient (g_y W_out^T,
// g_h W_in^T), then the weight gradients of all micro-batches (x^T g_h, h^T g_y). The
// experts run in parallel over the machine's threads, as in the model. Libraries:
//   kernel       switch's own AVX-512 products (src/model/small_gemm.h)
//   blas         the BLAS LibTorch links (OpenBLAS on Debian), through the same interface
//   libxsmm      LIBXSMM 1.17's JIT kernels (libxsmm_smmdispatch), one per shape, cached
//   dnnl         oneDNN's GEMM (dnnl_sgemm), the library LibTorch itself carries
//   dnnl-matmul  oneDNN's matmul primitive, one per shape and thread, cached
// A library without a product for a shape (LIBXSMM's JIT has no transposed A in 1.17) falls
// back, per product, to its general GEMM; the table says which products did.
//
// Every library's results are compared with the first library's (and, with --check, all
// with a double-precision reference); a difference beyond float rounding exits 1, an
// error in a library exits 2.
//
//   small-gemm-libs [--experts 64] [--rows 8] [--d-model 128] [--d-ff 512]
//                   [--micro-batches 2] [--rounds 7] [--libs kernel,blas,...] [--check]
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <libxsmm.h>
#include <omp.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "model/small_gemm.h"

namespace {

// Row-major products with the row strides of small_gemm.h: C = op(A) op(B) (+ C).
struct Gemm {
  virtual ~Gemm() = default;
  // C[m, n] = A[m, k] B[k, n]
  virtual void mm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                  int64_t ldb, float* C, int64_t ldc) = 0;
  // C[m, n] = A[m, k] B[n, k]^T
  virtual void mm_bt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float* C, int64_t ldc) = 0;
  // W[k, n] = sum over micro-batches of a^T g
  virtual void wgrad(const std::vector<sw::RowPair<float>>& pairs, int64_t k, int64_t n, float* W,
                     int64_t ldw) = 0;
  // Products that took a general fallback instead of the library's small-matrix path.
  virtual std::vector<std::string> fallbacks() const { return {}; }
};

struct Switch : Gemm {
  explicit Switch(sw::SmallGemmBackend b) : backend(b) {}
  sw::SmallGemmBackend backend;
  void mm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc) override {
    sw::rows_mm<float>(m, n, k, A, lda, B, ldb, nullptr, C, ldc);
  }
  void mm_bt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc) override {
    sw::rows_mm_bt<float>(m, n, k, A, lda, B, ldb, C, ldc);
  }
  void wgrad(const std::vector<sw::RowPair<float>>& pairs, int64_t k, int64_t n, float* W,
             int64_t ldw) override {
    sw::weight_grad<float>(pairs, k, n, W, ldw, nullptr, false);
  }
};

// LIBXSMM is column-major: a row-major C = A B is the column-major C^T = B^T A^T, so every
// call swaps its operands and dimensions.
struct Xsmm : Gemm {
  Xsmm() { libxsmm_init(); }
  ~Xsmm() override { libxsmm_finalize(); }
  // Which forms found no JIT kernel at some call: [A B, A B^T, a^T g] in row-major terms.
  static inline std::atomic<bool> fell_back[3] = {false, false, false};
  std::vector<std::string> fallbacks() const override {
    std::vector<std::string> out;
    const char* names[] = {"A B", "A B^T", "a^T g"};
    for (int i = 0; i < 3; ++i)
      if (fell_back[i]) out.push_back(names[i]);
    return out;
  }
  static libxsmm_smmfunction dispatch(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                                      int64_t ldc, int flags, bool accumulate) {
    const libxsmm_blasint M = m, N = n, K = k, la = lda, lb = ldb, lc = ldc;
    const float alpha = 1, beta = accumulate ? 1 : 0;
    const int f = flags | (accumulate ? 0 : LIBXSMM_GEMM_FLAG_BETA_0);
    const int prefetch = LIBXSMM_PREFETCH_NONE;
    return libxsmm_smmdispatch(M, N, K, &la, &lb, &lc, &alpha, &beta, &f, &prefetch);
  }
  // Column-major C[m, n] = op(A) op(B) (+ C): the JIT kernel when there is one, else
  // LIBXSMM's general GEMM.
  static void cm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    const int flags =
        (ta == 'T' ? LIBXSMM_GEMM_FLAG_TRANS_A : 0) | (tb == 'T' ? LIBXSMM_GEMM_FLAG_TRANS_B : 0);
    if (auto f = dispatch(m, n, k, lda, ldb, ldc, flags, accumulate)) return f(A, B, C);
    fell_back[ta == 'T' ? 1 : tb == 'T' ? 2 : 0] = true;
    const libxsmm_blasint M = m, N = n, K = k, la = lda, lb = ldb, lc = ldc;
    const float alpha = 1, beta = accumulate ? 1 : 0;
    libxsmm_sgemm(&ta, &tb, &M, &N, &K, &alpha, A, &la, B, &lb, &beta, C, &lc);
  }
  void mm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc) override {
    cm('N', 'N', n, m, k, B, ldb, A, lda, C, ldc, false);
  }
  void mm_bt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc) override {
    cm('T', 'N', n, m, k, B, ldb, A, lda, C, ldc, false);
  }
  void wgrad(const std::vector<sw::RowPair<float>>& pairs, int64_t k, int64_t n, float* W,
             int64_t ldw) override {
    for (size_t i = 0; i < pairs.size(); ++i)
      cm('N', 'T', n, k, pairs[i].rows, pairs[i].g, pairs[i].ldg, pairs[i].a, pairs[i].lda, W, ldw,
         i > 0);
  }
};

struct DnnlGemm : Gemm {
  static void call(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (dnnl_sgemm(ta, tb, m, n, k, 1.0f, A, lda, B, ldb, beta, C, ldc) != dnnl_success)
      throw std::runtime_error("dnnl_sgemm failed");
  }
  void mm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc) override {
    call('N', 'N', m, n, k, A, lda, B, ldb, 0, C, ldc);
  }
  void mm_bt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc) override {
    call('N', 'T', m, n, k, A, lda, B, ldb, 0, C, ldc);
  }
  void wgrad(const std::vector<sw::RowPair<float>>& pairs, int64_t k, int64_t n, float* W,
             int64_t ldw) override {
    for (size_t i = 0; i < pairs.size(); ++i)
      call('T', 'N', k, n, pairs[i].rows, pairs[i].a, pairs[i].lda, pairs[i].g, pairs[i].ldg,
           i > 0 ? 1.0f : 0.0f, W, ldw);
  }
};

// oneDNN's matmul primitive: built once per shape, transposition and thread (a stream is
// used by one thread at a time), then executed on the caller's memory.
struct DnnlMatmul : Gemm {
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, bool>;
  struct PerThread {
    dnnl::stream stream;
    std::map<Key, dnnl::matmul> prims;
  };
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::vector<std::unique_ptr<PerThread>> threads;
  DnnlMatmul() {
    for (int t = 0; t < omp_get_max_threads(); ++t)
      threads.push_back(std::make_unique<PerThread>(PerThread{dnnl::stream(engine), {}}));
  }
  void call(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
            const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
    using dnnl::memory;
    const memory::desc a({m, k}, memory::data_type::f32,
                         ta ? memory::dims{1, lda} : memory::dims{lda, 1});
    const memory::desc b({k, n}, memory::data_type::f32,
                         tb ? memory::dims{1, ldb} : memory::dims{ldb, 1});
    const memory::desc c({m, n}, memory::data_type::f32, memory::dims{ldc, 1});
    PerThread& t = *threads[omp_get_thread_num()];
    const Key key{m, n, k, lda, ldb, ldc, ta, tb, accumulate};
    auto it = t.prims.find(key);
    if (it == t.prims.end()) {
      dnnl::primitive_attr attr;
      if (accumulate) {
        dnnl::post_ops ops;
        ops.append_sum(1.0f);
        attr.set_post_ops(ops);
      }
      it = t.prims
               .emplace(key, dnnl::matmul(dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c),
                                                                       attr, engine)))
               .first;
    }
    memory am(a, engine, const_cast<float*>(A)), bm(b, engine, const_cast<float*>(B)),
        cm(c, engine, C);
    it->second.execute(t.stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    t.stream.wait();
  }
  void mm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc) override {
    call(false, false, m, n, k, A, lda, B, ldb, false, C, ldc);
  }
  void mm_bt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc) override {
    call(false, true, m, n, k, A, lda, B, ldb, false, C, ldc);
  }
  void wgrad(const std::vector<sw::RowPair<float>>& pairs, int64_t k, int64_t n, float* W,
             int64_t ldw) override {
    for (size_t i = 0; i < pairs.size(); ++i)
      call(true, false, k, n, pairs[i].rows, pairs[i].a, pairs[i].lda, pairs[i].g, pairs[i].ldg,
           i > 0, W, ldw);
  }
};

struct Shape {
  int64_t E, rows, D, F, micro;
};

// One MoE layer's expert tensors: inputs and upstream gradients per micro-batch, weights, and
// the products' outputs.
struct Layer {
  Shape s;
  std::vector<float> x, gy, w_in, w_out;  // x, gy: [micro, E, rows, D]
  std::vector<float> h, y, gh, gx;        // h, gh: [micro, E, rows, F]; y, gx: like x
  std::vector<float> gw_in, gw_out;       // [E, D, F], [E, F, D]
  explicit Layer(const Shape& sh, uint64_t seed) : s(sh) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n01(0, 1);
    auto fill = [&](std::vector<float>& v, size_t size, float scale) {
      v.resize(size);
      for (auto& e : v)
        e = scale * n01(rng);
    };
    const size_t xs = s.micro * s.E * s.rows * s.D, hs = s.micro * s.E * s.rows * s.F;
    fill(x, xs, 1);
    fill(gy, xs, 1);
    fill(w_in, s.E * s.D * s.F, 1 / std::sqrt(float(s.D)));
    fill(w_out, s.E * s.F * s.D, 1 / std::sqrt(float(s.F)));
    h.assign(hs, 0);
    gh.assign(hs, 0);
    y.assign(xs, 0);
    gx.assign(xs, 0);
    gw_in.assign(s.E * s.D * s.F, 0);
    gw_out.assign(s.E * s.F * s.D, 0);
  }
  const float* Win(int64_t e) const { return &w_in[e * s.D * s.F]; }
  const float* Wout(int64_t e) const { return &w_out[e * s.F * s.D]; }
  const float* X(int64_t mb, int64_t e) const { return &x[((mb * s.E) + e) * s.rows * s.D]; }
  const float* GY(int64_t mb, int64_t e) const { return &gy[((mb * s.E) + e) * s.rows * s.D]; }
  float* H(int64_t mb, int64_t e) { return &h[((mb * s.E) + e) * s.rows * s.F]; }
  float* GH(int64_t mb, int64_t e) { return &gh[((mb * s.E) + e) * s.rows * s.F]; }
  float* Y(int64_t mb, int64_t e) { return &y[((mb * s.E) + e) * s.rows * s.D]; }
  float* GX(int64_t mb, int64_t e) { return &gx[((mb * s.E) + e) * s.rows * s.D]; }
};

// The three phases of one step, each timed alone (ms); the experts in parallel.
struct Times {
  double forward = 0, input_grad = 0, weight_grad = 0;
};

// An exception may not leave an OpenMP region: the first one is kept and thrown after it.
template <typename F>
double timed_experts(int64_t E, F&& body) {
  const auto t0 = std::chrono::steady_clock::now();
  std::exception_ptr error;
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < E; ++e) {
    try {
      body(e);
    } catch (...) {
#pragma omp critical
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

Times run_pass(Gemm& g, Layer& L) {
  const auto& s = L.s;
  Times t;
  t.forward = timed_experts(s.E, [&](int64_t e) {
    for (int64_t mb = 0; mb < s.micro; ++mb) {
      g.mm(s.rows, s.F, s.D, L.X(mb, e), s.D, L.Win(e), s.F, L.H(mb, e), s.F);
      g.mm(s.rows, s.D, s.F, L.H(mb, e), s.F, L.Wout(e), s.D, L.Y(mb, e), s.D);
    }
  });
  t.input_grad = timed_experts(s.E, [&](int64_t e) {
    for (int64_t mb = 0; mb < s.micro; ++mb) {
      g.mm_bt(s.rows, s.F, s.D, L.GY(mb, e), s.D, L.Wout(e), s.D, L.GH(mb, e), s.F);
      g.mm_bt(s.rows, s.D, s.F, L.GH(mb, e), s.F, L.Win(e), s.F, L.GX(mb, e), s.D);
    }
  });
  t.weight_grad = timed_experts(s.E, [&](int64_t e) {
    std::vector<sw::RowPair<float>> in, out;
    for (int64_t mb = 0; mb < s.micro; ++mb) {
      in.push_back({L.X(mb, e), L.GH(mb, e), s.rows, s.D, s.F});
      out.push_back({L.H(mb, e), L.GY(mb, e), s.rows, s.F, s.D});
    }
    g.wgrad(in, s.D, s.F, &L.gw_in[e * s.D * s.F], s.F);
    g.wgrad(out, s.F, s.D, &L.gw_out[e * s.F * s.D], s.D);
  });
  return t;
}

// The largest difference between two results, relative to the largest magnitude of the first.
double rel_diff(const std::vector<float>& ref, const std::vector<float>& v) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num = std::max(num, double(std::fabs(ref[i] - v[i])));
    den = std::max(den, double(std::fabs(ref[i])));
  }
  return den > 0 ? num / den : num;
}

// The same pass in double precision, with plain loops (for --check at small shapes).
std::vector<std::vector<float>> reference(const Layer& L) {
  const auto& s = L.s;
  std::vector<float> h(L.h.size()), y(L.y.size()), gh(L.gh.size()), gx(L.gx.size());
  std::vector<float> gwi(L.gw_in.size()), gwo(L.gw_out.size());
  auto mm = [](int64_t m, int64_t n, int64_t k, auto a, auto b, float* c) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t p = 0; p < k; ++p)
          acc += double(a(i, p)) * b(p, j);
        c[i * n + j] = float(acc);
      }
  };
  const int64_t R = s.rows, D = s.D, F = s.F;
  for (int64_t e = 0; e < s.E; ++e) {
    const float* wi = L.Win(e);
    const float* wo = L.Wout(e);
    for (int64_t mb = 0; mb < s.micro; ++mb) {
      const int64_t xo = ((mb * s.E) + e) * R * D, ho = ((mb * s.E) + e) * R * F;
      const float* X = &L.x[xo];
      const float* GY = &L.gy[xo];
      mm(
          R, F, D, [&](int64_t i, int64_t p) { return X[i * D + p]; },
          [&](int64_t p, int64_t j) { return wi[p * F + j]; }, &h[ho]);
      const float* H = &h[ho];
      mm(
          R, D, F, [&](int64_t i, int64_t p) { return H[i * F + p]; },
          [&](int64_t p, int64_t j) { return wo[p * D + j]; }, &y[xo]);
      mm(
          R, F, D, [&](int64_t i, int64_t p) { return GY[i * D + p]; },
          [&](int64_t p, int64_t j) { return wo[j * D + p]; }, &gh[ho]);
      const float* GH = &gh[ho];
      mm(
          R, D, F, [&](int64_t i, int64_t p) { return GH[i * F + p]; },
          [&](int64_t p, int64_t j) { return wi[j * F + p]; }, &gx[xo]);
    }
    auto wg = [&](int64_t k, int64_t n, auto a, auto g, float* W) {
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double acc = 0;
          for (int64_t mb = 0; mb < s.micro; ++mb)
            for (int64_t r = 0; r < R; ++r)
              acc += double(a(mb, r, i)) * g(mb, r, j);
          W[i * n + j] = float(acc);
        }
    };
    auto row = [&](const std::vector<float>& v, int64_t w) {
      return [&v, w, e, &s, R](int64_t mb, int64_t r, int64_t c) {
        return v[(((mb * s.E) + e) * R + r) * w + c];
      };
    };
    wg(D, F, row(L.x, D), row(gh, F), &gwi[e * D * F]);
    wg(F, D, row(h, F), row(L.gy, D), &gwo[e * F * D]);
  }
  return {h, y, gh, gx, gwi, gwo};
}

std::vector<std::vector<float>> outputs(const Layer& L) {
  return {L.h, L.y, L.gh, L.gx, L.gw_in, L.gw_out};
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out(1);
  for (char c : s) {
    if (c == sep)
      out.emplace_back();
    else
      out.back() += c;
  }
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::unique_ptr<Gemm> make(const std::string& name) {
  if (name == "kernel") return std::make_unique<Switch>(sw::SmallGemmBackend::Kernel);
  if (name == "blas") return std::make_unique<Switch>(sw::SmallGemmBackend::Blas);
  if (name == "libxsmm") return std::make_unique<Xsmm>();
  if (name == "dnnl") return std::make_unique<DnnlGemm>();
  if (name == "dnnl-matmul") return std::make_unique<DnnlMatmul>();
  throw CLI::ValidationError(fmt::format(
      "--libs: unknown library '{}' (accepted: kernel, blas, libxsmm, dnnl, dnnl-matmul)", name));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"The grouped expert operation's products, timed with small-matrix libraries"};
  Shape s{64, 8, 128, 512, 2};
  int rounds = 7;
  bool check = false;
  std::string libs = "kernel,blas,libxsmm,dnnl,dnnl-matmul";
  app.add_option("--experts", s.E, "experts (each with its own weights)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--rows", s.rows, "rows each expert sees per micro-batch")
      ->check(CLI::Range(1, 65536));
  app.add_option("--d-model", s.D, "model width")->check(CLI::Range(1, 65536));
  app.add_option("--d-ff", s.F, "expert hidden width")->check(CLI::Range(1, 65536));
  app.add_option("--micro-batches", s.micro, "micro-batches per step")->check(CLI::Range(1, 64));
  app.add_option("--rounds", rounds, "timed rounds (median reported); the libraries take turns")
      ->check(CLI::Range(1, 1000));
  app.add_option("--libs", libs, "comma-separated: kernel, blas, libxsmm, dnnl, dnnl-matmul");
  app.add_flag("--check", check, "also compare every library with a double-precision reference");
  CLI11_PARSE(app, argc, argv);
  sw::set_small_gemm_backend(sw::SmallGemmBackend::Kernel);
  if (sw::small_gemm_name().rfind("kernel", 0) != 0)
    fmt::print("note: this CPU has no AVX-512; `kernel` computes with the BLAS\n");

  try {
    std::vector<std::string> names = split(libs, ',');
    std::vector<std::unique_ptr<Gemm>> gemms;
    for (const auto& n : names)
      gemms.push_back(make(n));
    Layer L(s, 1234);
    std::vector<std::vector<Times>> times(names.size());
    std::vector<std::vector<std::vector<float>>> results(names.size());
    for (int r = 0; r < rounds + 1; ++r) {  // round 0 warms up (JIT, primitives, pages)
      for (size_t i = 0; i < gemms.size(); ++i) {
        sw::set_small_gemm_backend(names[i] == "blas" ? sw::SmallGemmBackend::Blas
                                                      : sw::SmallGemmBackend::Kernel);
        const Times t = run_pass(*gemms[i], L);
        if (r == 0)
          results[i] = outputs(L);
        else
          times[i].push_back(t);
      }
    }
    sw::set_small_gemm_backend(sw::SmallGemmBackend::Kernel);

    const double weight_mb = 2.0 * s.E * s.D * s.F * 4 / 1e6;
    fmt::print(
        "{} experts of {} x {}, {} rows each per micro-batch, {} micro-batches, {} threads; "
        "weights {:.1f} MB; median of {} rounds (ms)\n",
        s.E, s.D, s.F, s.rows, s.micro, omp_get_max_threads(), weight_mb, rounds);
    fmt::print("{:<12} {:>9} {:>10} {:>11} {:>9} {:>9} {:>10}  {}\n", "library", "forward",
               "input-grad", "weight-grad", "total", "x first", "max diff", "fallbacks");
    const auto ref = check ? reference(L) : std::vector<std::vector<float>>{};
    double kernel_total = 0;
    bool ok = true;
    for (size_t i = 0; i < gemms.size(); ++i) {
      std::vector<double> f, ig, wg, tot;
      for (const auto& t : times[i]) {
        f.push_back(t.forward);
        ig.push_back(t.input_grad);
        wg.push_back(t.weight_grad);
        tot.push_back(t.forward + t.input_grad + t.weight_grad);
      }
      const double total = median(tot);
      if (i == 0) kernel_total = total;
      const auto& base = check ? ref : results[0];
      double diff = 0;
      for (size_t o = 0; o < base.size(); ++o)
        diff = std::max(diff, rel_diff(base[o], results[i][o]));
      // float sums of up to max(D, F, micro * rows) products, relative to the largest entry
      const double tol = 1e-4;
      if (diff > tol) ok = false;
      fmt::print("{:<12} {:>9.2f} {:>10.2f} {:>11.2f} {:>9.2f} {:>8.2f}x {:>10.1e}  {}{}\n",
                 names[i], median(f), median(ig), median(wg), total, total / kernel_total, diff,
                 gemms[i]->fallbacks().empty()
                     ? "-"
                     : fmt::format("{}", fmt::join(gemms[i]->fallbacks(), ", ")),
                 diff > tol ? "  MISMATCH" : "");
    }
    fmt::print("max diff: largest difference from {} relative to its largest entry\n",
               check ? "a double-precision reference" : "the first library's results");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "small-gemm-libs: {}\n", e.what());
    return 2;
  }
}
