// Micro-batches overlapped under expert parallelism (dist.overlap): one thread per
// micro-batch, kept for the whole run, whose MoE layers exchange rows on a process group of
// their own split from the rank's Comm. While one micro-batch waits in an all-to-all for the
// other ranks, another computes, and the cores a waiting rank leaves idle take the work of
// the others.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <ATen/ThreadLocalState.h>

#include "distributed/comm.h"

namespace sw {

class Lanes {
 public:
  // n lanes split from `comm` (collective: every rank calls it with the same n) and their
  // threads. Throws sw::Error when a process group cannot be opened.
  Lanes(Comm& comm, int64_t n);
  ~Lanes();  // ends the threads
  Lanes(const Lanes&) = delete;
  Lanes& operator=(const Lanes&) = delete;

  int64_t size() const { return static_cast<int64_t>(comms_.size()); }

  // Runs f(i) on lane i's thread for every lane at once, with the calling thread's
  // thread-local state (grad mode, ...); every lane counts as a working thread (CommWorker)
  // until its f returns. Returns when all have ended; then rethrows the first failure, by
  // lane.
  void run(const std::function<void(int64_t)>& f);

 private:
  void loop(size_t i);
  void stop();  // ends and joins the threads

  std::vector<std::shared_ptr<Comm>> comms_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable start_, done_;
  const std::function<void(int64_t)>* job_ = nullptr;
  std::optional<at::ThreadLocalState> state_;
  std::vector<std::optional<CommWorker>> working_;
  std::vector<std::exception_ptr> failed_;
  uint64_t generation_ = 0;  // bumped by each run
  size_t pending_ = 0;       // lanes still running the current job
  bool stop_ = false;
};

}  // namespace sw
