// Expert parallelism over c10d/Gloo on 127.0.0.1: the seed-interface dispatch against a
// hand-worked example, and W = 2 and 4 ranks (threads of this process, each with its own
// process group) against the single-process grouped computation, outputs and gradients.
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <thread>

#include <doctest/doctest.h>

#include "distributed/comm.h"
#include "helpers.h"
#include "model/dispatch.h"
#include "model/expert_parallel.h"
#include "model/experts.h"
#include "model/switch_ffn.h"
#include "train/lanes.h"

namespace {

double diff(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  return (a - b).abs().max().item<double>();
}

// Runs fn(rank, comm) on W threads joined in one process group.
template <typename Fn>
void on_ranks(int64_t W, const Fn& fn) {
  const sw::PortReservation reservation;
  const int64_t port = reservation.port();
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<size_t>(W));
  for (int64_t r = 0; r < W; ++r)
    threads.emplace_back([&, r] {
      try {
        sw::DistEnv env{r, W, "127.0.0.1", port};
        auto comm = sw::Comm::connect(env, std::chrono::seconds(30));
        fn(r, *comm);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads)
    t.join();
  for (int64_t r = 0; r < W; ++r)
    CHECK_MESSAGE(errors[r].empty(), "rank ", r, ": ", errors[r]);
}

}  // namespace

TEST_CASE("a reserved port cannot be bound by another socket, yet rank 0 listens on it") {
  const sw::PortReservation reservation;
  // Held: another socket cannot bind it (the kernel's "any free port" skips ports held
  // so), where a port found free and closed again could be bound by anyone.
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(reservation.port()));
  CHECK(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0);
  CHECK(errno == EADDRINUSE);
  ::close(fd);
  // And the rendezvous itself listens on it: two ranks meet there.
  std::vector<std::thread> ranks;
  std::vector<std::string> errors(2);
  for (int64_t r = 0; r < 2; ++r)
    ranks.emplace_back([&, r] {
      try {
        auto comm =
            sw::Comm::connect({r, 2, "127.0.0.1", reservation.port()}, std::chrono::seconds(30));
        comm->barrier();
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : ranks)
    t.join();
  CHECK_MESSAGE(errors[0].empty(), errors[0]);
  CHECK_MESSAGE(errors[1].empty(), errors[1]);
}

TEST_CASE("expert_parallel_dispatch: hand-worked, two ranks of two experts") {
  // 4 tokens of width 2 routed to experts 0, 3, 1, 2; rank 1 owns experts 2 and 3.
  torch::Tensor tokens = torch::tensor({1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f}).view({4, 2});
  torch::Tensor routing = torch::tensor({0, 3, 1, 2}, torch::kInt64);
  std::vector<torch::Tensor> w1 = {torch::tensor({1.f, 0.f, 0.f, 1.f}).view({2, 2}),   // expert 2
                                   torch::tensor({0.f, 1.f, 1.f, 0.f}).view({2, 2})};  // expert 3
  torch::Tensor y = sw::expert_parallel_dispatch(tokens, routing, w1, 1, 2);
  // Token 1 -> expert 3 swaps its entries; token 3 -> expert 2 keeps them; the rest are 0.
  torch::Tensor expect = torch::tensor({0.f, 0.f, 4.f, 3.f, 0.f, 0.f, 7.f, 8.f}).view({4, 2});
  CHECK(torch::equal(y, expect));
  // Rank 0 owns experts 0 and 1 (weights 2I and 3I): tokens 0 and 2.
  std::vector<torch::Tensor> w0 = {torch::eye(2) * 2, torch::eye(2) * 3};
  torch::Tensor y0 = sw::expert_parallel_dispatch(tokens, routing, w0, 0, 2);
  CHECK(torch::equal(y0, torch::tensor({2.f, 4.f, 0.f, 0.f, 15.f, 18.f, 0.f, 0.f}).view({4, 2})));
  CHECK(test::error_of([&] { sw::expert_parallel_dispatch(tokens, routing, w0, 2, 2); }) != "");
}

TEST_CASE("the rendezvous reads torchrun's variables and rejects bad ones") {
  ::setenv("WORLD_SIZE", "4", 1);
  ::setenv("RANK", "3", 1);
  ::setenv("MASTER_ADDR", "10.1.2.3", 1);
  ::setenv("MASTER_PORT", "29555", 1);
  std::optional<sw::DistEnv> env = sw::dist_env_from_environment();
  REQUIRE(env);
  CHECK(env->world_size == 4);
  CHECK(env->rank == 3);
  CHECK(env->master_addr == "10.1.2.3");
  CHECK(env->master_port == 29555);
  ::setenv("RANK", "4", 1);
  CHECK(test::contains(test::error_of([] { sw::dist_env_from_environment(); }), "RANK='4'"));
  ::setenv("RANK", "0", 1);
  ::setenv("MASTER_PORT", "http", 1);
  CHECK(test::contains(test::error_of([] { sw::dist_env_from_environment(); }),
                       "MASTER_PORT='http'"));
  for (const char* v : {"WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"})
    ::unsetenv(v);
  CHECK_FALSE(sw::dist_env_from_environment());
}

TEST_CASE("expert-parallel FFN over Gloo equals the single-process grouped FFN") {
  const int64_t D = 6, F = 10, E = 8, T_rank = 12;
  for (int64_t W : {2, 4}) {
    CAPTURE(W);
    const int64_t El = E / W;
    torch::manual_seed(17 + W);
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    torch::Tensor w_in = torch::randn({E, D, F}, opts), b_in = torch::randn({E, F}, opts);
    torch::Tensor w_out = torch::randn({E, F, D}, opts), b_out = torch::randn({E, D}, opts);
    torch::Tensor x = torch::randn({W * T_rank, D}, opts), R = torch::randn({W * T_rank, D}, opts);
    // Expert 5 gets no token at all; the others a random share.
    torch::Tensor expert_T = torch::randint(0, E - 1, {W * T_rank}, torch::kInt64);
    expert_T = expert_T + (expert_T >= 5).to(torch::kInt64);

    // Reference: one process, every token, every expert.
    std::vector<torch::Tensor> ref_params;
    for (const auto& t : {w_in, b_in, w_out, b_out})
      ref_params.push_back(t.clone().requires_grad_());
    torch::Tensor x_ref = x.clone().requires_grad_();
    sw::Dispatch d = sw::make_dispatch(expert_T.unsqueeze(1), torch::ones({W * T_rank, 1}), E, -1,
                                       sw::DropPolicy::Position);
    torch::Tensor y_ND =
        sw::grouped_ffn(x_ref.index_select(0, d.token_N()), ref_params[0], ref_params[1],
                        ref_params[2], ref_params[3], d.offsets, sw::Activation::Gelu);
    torch::Tensor y_ref = torch::zeros_like(x).index_add(0, d.token_N(), y_ND);
    (y_ref * R).sum().backward();

    std::vector<double> worst(static_cast<size_t>(W), 0.0);
    on_ranks(W, [&](int64_t r, sw::Comm& comm) {
      torch::Tensor x_r = x.slice(0, r * T_rank, (r + 1) * T_rank).clone().requires_grad_();
      torch::Tensor e_r = expert_T.slice(0, r * T_rank, (r + 1) * T_rank);
      std::vector<torch::Tensor> p;
      for (const auto& t : {w_in, b_in, w_out, b_out})
        p.push_back(t.slice(0, r * El, (r + 1) * El).clone().requires_grad_());
      sw::Dispatch dr = sw::make_dispatch(e_r.unsqueeze(1), torch::ones({T_rank, 1}), E, -1,
                                          sw::DropPolicy::Position);
      torch::Tensor y_r_ND =
          sw::expert_parallel_ffn(comm, x_r.index_select(0, dr.token_N()), dr.offsets, p[0], p[1],
                                  p[2], p[3], sw::Activation::Gelu);
      torch::Tensor y_r = torch::zeros_like(x_r).index_add(0, dr.token_N(), y_r_ND);
      (y_r * R.slice(0, r * T_rank, (r + 1) * T_rank)).sum().backward();

      double w = diff(y_r, y_ref.detach().slice(0, r * T_rank, (r + 1) * T_rank));
      w = std::max(w, diff(x_r.grad(), x_ref.grad().slice(0, r * T_rank, (r + 1) * T_rank)));
      for (size_t i = 0; i < 4; ++i)
        w = std::max(w, diff(p[i].grad(), ref_params[i].grad().slice(0, r * El, (r + 1) * El)));
      worst[static_cast<size_t>(r)] = w;
    });
    const double m = *std::max_element(worst.begin(), worst.end());
    MESSAGE("W = " << W
                   << ": max abs difference to one process (outputs, input and expert "
                      "gradients): "
                   << m);
    CHECK(m < 1e-4);
  }
}

TEST_CASE("expert-parallel FFN with a capacity: one all-to-all less, bitwise the counted one's") {
  // D = 1 at W = 4: the counts of 2 local experts take 2 header rows of one float each.
  for (const auto& wd : {std::pair<int64_t, int64_t>{2, 6}, std::pair<int64_t, int64_t>{4, 1}}) {
    const int64_t W = wd.first, D = wd.second, F = 5, E = 8, T_rank = 12, C = 3;
    CAPTURE(W);
    const int64_t El = E / W;
    torch::manual_seed(29 + W);
    torch::Tensor w_in = torch::randn({E, D, F}), b_in = torch::randn({E, F});
    torch::Tensor w_out = torch::randn({E, F, D}), b_out = torch::randn({E, D});
    torch::Tensor x = torch::randn({W * T_rank, D}), R = torch::randn({W * T_rank, D});
    // Expert 0 is wanted by every token of rank 0 (it drops all but C), expert 5 by none.
    torch::Tensor expert_T = torch::randint(1, E - 1, {W * T_rank}, torch::kInt64);
    expert_T = expert_T + (expert_T >= 5).to(torch::kInt64);
    expert_T.slice(0, 0, T_rank).fill_(0);

    std::vector<int> same(static_cast<size_t>(W), 0);
    std::vector<int64_t> calls_counted(static_cast<size_t>(W)), calls_padded(calls_counted);
    on_ranks(W, [&](int64_t r, sw::Comm& comm) {
      torch::Tensor e_r = expert_T.slice(0, r * T_rank, (r + 1) * T_rank);
      sw::Dispatch d = sw::make_dispatch(e_r.unsqueeze(1), torch::ones({T_rank, 1}), E, C,
                                         sw::DropPolicy::Position);
      std::vector<torch::Tensor> outs;  // output, input gradient, 4 weight gradients; twice
      for (int64_t capacity : {int64_t{-1}, C}) {
        torch::Tensor x_r = x.slice(0, r * T_rank, (r + 1) * T_rank).clone().requires_grad_();
        std::vector<torch::Tensor> p;
        for (const auto& t : {w_in, b_in, w_out, b_out})
          p.push_back(t.slice(0, r * El, (r + 1) * El).clone().requires_grad_());
        const sw::CommStats before = comm.stats();
        torch::Tensor y =
            sw::expert_parallel_ffn(comm, x_r.index_select(0, d.token_N()), d.offsets, p[0], p[1],
                                    p[2], p[3], sw::Activation::Gelu, {}, capacity);
        (y * R.slice(0, r * T_rank, (r + 1) * T_rank).index_select(0, d.token_N()))
            .sum()
            .backward();
        const int64_t calls = (comm.stats() - before).all_to_all_calls;
        (capacity < 0 ? calls_counted : calls_padded)[static_cast<size_t>(r)] = calls;
        outs.push_back(y.detach());
        outs.push_back(x_r.grad());
        for (const auto& t : p)
          outs.push_back(t.grad());
      }
      bool all = true;
      for (size_t i = 0; i < 6; ++i)
        all = all && torch::equal(outs[i], outs[i + 6]);
      same[static_cast<size_t>(r)] = all ? 1 : 0;
    });
    for (int64_t r = 0; r < W; ++r) {
      CAPTURE(r);
      CHECK(same[static_cast<size_t>(r)] == 1);
      CHECK(calls_counted[static_cast<size_t>(r)] == 5);  // counts, rows, back; 2 backward
      CHECK(calls_padded[static_cast<size_t>(r)] == 4);
    }
  }
}

TEST_CASE("one Switch layer over 2 and 4 ranks equals one process on the same global batch") {
  // Dropless: capacity is decided per rank on its own tokens, so with dropping the ranks
  // and one process would legitimately drop different tokens.
  const int64_t D = 8, F = 12, E = 8, T_rank = 10;
  for (int64_t W : {2, 4}) {
    CAPTURE(W);
    sw::MoeConfig moe;
    moe.n_experts = E;
    moe.drop_tokens = false;
    moe.z_loss = 0;
    torch::manual_seed(3 + W);
    sw::SwitchFFN ref(D, F, moe, sw::Activation::Gelu);
    {
      torch::NoGradGuard g;
      for (auto& p : ref->parameters())
        p.normal_(0.0, 0.5);
    }
    torch::Tensor x = torch::randn({W * T_rank, D}), R = torch::randn({W * T_rank, D});
    torch::Tensor x_ref = x.clone().requires_grad_();
    torch::Tensor y_ref = ref->forward(x_ref).y;
    (y_ref * R).sum().backward();

    std::mutex build;
    std::vector<double> worst(static_cast<size_t>(W), 0.0);
    on_ranks(W, [&](int64_t r, sw::Comm& comm) {
      sw::SwitchFFN layer{nullptr};
      {
        std::lock_guard<std::mutex> lock(build);
        layer = sw::SwitchFFN(D, F, moe, sw::Activation::Gelu);
        torch::NoGradGuard g;
        auto src = ref->named_parameters();
        for (auto& p : layer->named_parameters())
          p.value().copy_(src[p.key()]);
      }
      layer->enable_expert_parallel(
          std::shared_ptr<sw::Comm>(&comm, [](sw::Comm*) {}));  // owned by on_ranks
      const int64_t lo = r * T_rank, El = E / W;
      torch::Tensor x_r = x.slice(0, lo, lo + T_rank).clone().requires_grad_();
      torch::Tensor y_r = layer->forward(x_r).y;
      (y_r * R.slice(0, lo, lo + T_rank)).sum().backward();
      // Data parallelism sums the replicated router's gradients over ranks.
      torch::Tensor g_router = layer->router->proj->weight.grad().clone();
      comm.all_reduce_sum(g_router);
      double w = diff(y_r, y_ref.detach().slice(0, lo, lo + T_rank));
      w = std::max(w, diff(x_r.grad(), x_ref.grad().slice(0, lo, lo + T_rank)));
      w = std::max(w, diff(g_router, ref->router->proj->weight.grad()));
      w = std::max(w, diff(layer->experts->w_in.grad(),
                           ref->experts->w_in.grad().slice(0, r * El, (r + 1) * El)));
      w = std::max(w, diff(layer->experts->b_out.grad(),
                           ref->experts->b_out.grad().slice(0, r * El, (r + 1) * El)));
      worst[static_cast<size_t>(r)] = w;
    });
    const double m = *std::max_element(worst.begin(), worst.end());
    MESSAGE("W = " << W << ": max abs difference of outputs and gradients to one process: " << m);
    CHECK(m < 1e-4);
  }
  sw::MoeConfig moe;
  moe.n_experts = 6;
  sw::SwitchFFN layer(4, 4, moe, sw::Activation::Gelu);
  on_ranks(4, [&](int64_t r, sw::Comm& comm) {
    if (r != 0) return;
    CHECK(test::contains(test::error_of([&] {
                           layer->enable_expert_parallel(
                               std::shared_ptr<sw::Comm>(&comm, [](sw::Comm*) {}));
                         }),
                         "moe.n_experts = 6 is not divisible by the 4"));
  });
}

TEST_CASE("lanes: collectives of their own, counted with their Comm, hidden while another works") {
  // Two ranks, two lanes each, one thread per lane: a lane's collectives pair with the same
  // lane on the other rank whatever the timing, and land in the parent's stats.
  std::vector<sw::CommStats> seen(2);
  std::vector<double> sums(4, 0.0);
  on_ranks(2, [&](int64_t r, sw::Comm& comm) {
    std::vector<std::shared_ptr<sw::Comm>> lanes = {comm.split("lane0/"), comm.split("lane1/")};
    // Alone, with no worker registered: every second in a collective is exposed.
    torch::Tensor t = torch::ones({4});
    comm.all_reduce_sum(t);
    const sw::CommStats alone = comm.stats();
    CHECK(alone.all_reduce_calls == 1);
    CHECK(alone.exposed_seconds == alone.seconds);
    comm.reset_stats();
    // Lane 0 waits in a barrier for rank 1, which arrives 300 ms late; meanwhile rank 0's
    // lane 1 works (sleeps) outside any collective: rank 0's wait is hidden behind it.
    std::vector<std::optional<sw::CommWorker>> working(2);
    working[0].emplace(comm);
    working[1].emplace(comm);
    std::string lane1_error;
    std::thread lane1([&] {
      try {
        if (r == 0) std::this_thread::sleep_for(std::chrono::milliseconds(600));
        torch::Tensor v = torch::full({1}, 10.0 * static_cast<double>(r + 1));
        lanes[1]->all_reduce_sum(v);
        sums[static_cast<size_t>(2 * r + 1)] = v.item<double>();
      } catch (const std::exception& e) {
        lane1_error = e.what();
      }
      working[1].reset();
    });
    try {
      if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
      lanes[0]->barrier();
      torch::Tensor v = torch::full({1}, static_cast<double>(r + 1));
      lanes[0]->all_reduce_sum(v);
      sums[static_cast<size_t>(2 * r)] = v.item<double>();
    } catch (...) {
      working[0].reset();
      lane1.join();
      throw;
    }
    working[0].reset();
    lane1.join();
    if (!lane1_error.empty()) throw std::runtime_error("lane 1: " + lane1_error);
    seen[static_cast<size_t>(r)] = comm.stats();
  });
  CHECK(sums == std::vector<double>{3, 30, 3, 30});
  for (const sw::CommStats& s : seen) {
    CHECK(s.all_reduce_calls == 2);  // one per lane, counted in the Comm they were split from
    CHECK(s.exposed_seconds <= s.seconds);
  }
  // Rank 0 waited ~0.3 s in lane 0's barrier while its lane 1 slept (worked): hidden; its
  // lane 1 came last to its all-reduce and barely waited.
  CHECK(seen[0].seconds - seen[0].exposed_seconds > 0.2);
  CHECK(seen[0].exposed_seconds < 0.2);
  // Rank 1's lane 1 waited ~0.6 s for rank 0's: hidden while rank 1's lane 0 slept, then
  // ~0.3 s alone once lane 0 had finished: exposed.
  CHECK(seen[1].seconds - seen[1].exposed_seconds > 0.2);
  CHECK(seen[1].exposed_seconds > 0.2);
}

TEST_CASE(
    "PendingSum: the sum runs while the caller computes, and only waiting for it is exposed") {
  std::vector<sw::CommStats> computed(2), waited(2);
  std::vector<double> sums(6, 0.0);
  on_ranks(2, [&](int64_t r, sw::Comm& comm) {
    const auto i = static_cast<size_t>(r);
    // Rank 1 starts 300 ms late; rank 0 computes (sleeps) 500 ms before it waits, so the
    // sum finishes meanwhile: in flight ~0.3 s (until it completes, not until the wait),
    // none of it exposed.
    torch::Tensor a = torch::full({3}, static_cast<double>(r + 1));
    if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    {
      sw::PendingSum sum(comm, a);
      if (r == 0) std::this_thread::sleep_for(std::chrono::milliseconds(500));
      sum.wait();
      sum.wait();  // a second wait returns at once
    }
    computed[i] = comm.stats();
    comm.barrier();  // both ranks start the second part together
    comm.reset_stats();
    // Now rank 0 waits at once for rank 1, 600 ms late: all of it exposed. The handle is
    // dropped unwaited; its destructor waits, so the sum is there after the scope.
    torch::Tensor b = torch::full({1}, 10.0 * static_cast<double>(r + 1));
    if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(600));
    {
      sw::PendingSum sum(comm, b);
      if (r == 0) sum.wait();
    }
    waited[i] = comm.stats();
    sums[3 * i] = a[0].item<double>();
    sums[3 * i + 1] = a[2].item<double>();
    sums[3 * i + 2] = b[0].item<double>();
  });
  CHECK(sums == std::vector<double>{3, 3, 30, 3, 3, 30});
  for (size_t r = 0; r < 2; ++r) {
    CHECK(computed[r].all_reduce_calls == 1);
    CHECK(computed[r].all_reduce_bytes == 3 * 4);
    CHECK(waited[r].all_reduce_calls == 1);
  }
  CHECK(computed[0].seconds > 0.25);
  CHECK(computed[0].seconds < 0.45);  // not the 0.5 s until the wait
  CHECK(computed[0].exposed_seconds < 0.1);
  CHECK(waited[0].seconds > 0.25);
  CHECK(waited[0].exposed_seconds > 0.25);
}

// CPU seconds the calling thread has used.
double thread_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_THREAD, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

TEST_CASE("Comm::set_spin: a waiting thread polls for at most the spin, then sleeps") {
  // Rank 1 arrives 1 s late at each all-reduce. Rank 0 waits once sleeping at once and once
  // polling for up to 100 ms: the poll shows as the waiting thread's CPU time (a yielding
  // poller gets at least its share of a core), and stops long before the second (a poll
  // that went on would cost several times more).
  std::vector<double> cpu(2, -1.0);
  std::vector<double> sums(4, 0.0);
  on_ranks(2, [&](int64_t r, sw::Comm& comm) {
    for (size_t i = 0; i < 2; ++i) {
      comm.set_spin(std::chrono::microseconds(i == 0 ? 0 : 100000));
      comm.barrier();
      torch::Tensor t = torch::full({1}, static_cast<double>(r + 1));
      if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(1000));
      const double before = thread_cpu_seconds();
      comm.all_reduce_sum(t);
      if (r == 0) cpu[i] = thread_cpu_seconds() - before;
      sums[static_cast<size_t>(2 * r) + i] = t.item<double>();
    }
  });
  CHECK(sums == std::vector<double>{3, 3, 3, 3});
  MESSAGE("rank 0's CPU seconds waiting 1 s: " << cpu[0] << " sleeping, " << cpu[1]
                                               << " polling first for 100 ms");
  CHECK(cpu[0] < 0.005);
  CHECK(cpu[1] > 0.01);
  CHECK(cpu[1] < 0.3);
}

