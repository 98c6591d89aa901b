// Matrix products on raw strided memory through the BLAS LibTorch itself links, for many
// small products where a LibTorch call per product would cost more than the product.
#pragma once

#include <cstdint>

namespace sw {

// Row-major C = alpha * op(A) op(B) + beta * C, C being M x N, op(A) M x K and op(B) K x N;
// lda, ldb, ldc are the row strides, trans_a / trans_b transpose A / B. Meant to be called
// from inside at::parallel_for, where the BLAS runs on the calling thread; float and double.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
             int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace sw
