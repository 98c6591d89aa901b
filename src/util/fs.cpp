#include "util/fs.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <new>

#include <fmt/format.h>

#include "util/error.h"

namespace sw {
namespace fs = std::filesystem;

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(fmt::format("cannot open '{}' to flush it: {}", path, strerror(errno)));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) throw Error(fmt::format("cannot flush '{}' to disk: {}", path, strerror(err)));
}

// Creates `tmp` for writing, exclusively and without following a link: a stale one (left by
// a crash) or anything planted under that name, a symbolic link included, is removed first
// (the link itself, never what it points to).
static int create_exclusive(const std::string& tmp) {
  const int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
  int fd = ::open(tmp.c_str(), flags, 0644);
  if (fd < 0 && errno == EEXIST) {
    struct stat st {};
    if (::lstat(tmp.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
      throw Error(fmt::format("cannot write '{}': a directory is in the way", tmp));
    if (::unlink(tmp.c_str()) != 0 && errno != ENOENT)
      throw Error(fmt::format("cannot replace '{}': {}", tmp, strerror(errno)));
    fd = ::open(tmp.c_str(), flags, 0644);
  }
  if (fd < 0) throw Error(fmt::format("cannot write '{}': {}", tmp, strerror(errno)));
  return fd;
}

static void write_all(const std::string& path, const char* data, size_t n) {
  const std::string tmp = path + ".tmp";
  int fd = create_exclusive(tmp);
  size_t done = 0;
  while (done < n) {
    ssize_t w = ::write(fd, data + done, n - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw Error(fmt::format("cannot write '{}': {}", tmp, strerror(err)));
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw Error(fmt::format("cannot flush '{}' to disk: {}", tmp, strerror(err)));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw Error(fmt::format("cannot rename '{}' to '{}': {}", tmp, path, strerror(err)));
  }
  fs::path parent = fs::path(path).parent_path();
  fsync_path(parent.empty() ? "." : parent.string());
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  write_all(path, bytes.data(), bytes.size());
}

void write_file_atomic(const std::string& path, const std::vector<char>& bytes) {
  write_all(path, bytes.data(), bytes.size());
}

std::string read_file(const std::string& path, const std::string& what, size_t max_bytes) {
  // Not even opened unless it is a regular file: opening some devices does something.
  struct stat pre {};
  if (::stat(path.c_str(), &pre) == 0 && !S_ISREG(pre.st_mode))
    throw Error(fmt::format("{} '{}' is not a regular file{}", what, path,
                            S_ISDIR(pre.st_mode) ? " (a directory)" : ""));
  // O_NONBLOCK: should it have become a FIFO since, opening must not wait for a writer; it
  // is refused just below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) throw Error(fmt::format("cannot open {} '{}': {}", what, path, strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(fmt::format("cannot read {} '{}': {}", what, path, strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(fmt::format("{} '{}' is not a regular file{}", what, path,
                            S_ISDIR(st.st_mode) ? " (a directory)" : ""));
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    ::close(fd);
    throw Error(fmt::format("{} '{}' is {} bytes, more than the {} accepted", what, path,
                            static_cast<uint64_t>(st.st_size), max_bytes));
  }
  std::string out;
  try {
    out.reserve(
        static_cast<size_t>(std::min<uint64_t>(static_cast<uint64_t>(st.st_size), 1u << 26)));
  } catch (const std::bad_alloc&) {
    ::close(fd);
    throw Error(fmt::format("{} '{}': not enough memory to read it", what, path));
  }
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      throw Error(fmt::format("cannot read {} '{}': {}", what, path, strerror(err)));
    }
    if (n == 0) break;
    try {
      out.append(buf, static_cast<size_t>(n));
    } catch (const std::bad_alloc&) {
      ::close(fd);
      throw Error(fmt::format("{} '{}': not enough memory to read it", what, path));
    }
    if (out.size() > max_bytes) {  // grew while being read
      ::close(fd);
      throw Error(fmt::format("{} '{}' is more than the {} bytes accepted", what, path, max_bytes));
    }
  }
  ::close(fd);
  return out;
}

}  // namespace sw
