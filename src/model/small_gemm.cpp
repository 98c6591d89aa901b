#include "model/small_gemm.h"

#include <immintrin.h>

#include <array>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/blas.h"

// oneDNN's row-major GEMM: LibTorch links oneDNN, so its library is always loaded; declared
// here so that building needs no oneDNN headers (dnnl_status_t is an enum, 0 on success).
// And the three OpenMP calls the backend needs, the same in every OpenMP runtime (declared
// so that a build without -fopenmp, the fuzz target's, needs no omp.h either).
extern "C" {
int omp_in_parallel(void);
int omp_get_max_threads(void);
void omp_set_num_threads(int);
}
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                          const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                          float* C, int64_t ldc);

namespace sw {

namespace {

std::atomic<SmallGemmBackend> g_backend{SmallGemmBackend::Dnnl};

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

bool use_kernel() {
  return g_backend.load(std::memory_order_relaxed) == SmallGemmBackend::Kernel && cpu_has_avx512();
}

bool use_dnnl() {
  return g_backend.load(std::memory_order_relaxed) == SmallGemmBackend::Dnnl;
}

// ---- The AVX-512 kernels (float, 16 lanes). Register tiles are compile-time sized; the
// last vector of a row is loaded and stored under a mask, so any width works.

#define SW_AVX512 __attribute__((target("avx512f")))

SW_AVX512 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

SW_AVX512 inline __m512 load(const float* p, bool masked, __mmask16 m) {
  return masked ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}

SW_AVX512 inline void store(float* p, __m512 v, bool masked, __mmask16 m) {
  if (masked)
    _mm512_mask_storeu_ps(p, m, v);
  else
    _mm512_storeu_ps(p, v);
}

// C[MR, 16 NV] = A[MR, k] B[k, 16 NV] + bias: B's rows stream through once, each of its
// vectors meeting every row of A while in registers.
template <int MR, int NV>
SW_AVX512 void mm_tile(int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
                       const float* bias, float* C, int64_t ldc, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512 b0 = bias ? load(bias + 16 * v, v == NV - 1, last) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
      acc[i][v] = b0;
  }
  for (int64_t p = 0; p < k; ++p) {
    __m512 b[NV];
    const float* Bp = B + p * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = load(Bp + 16 * v, v == NV - 1, last);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      store(C + i * ldc + 16 * v, acc[i][v], v == NV - 1, last);
}

// GCC 12's _mm512_reduce_add_ps reads an undefined vector on purpose (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"

// C[MR, NR] = A[MR, k] B[NR, k]^T: dot products along k, 16 lanes at a time, each summed
// across its lanes at the end.
template <int MR, int NR>
SW_AVX512 void mm_bt_tile(int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
                          float* C, int64_t ldc) {
  __m512 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j)
      acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; p += 16) {
    const bool masked = k - p < 16;
    const __mmask16 m = lanes(k - p);
    __m512 a[MR], b[NR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
      a[i] = load(A + i * lda + p, masked, m);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j)
      b[j] = load(B + j * ldb + p, masked, m);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm512_fmadd_ps(a[i], b[j], acc[i][j]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j)
      C[i * ldc + j] = _mm512_reduce_add_ps(acc[i][j]);
}

#pragma GCC diagnostic pop

// W[KR, 16 NV] (=|+=) sum over the pairs' rows of a_i[KR]^T g_i[16 NV]: the gradient rows
// stay in cache while W is written once.
template <int KR, int NV>
SW_AVX512 void wg_tile(const std::vector<RowPair<float>>& pairs, int64_t p0, int64_t j0, float* W,
                       int64_t ldw, __mmask16 last, bool accumulate) {
  __m512 acc[KR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < KR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = _mm512_setzero_ps();
  for (const RowPair<float>& s : pairs) {
    for (int64_t i = 0; i < s.rows; ++i) {
      const float* g = s.g + i * s.ldg + j0;
      const float* a = s.a + i * s.lda + p0;
      __m512 gv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        gv[v] = load(g + 16 * v, v == NV - 1, last);
#pragma GCC unroll 4
      for (int r = 0; r < KR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          acc[r][v] = _mm512_fmadd_ps(av, gv[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < KR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* w = W + r * ldw + 16 * v;
      const bool masked = v == NV - 1;
      store(w, accumulate ? _mm512_add_ps(load(w, masked, last), acc[r][v]) : acc[r][v], masked,
            last);
    }
}

// b[n] (=|+=) the sum of the pairs' g rows, in pair and row order.
SW_AVX512 void bias_grad(const std::vector<RowPair<float>>& pairs, int64_t n, float* b,
                         bool accumulate) {
  for (int64_t j = 0; j < n; j += 16) {
    const bool masked = n - j < 16;
    const __mmask16 m = lanes(n - j);
    __m512 acc = _mm512_setzero_ps();
    for (const RowPair<float>& s : pairs)
      for (int64_t i = 0; i < s.rows; ++i)
        acc = _mm512_add_ps(acc, load(s.g + i * s.ldg + j, masked, m));
    store(b + j, accumulate ? _mm512_add_ps(load(b + j, masked, m), acc) : acc, masked, m);
  }
}

// Tile tables: [rows - 1][vectors or columns - 1].
constexpr int kMR = 6, kNV = 4;  // rows_mm: 6 rows x 64 columns (24 accumulators)
constexpr int kBM = 4, kBN = 4;  // rows_mm_bt: 4 x 4 dot products
constexpr int kKR = 4;           // weight_grad: 4 rows of W x 64 columns
// rows_mm_bt: below this many terms per dot product, summing each dot's 16 lanes costs more
// than the products; B is transposed into a buffer and the rows_mm kernel runs instead.
constexpr int64_t kShortDot = 64;

using MmTile = void (*)(int64_t, const float*, int64_t, const float*, int64_t, const float*, float*,
                        int64_t, __mmask16);
using MmBtTile = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t);
using WgTile = void (*)(const std::vector<RowPair<float>>&, int64_t, int64_t, float*, int64_t,
                        __mmask16, bool);

template <int R>
constexpr std::array<MmTile, kNV> mm_row() {
  return {mm_tile<R, 1>, mm_tile<R, 2>, mm_tile<R, 3>, mm_tile<R, 4>};
}
template <int R>
constexpr std::array<MmBtTile, kBN> mm_bt_row() {
  return {mm_bt_tile<R, 1>, mm_bt_tile<R, 2>, mm_bt_tile<R, 3>, mm_bt_tile<R, 4>};
}
template <int R>
constexpr std::array<WgTile, kNV> wg_row() {
  return {wg_tile<R, 1>, wg_tile<R, 2>, wg_tile<R, 3>, wg_tile<R, 4>};
}

constexpr std::array<std::array<MmTile, kNV>, kMR> kMmTiles = {
    mm_row<1>(), mm_row<2>(), mm_row<3>(), mm_row<4>(), mm_row<5>(), mm_row<6>()};
constexpr std::array<std::array<MmBtTile, kBN>, kBM> kMmBtTiles = {mm_bt_row<1>(), mm_bt_row<2>(),
                                                                   mm_bt_row<3>(), mm_bt_row<4>()};
constexpr std::array<std::array<WgTile, kNV>, kKR> kWgTiles = {wg_row<1>(), wg_row<2>(),
                                                               wg_row<3>(), wg_row<4>()};

// The number of 16-lane vectors covering columns [j, n), at most kNV, and the last one's
// mask.
SW_AVX512 inline std::pair<int, __mmask16> vectors_from(int64_t j, int64_t n) {
  const int64_t left = n - j;
  const int nv = static_cast<int>(std::min<int64_t>(kNV, (left + 15) / 16));
  return {nv, lanes(left - 16 * (nv - 1))};
}

SW_AVX512 void kernel_mm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                         const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc) {
  for (int64_t j = 0; j < n; j += 16 * kNV) {
    const auto [nv, last] = vectors_from(j, n);
    for (int64_t i = 0; i < m; i += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, m - i));
      kMmTiles[mr - 1][nv - 1](k, A + i * lda, lda, B + j, ldb, bias ? bias + j : nullptr,
                               C + i * ldc + j, ldc, last);
    }
  }
}

SW_AVX512 void kernel_mm_bt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                            const float* B, int64_t ldb, float* C, int64_t ldc) {
  if (k < kShortDot) {  // short dot products: B transposed once, then the row kernel
    thread_local std::vector<float> bt;
    bt.resize(static_cast<size_t>(k * n));
    for (int64_t j = 0; j < n; ++j)
      for (int64_t p = 0; p < k; ++p)
        bt[static_cast<size_t>(p * n + j)] = B[j * ldb + p];
    return kernel_mm(m, n, k, A, lda, bt.data(), n, nullptr, C, ldc);
  }
  for (int64_t j = 0; j < n; j += kBN) {  // B's rows stay in cache while A's rows pass
    const int nr = static_cast<int>(std::min<int64_t>(kBN, n - j));
    for (int64_t i = 0; i < m; i += kBM) {
      const int mr = static_cast<int>(std::min<int64_t>(kBM, m - i));
      kMmBtTiles[mr - 1][nr - 1](k, A + i * lda, lda, B + j * ldb, ldb, C + i * ldc + j, ldc);
    }
  }
}

SW_AVX512 void kernel_weight_grad(const std::vector<RowPair<float>>& pairs, int64_t k, int64_t n,
                                  float* W, int64_t ldw, float* b, bool accumulate) {
  for (int64_t p = 0; p < k; p += kKR) {
    const int kr = static_cast<int>(std::min<int64_t>(kKR, k - p));
    for (int64_t j = 0; j < n; j += 16 * kNV) {
      const auto [nv, last] = vectors_from(j, n);
      kWgTiles[kr - 1][nv - 1](pairs, p, j, W + p * ldw + j, ldw, last, accumulate);
    }
  }
  if (b) bias_grad(pairs, n, b, accumulate);
}

// ---- Every product runs on the calling thread. oneDNN and the BLAS split a product over
// the threads they may use outside a parallel region, and a split can change the order of
// a sum (OpenBLAS's does at 256 x 512 x 128: tested); held to one thread there, as they are
// inside one, the bits never depend on the thread count.

class OneThread {
 public:
  OneThread() : saved_(omp_in_parallel() ? 0 : omp_get_max_threads()) {
    if (saved_ > 1) omp_set_num_threads(1);
  }
  ~OneThread() {
    if (saved_ > 1) omp_set_num_threads(saved_);
  }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;

