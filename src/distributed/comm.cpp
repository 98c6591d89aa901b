#include "distributed/comm.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>

#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "util/error.h"

namespace sw {

namespace {

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
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(env.master_port);
    so.isServer = env.rank == 0;
    so.numWorkers = static_cast<std::size_t>(env.world_size);
    so.waitWorkers = true;
    so.timeout = timeout;
    c->store_ = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(env.master_addr));
    c->pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(c->store_, static_cast<int>(env.rank),
                                                         static_cast<int>(env.world_size), opts);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (const auto* ce = dynamic_cast<const c10::Error*>(&e)) msg = ce->what_without_backtrace();
    throw Error(fmt::format("rank {} of {}: cannot join the process group at {}:{}: {}", env.rank,
                            env.world_size, env.master_addr, env.master_port, first_line(msg)));
  }
  return c;
}

Comm::~Comm() = default;

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
  ++stats_.all_to_all_calls;
  stats_.all_to_all_bytes += rows_out * row_bytes;
  guard("all-to-all", [&] { pg_->alltoall_base(out, src, o, i)->wait(); });
}

void Comm::all_reduce_sum(torch::Tensor& t) {
  std::vector<at::Tensor> v{t};
  ++stats_.all_reduce_calls;
  stats_.all_reduce_bytes += t.numel() * static_cast<int64_t>(t.element_size());
  guard("all-reduce", [&] { pg_->allreduce(v)->wait(); });
}

void Comm::barrier() {
  guard("barrier", [&] { pg_->barrier()->wait(); });
}

template <typename F>
void Comm::guard(const char* what, F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    f();
    stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } catch (const std::exception& e) {
    // Gloo reports a dead peer as a closed connection and a stuck one as a timeout; either
    // way this rank cannot go on, and the message says which collective failed.
    std::string msg = e.what();
    if (const auto* ce = dynamic_cast<const c10::Error*>(&e)) msg = ce->what_without_backtrace();
    throw Error(fmt::format("rank {} of {}: {} failed (another rank died or stalled?): {}", rank_,
                            size_, what, first_line(msg)));
  }
}

}  // namespace sw
