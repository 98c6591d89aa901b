#include "distributed/comm.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "util/error.h"

namespace sw {

namespace {

using Clock = std::chrono::steady_clock;

// A Gloo process group of `size` ranks meeting through `store`; `threads` of its own, or
// Gloo's default for 0.
c10::intrusive_ptr<c10d::ProcessGroupGloo> make_gloo(const c10::intrusive_ptr<c10d::Store>& store,
                                                     int64_t rank, int64_t size,
                                                     const std::string& addr,
                                                     std::chrono::milliseconds timeout,
                                                     int threads) {
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(addr));
  if (threads > 0) opts->threads = threads;
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, static_cast<int>(rank),
                                                     static_cast<int>(size), opts);
}

std::string message_of(const std::exception& e) {
  if (const auto* ce = dynamic_cast<const c10::Error*>(&e)) return ce->what_without_backtrace();
  return e.what();
}

thread_local Comm* t_lane = nullptr;

std::optional<int64_t> env_int(const char* name, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (!v) return std::nullopt;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (*v == '\0' || *end != '\0' || x < lo || x > hi)
    throw Error(fmt::format("environment variable {}='{}': expected an integer in [{}, {}]", name,
                            v, lo, hi));
  return x;
}

}  // namespace

// The account of a Comm and its lanes: what their collectives moved, and which threads
// were in one, to tell the time they hid behind computation from the time they cost.
struct Comm::Ledger {
  std::mutex mu;
  CommStats stats;
  int workers = 0;    // live CommWorkers
  int in_flight = 0;  // collectives started and not yet completed
  int waiting = 0;    // threads blocked in a collective
  Clock::time_point since = Clock::now();

  // Books the time since the last change under the state that held meanwhile; then `apply`.
  template <typename F>
  void change(F&& apply) {
    const std::lock_guard<std::mutex> lock(mu);
    const auto now = Clock::now();
    if (in_flight > 0) {
      const double dt = std::chrono::duration<double>(now - since).count();
      stats.seconds += dt;
      if (waiting >= std::max(workers, 1)) stats.exposed_seconds += dt;
    }
    since = now;
    apply();
  }
};

CommStats operator-(const CommStats& a, const CommStats& b) {
  CommStats d;
  d.all_to_all_calls = a.all_to_all_calls - b.all_to_all_calls;
  d.all_to_all_bytes = a.all_to_all_bytes - b.all_to_all_bytes;
  d.all_reduce_calls = a.all_reduce_calls - b.all_reduce_calls;
  d.all_reduce_bytes = a.all_reduce_bytes - b.all_reduce_bytes;
  d.seconds = a.seconds - b.seconds;
  d.exposed_seconds = a.exposed_seconds - b.exposed_seconds;
  return d;
}

std::optional<DistEnv> dist_env_from_environment() {
  auto world = env_int("WORLD_SIZE", 1, 1 << 16);
  if (!world) return std::nullopt;
  DistEnv env;
  env.world_size = *world;
  env.rank = env_int("RANK", 0, env.world_size - 1).value_or(0);
  if (!std::getenv("RANK") && env.world_size > 1)
    throw Error("environment variable RANK is unset but WORLD_SIZE > 1");
  if (const char* addr = std::getenv("MASTER_ADDR")) env.master_addr = addr;
  env.master_port = env_int("MASTER_PORT", 1, 65535).value_or(env.master_port);
  return env;
}

PortReservation::PortReservation() {
  fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) throw Error("cannot open a socket to find a free port");
  const int yes = 1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes) != 0 ||
      ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd_);
    throw Error("cannot bind a socket on 127.0.0.1 to find a free port");
  }
  port_ = ntohs(addr.sin_port);
}

PortReservation::~PortReservation() {
  if (fd_ >= 0) ::close(fd_);
}

std::shared_ptr<Comm> Comm::connect(const DistEnv& env, std::chrono::milliseconds timeout) {
  std::shared_ptr<Comm> c(new Comm());
  c->rank_ = env.rank;
  c->size_ = env.world_size;
  c->addr_ = env.master_addr;
  c->timeout_ = timeout;
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(env.master_port);
    so.isServer = env.rank == 0;
    so.numWorkers = static_cast<std::size_t>(env.world_size);
    so.waitWorkers = true;
    so.timeout = timeout;
    c->store_ = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    c->pg_ = make_gloo(c->store_, env.rank, env.world_size, env.master_addr, timeout,
                       /*threads=*/0);
  } catch (const std::exception& e) {
    throw Error(fmt::format("rank {} of {}: cannot join the process group at {}:{}: {}", env.rank,
                            env.world_size, env.master_addr, env.master_port,
                            first_line(message_of(e))));
  }
  return c;
}

Comm::Comm() : ledger_(std::make_shared<Ledger>()) {}
Comm::~Comm() = default;

std::shared_ptr<Comm> Comm::split(const std::string& tag) {
  std::shared_ptr<Comm> c(new Comm());
  c->rank_ = rank_;
  c->size_ = size_;
  c->addr_ = addr_;
  c->timeout_ = timeout_;
  c->spin_ = spin_;
  c->ledger_ = ledger_;
  try {
    c->store_ = c10::make_intrusive<c10d::PrefixStore>(tag, store_);
    c->pg_ = make_gloo(c->store_, rank_, size_, addr_, timeout_, /*threads=*/1);
  } catch (const std::exception& e) {
    throw Error(fmt::format("rank {} of {}: cannot open the process group '{}': {}", rank_, size_,
                            tag, first_line(message_of(e))));
  }
  return c;
}

