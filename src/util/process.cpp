#include "util/process.h"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "util/error.h"

extern char** environ;

namespace sw {

std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (auto& s : v)
    out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

std::string self_exe() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) throw Error("cannot find this program's path (/proc/self/exe)");
  return std::string(buf, static_cast<size_t>(n));
}

std::string ProgramResult::describe() const {
  std::string how = signal != 0
                        ? fmt::format("was killed by signal {} ({})", signal, strsignal(signal))
                        : fmt::format("exited with status {}", exit_code);
  std::string last = err;
  while (!last.empty() && (last.back() == '\n' || last.back() == '\r'))
    last.pop_back();
  const size_t nl = last.rfind('\n');
  if (nl != std::string::npos) last = last.substr(nl + 1);
  return last.empty() ? how : how + ": " + last;
}

namespace {

// Owns the posix_spawn attribute objects and the pipe's ends until they are released.
struct SpawnSetup {
  posix_spawn_file_actions_t actions;
  int pipe_fd[2] = {-1, -1};
  SpawnSetup() { posix_spawn_file_actions_init(&actions); }
  ~SpawnSetup() {
    posix_spawn_file_actions_destroy(&actions);
    for (int fd : pipe_fd)
      if (fd >= 0) ::close(fd);
  }
};

}  // namespace

ProgramResult run_program(const std::vector<std::string>& argv_in, bool quiet) {
  if (argv_in.empty() || argv_in[0].empty()) throw Error("run_program: no program given");
  std::vector<std::string> argv_s = argv_in;
  std::vector<char*> argv = c_strings(argv_s);
  SpawnSetup s;
  if (pipe2(s.pipe_fd, O_CLOEXEC) != 0)
    throw Error(fmt::format("cannot start '{}': cannot create a pipe: {}", argv_in[0],
                            std::strerror(errno)));
  posix_spawn_file_actions_addopen(&s.actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  if (quiet) posix_spawn_file_actions_addopen(&s.actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_adddup2(&s.actions, s.pipe_fd[1], STDERR_FILENO);
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, argv[0], &s.actions, nullptr, argv.data(), environ);
  if (rc != 0) throw Error(fmt::format("cannot start '{}': {}", argv_in[0], std::strerror(rc)));
  ::close(s.pipe_fd[1]);
  s.pipe_fd[1] = -1;

  // Read stderr while the child runs; once it has exited, take what is left without
  // waiting: a process it left behind may hold the pipe open for as long as it likes.
  ProgramResult r;
  constexpr size_t kKeep = 4096;
  const int fd = s.pipe_fd[0];
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  auto drain = [&] {  // reads what is there now; false at end of file
    char buf[4096];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
      if (!quiet) (void)!::write(STDERR_FILENO, buf, static_cast<size_t>(n));
      r.err.append(buf, static_cast<size_t>(n));
      if (r.err.size() > 2 * kKeep) r.err.erase(0, r.err.size() - kKeep);
    }
  };
  int status = 0;
  bool reading = true;
  for (;;) {
    if (reading) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 100) > 0) reading = drain();
    } else {
      ::usleep(100 * 1000);  // stderr closed: only the exit is awaited
    }
    const pid_t w = ::waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR)
      throw Error(fmt::format("cannot wait for '{}': {}", argv_in[0], std::strerror(errno)));
  }
  if (reading) drain();
  if (r.err.size() > kKeep) r.err.erase(0, r.err.size() - kKeep);
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  return r;
}

}  // namespace sw
