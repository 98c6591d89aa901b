// Matrix products for the few rows an expert sees at a time (a handful to a few hundred),
// on raw row-major memory. A BLAS made for large matrices packs both operands before it
// multiplies; for 8 rows against a 128 x 512 weight matrix the packing costs more than the
// product. These kernels read each weight once, straight from memory, into register tiles.
//
// Backends (small_gemm_backend), chosen by measurement (tools/small_gemm_libs.cpp, against
// LIBXSMM and oneDNN's matmul primitive as well; docs/model.md): `dnnl`, the default,
// oneDNN's GEMM for float (the oneDNN LibTorch itself links), held to the calling thread;
// `kernel`, hand-written AVX-512 for float where the CPU has it (checked at run time,
// else the BLAS); `blas`, the BLAS LibTorch links (model/blas.h), which is also what
// double gets on every backend; `off`, for comparison: the grouped operation does not use
// these products at all (one LibTorch matmul per expert, gradients per micro-batch). Each
// output element is summed in an order that depends on the shapes only, never on the
// thread that computes it nor on how many threads there are.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sw {

enum class SmallGemmBackend { Kernel, Dnnl, Blas, Off };

// What the products below use: `dnnl` unless set otherwise.
SmallGemmBackend small_gemm_backend();
// For benchmarks and tests; `kernel` on a CPU without AVX-512 computes with the BLAS.
void set_small_gemm_backend(SmallGemmBackend b);
// "dnnl (oneDNN)", "kernel (AVX-512)", "blas" or "off": what float products use now.
std::string small_gemm_name();

// C[m, n] = A[m, k] B[k, n] + bias[n] (bias may be null). Row strides lda, ldb, ldc.
template <typename T>
void rows_mm(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             const T* bias, T* C, int64_t ldc);

// C[m, n] = A[m, k] B[n, k]^T.
template <typename T>
void rows_mm_bt(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
                T* C, int64_t ldc);

// Rows of the two factors of a weight gradient: a[i, :] and g[i, :] for i < rows.
template <typename T>
struct RowPair {
  const T* a;
  const T* g;
  int64_t rows, lda, ldg;
};

// The weight and bias gradients of a linear map from the rows of every pair, in one pass:
// W[k, n] = sum over pairs and rows of a_i^T g_i, b[n] = sum of the g_i (b may be null).
// With accumulate the sums are added to what W and b hold (W + sum, as one would add a
// separately computed gradient); otherwise they overwrite it. No pairs: zeros (or nothing
// added).
template <typename T>
void weight_grad(const std::vector<RowPair<T>>& pairs, int64_t k, int64_t n, T* W, int64_t ldw,
                 T* b, bool accumulate);

// The types they are defined for.
template <>
void rows_mm<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                    const float*, float*, int64_t);
template <>
void rows_mm<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t,
                     const double*, double*, int64_t);
template <>
void rows_mm_bt<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                       float*, int64_t);
template <>
void rows_mm_bt<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t,
                        double*, int64_t);
template <>
void weight_grad<float>(const std::vector<RowPair<float>>&, int64_t, int64_t, float*, int64_t,
                        float*, bool);
template <>
void weight_grad<double>(const std::vector<RowPair<double>>&, int64_t, int64_t, double*, int64_t,
                         double*, bool);

}  // namespace sw
