// Keeps freed tensor memory in the process instead of returning it to the kernel. glibc
// serves blocks over 32 MiB (expert weights and their gradients at E = 128 are 33.5 MB each)
// with fresh mmap()s, so every step would page-fault and zero them again; measured at
// E = 128 that doubled the time of an MoE layer's forward + backward.
#pragma once

namespace sw {

void keep_freed_memory();

}  // namespace sw
