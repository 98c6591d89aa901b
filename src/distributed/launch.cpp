#include "distributed/launch.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>

#include "distributed/comm.h"
#include "util/error.h"
#include "util/process.h"

extern char** environ;

namespace sw {

namespace {

volatile sig_atomic_t g_signal = 0;
void on_signal(int sig) {
  g_signal = sig;
}

struct Rank {
  pid_t pid = -1;
  int fd[2] = {-1, -1};  // stdout, stderr pipes
  std::string pending[2];
  bool running = false;
  int code = 0;
};

// Writes the complete lines of `buf` to `out`, each prefixed; keeps the unfinished tail.
void flush_lines(std::string& buf, std::FILE* out, const std::string& prefix, bool all) {
  size_t start = 0, nl;
  while ((nl = buf.find('\n', start)) != std::string::npos) {
    std::fprintf(out, "%s%.*s\n", prefix.c_str(), static_cast<int>(nl - start), buf.data() + start);
    start = nl + 1;
  }
  buf.erase(0, start);
  if (all && !buf.empty()) {
    std::fprintf(out, "%s%s\n", prefix.c_str(), buf.c_str());
    buf.clear();
  }
  std::fflush(out);
}

std::vector<std::string> rank_environment(int rank, int nproc, int64_t port) {
  static const char* kOurs[] = {
      "RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=", "MASTER_ADDR=", "MASTER_PORT="};
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    bool ours = false;
    for (const char* k : kOurs)
      ours = ours || std::strncmp(*e, k, std::strlen(k)) == 0;
    if (!ours) env.emplace_back(*e);
  }
  env.push_back(fmt::format("RANK={}", rank));
  env.push_back(fmt::format("WORLD_SIZE={}", nproc));
  env.push_back(fmt::format("LOCAL_RANK={}", rank));
  env.push_back(fmt::format("LOCAL_WORLD_SIZE={}", nproc));
  env.push_back("MASTER_ADDR=127.0.0.1");
  env.push_back(fmt::format("MASTER_PORT={}", port));
  return env;
}

// Starts rank r of opt.nproc as a child process with its output on two pipes.
Rank start_rank(const LaunchOptions& opt, int r, int64_t port, pid_t launcher) {
  // Everything the child needs is built before fork: it only calls exec-safe functions.
  std::vector<std::string> argv_s = {opt.exe};
  argv_s.insert(argv_s.end(), opt.args.begin(), opt.args.end());
  std::vector<std::string> env_s = rank_environment(r, opt.nproc, port);
  std::vector<char*> argv = c_strings(argv_s), envp = c_strings(env_s);
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0)
    throw Error(fmt::format("--nproc: cannot create pipes: {}", std::strerror(errno)));
  const pid_t pid = fork();
  if (pid < 0) throw Error(fmt::format("--nproc: cannot fork: {}", std::strerror(errno)));
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != launcher) _exit(1);
    dup2(out[1], STDOUT_FILENO);
    dup2(err[1], STDERR_FILENO);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGINT, &dfl, nullptr);
    sigaction(SIGTERM, &dfl, nullptr);
    execve(argv[0], argv.data(), envp.data());
    const char msg[] = "switch-train: --nproc: cannot start the rank's process\n";
    (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(127);
  }
  close(out[1]);
  close(err[1]);
  Rank k;
  k.pid = pid;
  k.fd[0] = out[0];
  k.fd[1] = err[0];
  k.running = true;
  return k;
}

// Copies what the ranks wrote, line by line and prefixed with "[rank r] ", to this
// process's stdout and stderr, waiting up to 100 ms; returns false when every pipe is closed.
bool relay_output(std::vector<Rank>& ranks) {
  std::vector<pollfd> fds;
  std::vector<std::pair<size_t, int>> owner;
  for (size_t r = 0; r < ranks.size(); ++r)
    for (int s = 0; s < 2; ++s)
      if (ranks[r].fd[s] >= 0) {
        fds.push_back({ranks[r].fd[s], POLLIN, 0});
        owner.emplace_back(r, s);
      }
  if (fds.empty()) return false;
  const int n = poll(fds.data(), fds.size(), 100);
  for (size_t i = 0; n > 0 && i < fds.size(); ++i) {
    if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    auto [r, s] = owner[i];
    Rank& k = ranks[r];
    char buf[4096];
    const ssize_t got = read(k.fd[s], buf, sizeof buf);
    const std::string prefix = fmt::format("[rank {}] ", r);
    std::FILE* dst = s == 0 ? stdout : stderr;
    if (got > 0) {
      k.pending[s].append(buf, static_cast<size_t>(got));
      flush_lines(k.pending[s], dst, prefix, false);
    } else if (got == 0 || errno != EINTR) {
      flush_lines(k.pending[s], dst, prefix, true);
      close(k.fd[s]);
      k.fd[s] = -1;
    }
  }
  return true;
}

void signal_running(std::vector<Rank>& ranks, int sig) {
  for (auto& k : ranks)
    if (k.running) kill(k.pid, sig);
}

}  // namespace

int launch_local(const LaunchOptions& opt) {
  const PortReservation reservation;  // held until every rank has ended
  const int64_t port = reservation.port();
  const pid_t launcher = getpid();
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  std::vector<Rank> ranks;
  for (int r = 0; r < opt.nproc; ++r)
    ranks.push_back(start_rank(opt, r, port, launcher));

  using Clock = std::chrono::steady_clock;
  int first_failure = -1;
  bool forwarded = false;
  Clock::time_point kill_at = Clock::time_point::max();
  for (;;) {
    if (g_signal != 0) {
      const int sig = g_signal;
      g_signal = 0;
      forwarded = true;
      signal_running(ranks, sig);
    }
    bool any_running = false;
    for (auto& k : ranks)
      any_running = any_running || k.running;
    if (!relay_output(ranks)) {
      if (!any_running) break;
      usleep(100 * 1000);
    }
    for (size_t r = 0; r < ranks.size(); ++r) {
      Rank& k = ranks[r];
      int status = 0;
      if (!k.running || waitpid(k.pid, &status, WNOHANG) != k.pid) continue;
      k.running = false;
      k.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      if (k.code == 0 || first_failure >= 0) continue;
      first_failure = static_cast<int>(r);
      if (forwarded) continue;
      std::fprintf(stderr, "switch-train: rank %zu %s; stopping the other ranks\n", r,
                   WIFEXITED(status)
                       ? fmt::format("exited with code {}", k.code).c_str()
                       : fmt::format("was killed by signal {}", WTERMSIG(status)).c_str());
      std::fflush(stderr);
      signal_running(ranks, SIGTERM);
      kill_at = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(opt.grace_s * 1e3));
    }
    if (Clock::now() >= kill_at) {
      signal_running(ranks, SIGKILL);
      kill_at = Clock::time_point::max();
    }
  }
  return first_failure < 0 ? 0 : ranks[static_cast<size_t>(first_failure)].code;
}

}  // namespace sw