CommStats Comm::stats() const {
  const std::lock_guard<std::mutex> lock(ledger_->mu);
  return ledger_->stats;
}

void Comm::reset_stats() {
  ledger_->change([&] { ledger_->stats = CommStats{}; });
}

CommWorker::CommWorker(Comm& comm) : ledger_(comm.ledger_) {
  ledger_->change([&] { ++ledger_->workers; });
}

CommWorker::~CommWorker() {
  ledger_->change([&] { --ledger_->workers; });
}

CommLane::CommLane(Comm* lane) : previous_(t_lane) {
  t_lane = lane;
}
CommLane::~CommLane() {
  t_lane = previous_;
}
Comm* CommLane::current() {
  return t_lane;
}

void Comm::all_to_all(torch::Tensor& out, const torch::Tensor& in,
                      const std::vector<int64_t>& out_splits,
                      const std::vector<int64_t>& in_splits) {
  torch::Tensor src = in.contiguous();
  std::vector<int64_t> o = out_splits, i = in_splits;
  const int64_t row_bytes =
      src.size(0) > 0 ? src.numel() / src.size(0) * static_cast<int64_t>(src.element_size()) : 0;
  int64_t rows_out = 0;
  for (size_t p = 0; p < i.size(); ++p)
    if (static_cast<int64_t>(p) != rank_) rows_out += i[p];
  ledger_->change([&] {
    ++ledger_->stats.all_to_all_calls;
    ledger_->stats.all_to_all_bytes += rows_out * row_bytes;
  });
  guard("all-to-all", [&] { finish(pg_->alltoall_base(out, src, o, i)); });
}

void Comm::all_reduce_sum(torch::Tensor& t) {
  std::vector<at::Tensor> v{t};
  ledger_->change([&] {
    ++ledger_->stats.all_reduce_calls;
    ledger_->stats.all_reduce_bytes += t.numel() * static_cast<int64_t>(t.element_size());
  });
  guard("all-reduce", [&] { finish(pg_->allreduce(v)); });
}

void Comm::barrier() {
  guard("barrier", [&] { finish(pg_->barrier()); });
}

template <typename F>
void Comm::guard(const char* what, F&& f) {
  ledger_->change([&] {
    ++ledger_->in_flight;
    ++ledger_->waiting;
  });
  auto done = [&] {
    ledger_->change([&] {
      --ledger_->in_flight;
      --ledger_->waiting;
    });
  };
  try {
    f();
  } catch (const std::exception& e) {
    done();
    throw Error(failure(what, e));
  }
  done();
}

void Comm::finish(const c10::intrusive_ptr<c10d::Work>& work) const {
  // A thread that sleeps on the work is woken by Gloo's when it completes: a wake-up that,
  // on a busy or virtual machine, can take longer than the exchange. Polling first, yielding
  // the core to any thread that wants it, answers at once.
  if (spin_.count() > 0) {
    const auto until = Clock::now() + spin_;
    while (!work->isCompleted() && Clock::now() < until)
      std::this_thread::yield();
  }
  work->wait();
}

std::string Comm::failure(const char* what, const std::exception& e) const {
  // Gloo reports a dead peer as a closed connection and a stuck one as a timeout; either
  // way this rank cannot go on, and the message says which collective failed.
  return fmt::format("rank {} of {}: {} failed (another rank died or stalled?): {}", rank_, size_,
                     what, first_line(message_of(e)));
}

PendingSum::PendingSum(Comm& comm, torch::Tensor& t) : comm_(comm), tensors_{t} {
  Comm::Ledger& l = *comm_.ledger_;
  l.change([&] {
    ++l.stats.all_reduce_calls;
    l.stats.all_reduce_bytes += t.numel() * static_cast<int64_t>(t.element_size());
    ++l.in_flight;
  });
  try {
    work_ = comm_.pg_->allreduce(tensors_);
  } catch (const std::exception& e) {
    l.change([&] { --l.in_flight; });
    throw Error(comm_.failure("all-reduce", e));
  }
  // In flight until it completes (on Gloo's thread, or here if it already has), not until
  // someone waits: what the caller computes meanwhile is not time in a collective.
  work_->getFuture()->addCallback([ledger = comm_.ledger_](c10::ivalue::Future&) {
    ledger->change([&] { --ledger->in_flight; });
  });
}

PendingSum::~PendingSum() {
  try {
    wait();
  } catch (...) {  // the caller is already leaving by another exception
  }
}

void PendingSum::wait() {
  if (!work_) return;
  const c10::intrusive_ptr<c10d::Work> work = std::move(work_);
  Comm::Ledger& l = *comm_.ledger_;
  l.change([&] { ++l.waiting; });
  try {
    comm_.finish(work);
  } catch (const std::exception& e) {
    l.change([&] { --l.waiting; });
    throw Error(comm_.failure("all-reduce", e));
  }
  l.change([&] { --l.waiting; });
}

}  // namespace sw
