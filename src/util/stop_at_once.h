// While a StopAtOnce lives, SIGINT and SIGTERM end the process at once with their default
// action (exit status 130 / 143): for waits that would notice a stop request only much
// later, such as a rank blocked in the rendezvous. A request already made acts at once.
#pragma once

#include <signal.h>

#include <atomic>
#include <csignal>

namespace sw {

class StopAtOnce {
 public:
  explicit StopAtOnce(const std::atomic<int>* stop) {
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGINT, &dfl, &old_int_);
    sigaction(SIGTERM, &dfl, &old_term_);
    if (stop != nullptr && stop->load() != 0) std::raise(stop->load());
  }
  ~StopAtOnce() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  StopAtOnce(const StopAtOnce&) = delete;
  StopAtOnce& operator=(const StopAtOnce&) = delete;

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

}  // namespace sw