 private:
  int saved_;
};

void dnnl_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (dnnl_sgemm(ta, tb, m, n, k, 1.0f, A, lda, B, ldb, beta, C, ldc) != 0)
    throw std::runtime_error("oneDNN's sgemm failed for a " + std::to_string(m) + " x " +
                             std::to_string(n) + " x " + std::to_string(k) + " product");
}

void dnnl_mm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
             int64_t ldb, const float* bias, float* C, int64_t ldc) {
  if (bias || k == 0)  // oneDNN refuses an empty sum (a leading dimension of 0)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        C[i * ldc + j] = bias ? bias[j] : 0.0f;
  if (k == 0) return;
  dnnl_gemm('N', 'N', m, n, k, A, lda, B, ldb, bias ? 1.0f : 0.0f, C, ldc);
}

// b[n] = the sum of the pairs' g rows, in pair and row order (the same order, hence the same
// bits, as bias_grad).
template <typename T>
void bias_sum_into(const std::vector<RowPair<T>>& pairs, int64_t n, T* b) {
  for (int64_t j = 0; j < n; ++j)
    b[j] = T(0);
  for (const RowPair<T>& s : pairs)
    for (int64_t i = 0; i < s.rows; ++i)
      for (int64_t j = 0; j < n; ++j)
        b[j] += s.g[i * s.ldg + j];
}

