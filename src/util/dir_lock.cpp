#include "util/dir_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/json_depth.h"
#include "util/text.h"

namespace sw {
namespace fs = std::filesystem;

namespace {

constexpr const char* kLockFile = ".lock";
constexpr size_t kMaxRecord = 8192;

std::string lock_path(const std::string& dir) {
  return (fs::path(dir) / kLockFile).string();
}

// This process's command line, its arguments separated by spaces (bounded).
std::string command_line() {
  std::string out;
  const int fd = ::open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0 && out.size() < 2048)
    out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  if (out.size() > 2048) out = out.substr(0, 2048) + "...";
  while (!out.empty() && out.back() == '\0')
    out.pop_back();
  for (char& c : out)
    if (c == '\0') c = ' ';
  return out;
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

// The record the holder wrote, as one readable phrase; `fd` is open on the lock file.
std::string describe_holder(int fd) {
  std::string text(kMaxRecord, '\0');
  const ssize_t n = ::pread(fd, text.data(), text.size(), 0);
  text.resize(n > 0 ? static_cast<size_t>(n) : 0);
  try {
    if (json_depth(text) > kMaxJsonDepth) throw std::runtime_error("not a record of ours");
    const nlohmann::json j = nlohmann::json::parse(text);
    return fmt::format("pid {} on host {} since {} (command: {})", j.at("pid").get<int64_t>(),
                       printable(j.at("host").get<std::string>()),
                       printable(j.at("started").get<std::string>()),
                       printable(j.at("command").get<std::string>()));
  } catch (const std::exception&) {
    // The holder has not written its record yet (it is starting), or the file is not ours.
    return "another process (it has not recorded itself yet)";
  }
}

}  // namespace

DirLock& DirLock::operator=(DirLock&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

DirLock::~DirLock() {
  if (fd_ >= 0) ::close(fd_);
}

DirLock DirLock::acquire(const std::string& dir, const std::string& what, const std::string& hint) {
  const std::string path = lock_path(dir);
  // No O_TRUNC: the holder's record stays readable until this process owns the lock.
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0)
    throw Error(fmt::format("cannot lock {} '{}': cannot open '{}': {}", what, dir, path,
                            std::strerror(errno)));
  DirLock lock(fd);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err == EWOULDBLOCK)
      throw Error(fmt::format("{} '{}' is in use by {}; {}", what, dir, describe_holder(fd), hint));
    throw Error(fmt::format("cannot lock {} '{}' ('{}'): {}", what, dir, path, std::strerror(err)));
  }
  const std::string record =
      nlohmann::json{
          {"pid", static_cast<int64_t>(getpid())},
          {"host", host_name()},
          {"started", utc_now()},
          {"command", command_line()},
      }
          .dump() +
      "\n";
  // The record is information for the next writer: the lock itself does not depend on it.
  if (::ftruncate(fd, 0) != 0)
    throw Error(fmt::format("cannot write the lock file '{}': {}", path, std::strerror(errno)));
  const ssize_t n = ::pwrite(fd, record.data(), record.size(), 0);
  if (n != static_cast<ssize_t>(record.size()))
    throw Error(fmt::format("cannot write the lock file '{}': {}", path,
                            n < 0 ? std::strerror(errno) : "short write (disk full?)"));
  return lock;
}

}  // namespace sw
