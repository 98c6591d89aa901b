#include "train/lanes.h"

#include <fmt/format.h>

namespace sw {

Lanes::Lanes(Comm& comm, int64_t n) {
  const auto count = static_cast<size_t>(n);
  for (size_t i = 0; i < count; ++i)
    comms_.push_back(comm.split(fmt::format("lane{}/", i)));
  working_ = std::vector<std::optional<CommWorker>>(count);
  failed_.resize(count);
  try {
    for (size_t i = 0; i < count; ++i)
      threads_.emplace_back([this, i] { loop(i); });
  } catch (...) {
    stop();  // the threads already started
    throw;
  }
}

Lanes::~Lanes() {
  stop();
}

void Lanes::stop() {
  {
    const std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  start_.notify_all();
  for (std::thread& t : threads_)
    if (t.joinable()) t.join();
}

void Lanes::run(const std::function<void(int64_t)>& f) {
  {
    const std::lock_guard<std::mutex> lock(mu_);
    job_ = &f;
    state_.emplace();  // this thread's
    for (size_t i = 0; i < comms_.size(); ++i) {
      failed_[i] = nullptr;
      working_[i].emplace(*comms_[i]);  // all of them before any collective starts
    }
    pending_ = comms_.size();
    ++generation_;
  }
  start_.notify_all();
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [&] { return pending_ == 0; });
  job_ = nullptr;
  for (const std::exception_ptr& e : failed_)
    if (e) std::rethrow_exception(e);
}

void Lanes::loop(size_t i) {
  const CommLane lane(comms_[i].get());
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    try {
      const at::ThreadLocalStateGuard guard(*state_);
      (*job_)(static_cast<int64_t>(i));
    } catch (...) {
      failed_[i] = std::current_exception();
    }
    working_[i].reset();
    const std::lock_guard<std::mutex> lock(mu_);
    if (--pending_ == 0) done_.notify_all();
  }
}

}  // namespace sw