// The weight gradient from `into` (which overwrites W and b with the pairs' sums); with
// accumulate, those sums computed apart and then added, as the header promises.
template <typename T, typename Into>
void weight_grad_by(const std::vector<RowPair<T>>& pairs, int64_t k, int64_t n, T* W, int64_t ldw,
                    T* b, bool accumulate, const Into& into) {
  if (!accumulate) return into(pairs, k, n, W, ldw, b);
  std::vector<T> w_sum(static_cast<size_t>(k * n)), b_sum(static_cast<size_t>(n));
  into(pairs, k, n, w_sum.data(), n, b ? b_sum.data() : nullptr);
  for (int64_t p = 0; p < k; ++p)
    for (int64_t j = 0; j < n; ++j)
      W[p * ldw + j] += w_sum[static_cast<size_t>(p * n + j)];
  if (b)
    for (int64_t j = 0; j < n; ++j)
      b[j] += b_sum[static_cast<size_t>(j)];
}

// Sums into W (overwriting), pair after pair, and b.
void dnnl_weight_grad_into(const std::vector<RowPair<float>>& pairs, int64_t k, int64_t n, float* W,
                           int64_t ldw, float* b) {
  bool first = true;
  for (const RowPair<float>& s : pairs) {
    if (s.rows == 0 || k == 0) continue;
    dnnl_gemm('T', 'N', k, n, s.rows, s.a, s.lda, s.g, s.ldg, first ? 0.0f : 1.0f, W, ldw);
    first = false;
  }
  if (first)
    for (int64_t p = 0; p < k; ++p)
      for (int64_t j = 0; j < n; ++j)
        W[p * ldw + j] = 0;
  if (b) bias_sum_into(pairs, n, b);
}

