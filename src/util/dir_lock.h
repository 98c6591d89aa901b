// One writer per directory: a process that writes a run directory (switch-train) or a sweep
// directory (switch-sweep) holds an exclusive flock(2) on the file `.lock` inside it for as
// long as it lives. A second writer is refused at once with a message naming the holder.
// The kernel drops the lock when the holder's last descriptor closes, however it ends
// (SIGKILL included), so a stale lock file never blocks anyone. Readers take no lock.
#pragma once

#include <string>

namespace sw {

class DirLock {
 public:
  DirLock() = default;
  DirLock(DirLock&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  DirLock& operator=(DirLock&& o) noexcept;
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;
  ~DirLock();

  // Locks the existing directory `dir` and records this process in `dir`/.lock (PID, host,
  // start time, command line). Throws sw::Error when another process holds it (naming
  // that process, `what` — "run directory", "sweep directory" — and `hint`, what to do),
  // or when the lock file cannot be created (a read-only folder, say).
  static DirLock acquire(const std::string& dir, const std::string& what, const std::string& hint);

  bool held() const { return fd_ >= 0; }

 private:
  explicit DirLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

}  // namespace sw
