// Keeps freed tensor memory in the process instead of returning it to the kernel, whatever
// allocator serves malloc.
//
// glibc (what the binaries link) serves blocks over 32 MiB (expert weights and their
// gradients at E = 128 are 33.5 MB each) with fresh mmap()s, page-faulted and zeroed again
// every step (measured at E = 128: twice the time of an MoE layer's forward + backward);
// they are kept on the heap, and the heap's top is not handed back. jemalloc, when put in
// front with LD_PRELOAD (docs/model.md: its heap does not keep growing as glibc's does
// under the changing tensor sizes of a step), is told never to purge freed pages.
#pragma once

#include <string>

namespace sw {

void keep_freed_memory();

// "jemalloc <version>" when jemalloc serves malloc in this process, else "glibc" (also
// under the sanitizers, whose allocator ignores the glibc tuning).
std::string allocator_name();

}  // namespace sw
