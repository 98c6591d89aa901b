// Peak-memory accounting for benchmarks: a CPU allocator that wraps LibTorch's and counts
// the bytes of every tensor storage it hands out, so a benchmark can report the peak bytes
// allocated during one forward and backward.
#pragma once

#include <cstdint>

namespace sw {

class MemoryTracker {
 public:
  // Installs the tracking allocator as LibTorch's CPU allocator (once; later calls no-op).
  static void install();
  static int64_t current_bytes();
  static int64_t peak_bytes();
  static void reset_peak();  // peak := current
};

}  // namespace sw
