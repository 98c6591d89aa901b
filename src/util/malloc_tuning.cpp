#include "util/malloc_tuning.h"

#include <dlfcn.h>
#include <malloc.h>

#include <sys/types.h>
#include <cstddef>
#include <string>

// jemalloc's control interface, present when jemalloc is loaded (LD_PRELOAD; weak: null else).
extern "C" int mallctl(const char* name, void* oldp, size_t* oldlenp, void* newp, size_t newlen)
    __attribute__((weak));

namespace sw {

namespace {

// jemalloc serves malloc: its control interface is there and in the same library as the
// malloc this process calls (not, say, another allocator preloaded in front of it).
bool on_jemalloc() {
  if (mallctl == nullptr) return false;
  Dl_info m{}, c{};
  void* (*const malloc_fn)(size_t) = &malloc;
  return dladdr(reinterpret_cast<void*>(malloc_fn), &m) != 0 &&
         dladdr(reinterpret_cast<void*>(mallctl), &c) != 0 && m.dli_fname && c.dli_fname &&
         std::string(m.dli_fname) == c.dli_fname;
}

}  // namespace

void keep_freed_memory() {
  if (on_jemalloc()) {
    // Never purge: for arenas made from now on, then for every arena made so far.
    ssize_t never = -1;
    for (const char* key : {"arenas.dirty_decay_ms", "arenas.muzzy_decay_ms"})
      mallctl(key, nullptr, nullptr, &never, sizeof never);
    unsigned arenas = 0;
    size_t size = sizeof arenas;
    if (mallctl("arenas.narenas", &arenas, &size, nullptr, 0) != 0) return;
    for (unsigned i = 0; i < arenas; ++i)
      for (const char* decay : {"dirty_decay_ms", "muzzy_decay_ms"}) {
        const std::string key = "arena." + std::to_string(i) + "." + decay;
        mallctl(key.c_str(), nullptr, nullptr, &never, sizeof never);  // unused arenas: fails
      }
    return;
  }
#ifdef M_MMAP_MAX
  mallopt(M_MMAP_MAX, 0);              // large blocks come from the heap too
  mallopt(M_TRIM_THRESHOLD, 1 << 30);  // and the heap's top is not handed back
#endif
}

std::string allocator_name() {
  if (!on_jemalloc()) return "glibc";
  const char* version = nullptr;
  size_t size = sizeof version;
  if (mallctl("version", &version, &size, nullptr, 0) != 0 || !version) return "jemalloc";
  return std::string("jemalloc ") + version;
}

}  // namespace sw
