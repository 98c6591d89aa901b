#include "bench/memory.h"

#include <atomic>
#include <cstring>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/version.h>

namespace sw {
namespace {

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};

// Each block carries its size in a 64-byte header in front of the data (keeping LibTorch's
// 64-byte alignment), so that data == context as raw_allocate requires.
constexpr size_t kHeader = 64;
c10::DeleterFnPtr g_base_free = nullptr;

void release(void* data) {
  char* block = static_cast<char*>(data) - kHeader;
  g_current -= static_cast<int64_t>(*reinterpret_cast<size_t*>(block));
  g_base_free(block);
}

class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr inner = base_->allocate(n + kHeader);
    const c10::Device device = inner.device();
    char* block = static_cast<char*>(inner.release_context());
    *reinterpret_cast<size_t*>(block) = n;
    const int64_t now = (g_current += static_cast<int64_t>(n));
    int64_t peak = g_peak.load();
    while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
    }
    return c10::DataPtr(block + kHeader, block + kHeader, &release, device);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
#endif

 private:
  c10::Allocator* base_;
};

}  // namespace

void MemoryTracker::install() {
  static TrackingAllocator* tracker = [] {
    c10::Allocator* base = c10::GetCPUAllocator();
    g_base_free = base->raw_deleter();
    TORCH_CHECK(g_base_free != nullptr, "the CPU allocator has no raw deleter to wrap");
    auto* t = new TrackingAllocator(base);
    c10::SetCPUAllocator(t, /*priority=*/100);
    return t;
  }();
  (void)tracker;
}

int64_t MemoryTracker::current_bytes() {
  return g_current.load();
}
int64_t MemoryTracker::peak_bytes() {
  return g_peak.load();
}
void MemoryTracker::reset_peak() {
  g_peak.store(g_current.load());
}

}  // namespace sw