// ---- The BLAS backend.

template <typename T>
void blas_mm(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             const T* bias, T* C, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      C[i * ldc + j] = bias ? bias[j] : T(0);
  gemm_rm<T>(false, false, m, n, k, T(1), A, lda, B, ldb, T(1), C, ldc);
}

// Sums into W (overwriting), pair after pair, and b.
template <typename T>
void blas_weight_grad_into(const std::vector<RowPair<T>>& pairs, int64_t k, int64_t n, T* W,
                           int64_t ldw, T* b) {
  for (int64_t p = 0; p < k; ++p)
    for (int64_t j = 0; j < n; ++j)
      W[p * ldw + j] = T(0);
  for (const RowPair<T>& s : pairs)
    if (s.rows > 0 && k > 0)
      gemm_rm<T>(true, false, k, n, s.rows, T(1), s.a, s.lda, s.g, s.ldg, T(1), W, ldw);
  if (b) bias_sum_into(pairs, n, b);
}

template <typename T>
void blas_weight_grad(const std::vector<RowPair<T>>& pairs, int64_t k, int64_t n, T* W, int64_t ldw,
                      T* b, bool accumulate) {
  weight_grad_by(pairs, k, n, W, ldw, b, accumulate, blas_weight_grad_into<T>);
}

}  // namespace

SmallGemmBackend small_gemm_backend() {
  return g_backend.load(std::memory_order_relaxed);
}

void set_small_gemm_backend(SmallGemmBackend b) {
  g_backend.store(b, std::memory_order_relaxed);
}

std::string small_gemm_name() {
  if (small_gemm_backend() == SmallGemmBackend::Off) return "off";
  if (use_dnnl()) return "dnnl (oneDNN)";
  return use_kernel() ? "kernel (AVX-512)" : "blas";
}

template <>
void rows_mm<float>(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                    int64_t ldb, const float* bias, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const OneThread one;
  if (use_kernel()) return kernel_mm(m, n, k, A, lda, B, ldb, bias, C, ldc);
  if (use_dnnl()) return dnnl_mm(m, n, k, A, lda, B, ldb, bias, C, ldc);
  blas_mm(m, n, k, A, lda, B, ldb, bias, C, ldc);
}

template <>
void rows_mm<double>(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda, const double* B,
                     int64_t ldb, const double* bias, double* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const OneThread one;
  blas_mm(m, n, k, A, lda, B, ldb, bias, C, ldc);
}

template <>
void rows_mm_bt<float>(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                       int64_t ldb, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const OneThread one;
  if (use_kernel()) return kernel_mm_bt(m, n, k, A, lda, B, ldb, C, ldc);
  if (use_dnnl()) {
    if (k > 0) return dnnl_gemm('N', 'T', m, n, k, A, lda, B, ldb, 0.0f, C, ldc);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        C[i * ldc + j] = 0.0f;
    return;
  }
  gemm_rm<float>(false, true, m, n, k, 1.0f, A, lda, B, ldb, 0.0f, C, ldc);
}

template <>
void rows_mm_bt<double>(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda,
                        const double* B, int64_t ldb, double* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const OneThread one;
  gemm_rm<double>(false, true, m, n, k, 1.0, A, lda, B, ldb, 0.0, C, ldc);
}

template <>
void weight_grad<float>(const std::vector<RowPair<float>>& pairs, int64_t k, int64_t n, float* W,
                        int64_t ldw, float* b, bool accumulate) {
  if (n == 0) return;
  const OneThread one;
  if (use_kernel()) return kernel_weight_grad(pairs, k, n, W, ldw, b, accumulate);
  if (use_dnnl()) return weight_grad_by(pairs, k, n, W, ldw, b, accumulate, dnnl_weight_grad_into);
  blas_weight_grad(pairs, k, n, W, ldw, b, accumulate);
}

template <>
void weight_grad<double>(const std::vector<RowPair<double>>& pairs, int64_t k, int64_t n, double* W,
                         int64_t ldw, double* b, bool accumulate) {
  if (n == 0) return;
  const OneThread one;
  blas_weight_grad(pairs, k, n, W, ldw, b, accumulate);
}

}  // namespace sw
