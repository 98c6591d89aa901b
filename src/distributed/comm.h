// The process group for expert and data parallelism: ranks rendezvous through a c10d
// TCPStore (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun sets them) and talk
// through PyTorch's own ProcessGroupGloo. Only what the MoE layer needs is exposed.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace c10d {
class Store;
class ProcessGroupGloo;
class Work;
}  // namespace c10d

namespace sw {

struct DistEnv {
  int64_t rank = 0;
  int64_t world_size = 1;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
};

// Reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Returns nullopt when WORLD_SIZE is
// unset; throws sw::Error naming the variable when a value is malformed or out of range.
std::optional<DistEnv> dist_env_from_environment();

// A TCP port on this machine held for a local rendezvous while this object lives, for
// switch-train --nproc and the tests. Its socket stays bound (SO_REUSEADDR, not listening):
// the kernel hands the port to no other request for "any free port" meanwhile — a port
// found free, closed and handed out could be taken by another program before rank 0 listens
// on it — while rank 0's store, which sets SO_REUSEADDR too, can still listen on it.
class PortReservation {
 public:
  PortReservation();  // throws sw::Error when no socket can be bound on 127.0.0.1
  ~PortReservation();
  PortReservation(const PortReservation&) = delete;
  PortReservation& operator=(const PortReservation&) = delete;
  int64_t port() const { return port_; }

 private:
  int fd_ = -1;
  int64_t port_ = 0;
};

// What this rank's collectives (its Comm's and its lanes') moved and cost since the
// counters were last reset.
struct CommStats {
  int64_t all_to_all_calls = 0;
  int64_t all_to_all_bytes = 0;  // sent to other ranks (rows kept on this rank not counted)
  int64_t all_reduce_calls = 0;
  int64_t all_reduce_bytes = 0;  // size of the reduced buffers
  double seconds = 0;            // wall time with a collective in flight, waiting included
  // Of `seconds`, the time no working thread computed beside the collectives (see
  // CommWorker): all of it when one thread does the work, what overlap leaves over.
  double exposed_seconds = 0;
};
CommStats operator-(const CommStats& a, const CommStats& b);

class Comm {
 public:
  // Rendezvous of env.world_size ranks; rank 0 hosts the store. Throws sw::Error on timeout.
  static std::shared_ptr<Comm> connect(const DistEnv& env, std::chrono::milliseconds timeout);
  ~Comm();

  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }

  // Variable-split all-to-all of rows: rank r sends in.slice(0)[in_splits[p] rows] to each
  // p in rank order and receives out_splits[p] rows from each p into `out`.
  void all_to_all(torch::Tensor& out, const torch::Tensor& in,
                  const std::vector<int64_t>& out_splits, const std::vector<int64_t>& in_splits);
  void all_reduce_sum(torch::Tensor& t);
  void barrier();

  // A second process group of the same ranks (collective: every rank calls it with the same
  // tag, which must be new). Its collectives are ordered on their own, so threads can hold
  // one each at once without their exchanges meeting the wrong partner; they are counted
  // in this Comm's stats.
  std::shared_ptr<Comm> split(const std::string& tag);

  // How long a thread polls a collective before it sleeps on it (0: sleeps at once).
  // Copied by split: set it first.
  void set_spin(std::chrono::microseconds spin) { spin_ = spin; }

  CommStats stats() const;
  void reset_stats();

 private:
  friend class CommWorker;
  friend class PendingSum;
  struct Ledger;
  Comm();
  // Runs a collective, turning its failure (a peer died, a timeout) into sw::Error.
  template <typename F>
  void guard(const char* what, F&& f);
  std::string failure(const char* what, const std::exception& e) const;  // sw::Error's text
  void finish(const c10::intrusive_ptr<c10d::Work>& work) const;         // polls, then waits
  int64_t rank_ = 0, size_ = 1;
  std::string addr_;
  std::chrono::milliseconds timeout_{0};
  std::chrono::microseconds spin_{0};
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
  std::shared_ptr<Ledger> ledger_;  // shared with the lanes split from this Comm
};

// A sum over the ranks of `t`, in place, started by the constructor and left to run on the
// process group's threads while the caller computes something else; `t` holds the sum once
// wait() returns. Collective: every rank starts the same sums in the same order. Its time
// counts as exposed only while a thread waits for it. Destroyed without wait(), it waits
// (and drops a failure: the caller is already leaving by an exception).
class PendingSum {
 public:
  PendingSum(Comm& comm, torch::Tensor& t);
  ~PendingSum();
  PendingSum(const PendingSum&) = delete;
  PendingSum& operator=(const PendingSum&) = delete;
  void wait();  // throws sw::Error as Comm::all_reduce_sum does

 private:
  Comm& comm_;
  std::vector<at::Tensor> tensors_;
  c10::intrusive_ptr<c10d::Work> work_;
};

// While it lives, the calling thread is one of the threads doing a step's work beside
// others (micro-batches on their own lanes): time in collectives counts as exposed only
// while every such thread waits in one. Without any, the one thread calling collectives
// computes nothing beside them, so all of their time is exposed.
class CommWorker {
 public:
  explicit CommWorker(Comm& comm);
  ~CommWorker();
  CommWorker(const CommWorker&) = delete;
  CommWorker& operator=(const CommWorker&) = delete;

 private:
  std::shared_ptr<Comm::Ledger> ledger_;
};

// The lane the calling thread's MoE layers exchange rows on instead of their own Comm,
// while it lives (micro-batches overlapping on several threads), else none.
class CommLane {
 public:
  explicit CommLane(Comm* lane);
  ~CommLane();
  CommLane(const CommLane&) = delete;
  CommLane& operator=(const CommLane&) = delete;
  static Comm* current();

 private:
  Comm* previous_;
};

}  // namespace sw
