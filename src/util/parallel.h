// at::parallel_for with the caller's thread-local state (grad mode above all) on every
// thread. LibTorch's own loop runs its chunks on OpenMP threads that keep their own state:
// inside an autograd function's forward, say, grad mode is off on the calling thread and on
// elsewhere, and an out= matmul there refuses inputs that require grad.
#pragma once

#include <cstdint>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

namespace sw {

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain_size, [&](int64_t lo, int64_t hi) {
    at::ThreadLocalStateGuard guard(state);
    f(lo, hi);
  });
}

}  // namespace sw
