#include "util/malloc_tuning.h"

#include <malloc.h>

namespace sw {

void keep_freed_memory() {
#ifdef M_MMAP_MAX
  mallopt(M_MMAP_MAX, 0);              // large blocks come from the heap too
  mallopt(M_TRIM_THRESHOLD, 1 << 30);  // and the heap's top is not handed back
#endif
}

}  // namespace sw
