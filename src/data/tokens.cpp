#include "data/tokens.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "util/error.h"

namespace sw {

int token_width(int64_t vocab_size) {
  return vocab_size <= 256 ? 1 : vocab_size <= 65536 ? 2 : 4;
}

std::string token_dtype(int width) {
  return width == 1 ? "uint8" : width == 2 ? "uint16" : "uint32";
}

int token_width_of(const std::string& dtype) {
  return dtype == "uint8" ? 1 : dtype == "uint16" ? 2 : dtype == "uint32" ? 4 : 0;
}

// The bytes behind a Tokens: a vector, or a mapping undone when the last slice goes.
struct Tokens::Storage {
  std::vector<unsigned char> owned;
  void* mapped = nullptr;
  size_t mapped_bytes = 0;
  ~Storage() {
    if (mapped) ::munmap(mapped, mapped_bytes);
  }
};

Tokens Tokens::from_ids(const std::vector<int64_t>& ids, int width) {
  auto s = std::make_shared<Storage>();
  s->owned.resize(ids.size() * static_cast<size_t>(width));
  unsigned char* p = s->owned.data();
  const int64_t limit = int64_t{1} << (8 * width);
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t id = ids[i];
    if (id < 0 || id >= limit)
      throw Error(
          fmt::format("id {} at position {} does not fit in {}", id, i, token_dtype(width)));
    const uint32_t v = static_cast<uint32_t>(id);
    for (int k = 0; k < width; ++k)
      p[i * static_cast<size_t>(width) + static_cast<size_t>(k)] =
          static_cast<unsigned char>(v >> (8 * k));
  }
  Tokens t;
  t.data_ = s->owned.data();
  t.storage_ = std::move(s);
  t.width_ = width;
  t.n_ = static_cast<int64_t>(ids.size());
  return t;
}

Tokens Tokens::map_file(const std::string& path, int width, int64_t n) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) throw Error(fmt::format("cannot open token file '{}': {}", path, strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(fmt::format("token file '{}' is not a regular file", path));
  }
  const int64_t want = n * width;
  if (st.st_size != want) {
    ::close(fd);
    throw Error(fmt::format("token file '{}' holds {} bytes where {} ids of {} bytes need {}", path,
                            st.st_size, n, width, want));
  }
  auto s = std::make_shared<Storage>();
  if (want > 0) {
    void* p = ::mmap(nullptr, static_cast<size_t>(want), PROT_READ, MAP_SHARED, fd, 0);
    const int err = errno;
    ::close(fd);
    if (p == MAP_FAILED)
      throw Error(fmt::format("cannot map token file '{}': {}", path, strerror(err)));
    s->mapped = p;
    s->mapped_bytes = static_cast<size_t>(want);
  } else {
    ::close(fd);
  }
  Tokens t;
  t.data_ = static_cast<const unsigned char*>(s->mapped);
  t.storage_ = std::move(s);
  t.width_ = width;
  t.n_ = n;
  return t;
}

int64_t Tokens::at(int64_t i) const {
  const unsigned char* p = data_ + i * width_;
  switch (width_) {
    case 1:
      return p[0];
    case 2:
      return p[0] | (p[1] << 8);
    default:
      return static_cast<int64_t>(static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
                                  (static_cast<uint32_t>(p[2]) << 16) |
                                  (static_cast<uint32_t>(p[3]) << 24));
  }
}

Tokens Tokens::slice(int64_t begin, int64_t end) const {
  if (begin < 0 || end < begin || end > n_)
    throw Error(fmt::format("token slice [{}, {}) outside [0, {})", begin, end, n_));
  Tokens t = *this;
  t.data_ = data_ + begin * width_;
  t.n_ = end - begin;
  return t;
}

void Tokens::set_bound(int64_t bound, std::string what) {
  bound_ = bound;
  what_ = std::make_shared<const std::string>(std::move(what));
}

void Tokens::copy_to(int64_t off, int64_t len, int64_t* out) const {
  if (width_ == 1) {
    const unsigned char* p = data_ + off;
    for (int64_t i = 0; i < len; ++i)
      out[i] = p[i];
  } else {
    for (int64_t i = 0; i < len; ++i)
      out[i] = at(off + i);
  }
  if (bound_ > 0)
    for (int64_t i = 0; i < len; ++i)
      if (out[i] >= bound_)
        throw Error(
            fmt::format("{}: id {} at position {} is outside the vocabulary of {} "
                        "characters (a damaged token file: delete it and it is prepared "
                        "again)",
                        what_ ? *what_ : std::string("tokens"), out[i], off + i, bound_));
}

torch::Tensor Tokens::to_int64() const {
  torch::Tensor t = torch::empty({n_}, torch::kInt64);
  copy_to(0, n_, t.data_ptr<int64_t>());
  return t;
}

}  // namespace sw