TEST_CASE("Lanes: threads kept across runs, each on its own lane, a failure rethrown after all") {
  std::vector<std::vector<double>> sums(2, std::vector<double>(3, 0.0));
  std::vector<std::string> failure(2);
  std::vector<int> distinct(2, 0), grad_on(2, 0);
  on_ranks(2, [&](int64_t r, sw::Comm& comm) {
    const auto u = static_cast<size_t>(r);
    sw::Lanes lanes(comm, 3);
    CHECK(lanes.size() == 3);
    std::vector<sw::Comm*> seen(3, nullptr);
    std::atomic<int> with_grad{0};
    const torch::NoGradGuard no_grad;  // the caller's grad mode reaches the lanes
    for (int run = 0; run < 2; ++run)  // the same threads run again
      lanes.run([&](int64_t i) {
        // Rank 0 starts its lanes in reverse order: each still meets its own partner.
        if (r == 0) std::this_thread::sleep_for(std::chrono::milliseconds(40 * (2 - i)));
        seen[static_cast<size_t>(i)] = sw::CommLane::current();
        if (torch::GradMode::is_enabled()) ++with_grad;
        torch::Tensor v = torch::full({1}, std::pow(10.0, static_cast<double>(i)) * (r + 1));
        sw::CommLane::current()->all_reduce_sum(v);
        sums[u][static_cast<size_t>(i)] += v.item<double>();
      });
    grad_on[u] = with_grad.load();
    std::sort(seen.begin(), seen.end());
    distinct[u] = static_cast<int>(std::unique(seen.begin(), seen.end()) - seen.begin());
    // Lane 1 fails on both ranks; lanes 0 and 2 finish their exchange before run rethrows.
    try {
      lanes.run([&](int64_t i) {
        if (i == 1) throw std::runtime_error("lane 1 gave up");
        torch::Tensor v = torch::ones({1});
        sw::CommLane::current()->all_reduce_sum(v);
        sums[u][static_cast<size_t>(i)] += v.item<double>();
      });
    } catch (const std::exception& e) {
      failure[u] = e.what();
    }
  });
  for (size_t r = 0; r < 2; ++r) {
    CAPTURE(r);
    CHECK(sums[r] == std::vector<double>{2 * 3 + 2, 2 * 30, 2 * 300 + 2});
    CHECK(distinct[r] == 3);
    CHECK(grad_on[r] == 0);
    CHECK(failure[r] == "lane 1 gave up");
  }
}
