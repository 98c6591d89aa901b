// What switch-board's tests share: child processes whose output is read line by line,
// HTTP requests, a tiny trained run, and snapshots of a directory.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <map>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>

#include "helpers.h"

namespace test {

// A child process in its own process group (so that what it starts ends with it), its
// stdout and stderr read through one pipe.
class Child {
 public:
  explicit Child(const std::vector<std::string>& argv) {
    int fds[2];
    REQUIRE(pipe2(fds, O_CLOEXEC) == 0);
    // Signals stay blocked across the fork until the child has put back the default
    // handlers: a signal sent at once must not reach the test framework's own handlers
    // in the copy of this process that the child is until it execs.
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &before);
    pid_ = fork();
    if (pid_ == 0) {
      for (int sig = 1; sig < NSIG; ++sig)
        signal(sig, SIG_DFL);
      sigprocmask(SIG_SETMASK, &before, nullptr);
      setpgid(0, 0);
      dup2(fds[1], 1);
      dup2(fds[1], 2);
      std::vector<char*> args;
      for (const auto& a : argv)
        args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
    pthread_sigmask(SIG_SETMASK, &before, nullptr);
    REQUIRE(pid_ >= 0);
    close(fds[1]);
    out_ = fds[0];
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (pid_ > 0) {
      kill(-pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) close(out_);
  }

  // Reads output until a line holding `needle` has come and returns that line; empty when
  // the child ended or `timeout_s` passed first (the output so far is in output()).
  std::string wait_line(const std::string& needle, double timeout_s = 120) {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(int(timeout_s * 1000));
    for (;;) {
      size_t start = 0;
      for (size_t nl; (nl = all_.find('\n', start)) != std::string::npos; start = nl + 1) {
        if (nl < seen_) continue;
        const std::string line = all_.substr(start, nl - start);
        if (line.find(needle) != std::string::npos) {
          seen_ = nl + 1;
          return line;
        }
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0 || !read_some(static_cast<int>(left.count()))) return "";
    }
  }

  // Sends `sig` to the child alone and waits for it; returns its exit code (128 + signal
  // when a signal ended it), or -1 when it had not ended within `timeout_s`.
  int stop(int sig = SIGTERM, double timeout_s = 30) {
    kill(pid_, sig);
    return wait(timeout_s);
  }
  int wait(double timeout_s = 30) {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(int(timeout_s * 1000));
    int status = 0;
    while (std::chrono::steady_clock::now() < deadline) {
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        while (read_some(0)) {
        }
        kill(-pid_, SIGKILL);  // what it started, if anything is left
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      read_some(50);
    }
    return -1;
  }
  const std::string& output() const { return all_; }
  pid_t pid() const { return pid_; }

 private:
  bool read_some(int timeout_ms) {
    pollfd p{out_, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    char buf[4096];
    const ssize_t n = read(out_, buf, sizeof buf);
    if (n <= 0) return false;
    all_.append(buf, static_cast<size_t>(n));
    return true;
  }

  pid_t pid_ = -1;
  int out_ = -1;
  std::string all_;
  size_t seen_ = 0;
};

// switch-board on `paths` (port 0); returns the URL it printed ("" if it printed none).
inline std::string start_board(Child& board) {
  const std::string line = board.wait_line("http://", 60);
  std::smatch m;
  if (!std::regex_search(line, m, std::regex(R"((http://[^ ]+/))"))) return "";
  return m[1];
}

// host:port of a URL http://host:port/.
inline std::pair<std::string, int> host_port(const std::string& url) {
  std::smatch m;
  REQUIRE(std::regex_search(url, m, std::regex(R"(http://([^/]+):(\d+)/)")));
  return {m[1], std::stoi(m[2])};
}

// Waits until `pred` holds, `timeout_s` at most; returns whether it did.
inline bool eventually(const std::function<bool()>& pred, double timeout_s = 60) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(int(timeout_s * 1000));
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return pred();
}

// A tiny run trained into `dir` (configs/tiny.json: 60 steps, evaluations at 30 and 60).
inline void train_tiny(const std::string& dir, const std::string& extra = "") {
  const CmdResult r =
      run(std::string(SWITCH_TRAIN_BIN) + " --config " + quote(source_path("configs/tiny.json")) +
          " --set data.path=" + quote(data_path()) + " --out " + quote(dir) + " -q " + extra);
  INFO(r.output);
  REQUIRE(r.rc == 0);
}

// The first line of a file.
inline std::string read_file_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// Every file under `dir`: its path, size, modification time and content.
inline std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    struct stat st {};
    lstat(e.path().c_str(), &st);
    std::string what = std::to_string(st.st_size) + " " + std::to_string(st.st_mtim.tv_sec) + "." +
                       std::to_string(st.st_mtim.tv_nsec) + " " + std::to_string(st.st_mode);
    if (e.is_regular_file())
      what += " " + std::to_string(std::hash<std::string>{}(read_file(e.path())));
    out[fs::relative(e.path(), dir).string()] = what;
  }
  return out;
}

}  // namespace test
