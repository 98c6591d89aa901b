#include "model/expert_parallel.h"

#include <cstring>

#include <fmt/format.h>

#include "model/experts.h"
#include "util/error.h"

namespace sw {

torch::Tensor expert_parallel_dispatch(const torch::Tensor& tokens_Nd,
                                       const torch::Tensor& routing_N,
                                       const std::vector<torch::Tensor>& local_weights,
                                       int64_t rank, int64_t world_size) {
  const int64_t local = static_cast<int64_t>(local_weights.size());
  if (world_size < 1 || rank < 0 || rank >= world_size)
    throw Error(
        fmt::format("expert_parallel_dispatch: rank {} is not in [0, {})", rank, world_size));
  torch::Tensor out = torch::zeros_like(tokens_Nd);
  const int64_t first = rank * local;
  for (int64_t j = 0; j < local; ++j) {
    torch::Tensor rows = (routing_N == first + j).nonzero().view({-1});
    if (rows.numel() == 0) continue;
    out = out.index_copy(0, rows, tokens_Nd.index_select(0, rows).mm(local_weights[j]));
  }
  return out;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The Comm is kept by address in the node: it must outlive the graph, as the process group
// of a training run does.
struct AllToAllRows : torch::autograd::Function<AllToAllRows> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, Comm* comm,
                               const std::vector<int64_t>& send, const std::vector<int64_t>& recv) {
    int64_t n = 0;
    for (int64_t r : recv)
      n += r;
    torch::Tensor out = torch::empty({n, x.size(1)}, x.options());
    comm->all_to_all(out, x, recv, send);
    ctx->saved_data["comm"] = reinterpret_cast<int64_t>(comm);
    ctx->saved_data["send"] = send;
    ctx->saved_data["recv"] = recv;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* comm = reinterpret_cast<Comm*>(ctx->saved_data["comm"].toInt());
    const auto send = ctx->saved_data["send"].toIntVector();
    const auto recv = ctx->saved_data["recv"].toIntVector();
    int64_t n = 0;
    for (int64_t s : send)
      n += s;
    torch::Tensor g = torch::empty({n, grads[0].size(1)}, grads[0].options());
    comm->all_to_all(g, grads[0].contiguous(), send, recv);
    return {g, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor all_to_all_rows(Comm& comm, const torch::Tensor& x,
                              const std::vector<int64_t>& send_splits,
                              const std::vector<int64_t>& recv_splits) {
  return AllToAllRows::apply(x, &comm, send_splits, recv_splits);
}

namespace {

// The rows this rank received for its experts: counts_WE[p * El + j] from rank p for local
// expert j, rank p's rows for expert j starting at row at_WE[p * El + j] of `rows`; recv[p]
// rows from rank p in all.
struct Received {
  torch::Tensor rows;
  std::vector<int64_t> counts_WE, at_WE, recv;
};

// Without a capacity: the counts first (an all-to-all of El integers a peer), then the rows
// by variable splits, send[p] of them to rank p.
Received exchange_counted(Comm& comm, const torch::Tensor& x_ND,
                          const std::vector<int64_t>& offsets, const std::vector<int64_t>& send,
                          int64_t El) {
  const int64_t W = comm.size(), E = El * W;
  torch::Tensor send_counts_E = torch::empty({E}, torch::kInt64);
  for (int64_t e = 0; e < E; ++e)
    send_counts_E[e] = offsets[e + 1] - offsets[e];
  torch::Tensor recv_counts_WE = torch::empty({W * El}, torch::kInt64);
  comm.all_to_all(recv_counts_WE, send_counts_E, std::vector<int64_t>(W, El),
                  std::vector<int64_t>(W, El));
  Received r;
  const int64_t* rc = recv_counts_WE.data_ptr<int64_t>();
  r.counts_WE.assign(rc, rc + W * El);
  r.recv.assign(static_cast<size_t>(W), 0);
  r.at_WE.resize(static_cast<size_t>(W * El));
  for (int64_t p = 0, pos = 0; p < W; ++p)
    for (int64_t j = 0; j < El; ++j) {
      r.at_WE[p * El + j] = pos;
      pos += rc[p * El + j];
      r.recv[p] += rc[p * El + j];
    }
  r.rows = all_to_all_rows(comm, x_ND, send, r.recv);
  return r;
}

// With a capacity C no expert holds more than C rows, so every rank sends every peer a
// block of one size known to all: `h` header rows whose bytes hold the El counts (int32),
// then C rows a local expert, zero past the count. One all-to-all instead of two; the rows
// the experts see are the same, in the same order, so the results are bitwise those of the
// counted exchange; the unused seats travel too (see block_seats in switch_ffn.cpp for
// when they are worth a collective).
Received exchange_padded(Comm& comm, const torch::Tensor& x_ND, const std::vector<int64_t>& offsets,
                         int64_t El, int64_t capacity) {
  const int64_t W = comm.size(), D = x_ND.size(1);
  const auto row_bytes = static_cast<size_t>(D) * x_ND.element_size();
  const auto header_bytes = static_cast<size_t>(El) * sizeof(int32_t);
  const auto h = static_cast<int64_t>((header_bytes + row_bytes - 1) / row_bytes);
  const int64_t block = h + El * capacity;
  torch::Tensor padded = torch::zeros({W * block, D}, x_ND.options().requires_grad(false));
  std::vector<int64_t> seat;  // for each row of x_ND, its row in `padded`
  seat.reserve(static_cast<size_t>(x_ND.size(0)));
  auto* bytes = static_cast<char*>(padded.data_ptr());
  for (int64_t p = 0; p < W; ++p)
    for (int64_t j = 0; j < El; ++j) {
      const int64_t e = p * El + j, n = offsets[e + 1] - offsets[e];
      TORCH_CHECK(n <= capacity, "expert_parallel_ffn: expert ", e, " holds ", n,
                  " rows, over its capacity ", capacity);
      const auto n32 = static_cast<int32_t>(n);
      std::memcpy(bytes + static_cast<size_t>(p * block) * row_bytes + j * sizeof(int32_t), &n32,
                  sizeof n32);
      for (int64_t i = 0; i < n; ++i)
        seat.push_back(p * block + h + j * capacity + i);
    }
  padded = padded.index_copy(0, torch::tensor(seat, torch::kInt64), x_ND);  // differentiable
  const std::vector<int64_t> blocks(static_cast<size_t>(W), block);
  Received r;
  r.rows = all_to_all_rows(comm, padded, blocks, blocks);
  const auto* got = static_cast<const char*>(r.rows.data_ptr());
  r.recv.assign(static_cast<size_t>(W), 0);
  r.counts_WE.resize(static_cast<size_t>(W * El));
  r.at_WE.resize(static_cast<size_t>(W * El));
  for (int64_t p = 0; p < W; ++p)
    for (int64_t j = 0; j < El; ++j) {
      int32_t n = 0;
      std::memcpy(&n, got + static_cast<size_t>(p * block) * row_bytes + j * sizeof(int32_t),
                  sizeof n);
      if (n < 0 || n > capacity)
        throw Error(
            fmt::format("expert-parallel exchange: rank {} sent {} rows for one expert, "
                        "outside 0..{} (do the ranks agree on the capacity?)",
                        p, n, capacity));
      r.counts_WE[p * El + j] = n;
      r.at_WE[p * El + j] = p * block + h + j * capacity;
      r.recv[p] += n;
    }
  return r;
}

}  // namespace

torch::Tensor expert_parallel_ffn(Comm& comm, const torch::Tensor& x_ND,
                                  const std::vector<int64_t>& offsets, const torch::Tensor& w_in,
                                  const torch::Tensor& b_in, const torch::Tensor& w_out,
                                  const torch::Tensor& b_out, Activation act,
                                  const c10::intrusive_ptr<DeferredGrads>& deferred,
                                  int64_t capacity) {
  const int64_t W = comm.size(), El = w_in.size(0), E = El * W;
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == E + 1,
              "expert_parallel_ffn: offsets must have E + 1 = ", E + 1, " entries");
  std::vector<int64_t> send(static_cast<size_t>(W));  // rows this rank sends to each rank
  for (int64_t p = 0; p < W; ++p)
    send[p] = offsets[(p + 1) * El] - offsets[p * El];
  const Received in = capacity >= 0 ? exchange_padded(comm, x_ND, offsets, El, capacity)
                                    : exchange_counted(comm, x_ND, offsets, send, El);
  // Regroup the rows by local expert (they arrive by source rank): `take` picks them from
  // what arrived, `place` puts each output where the compact exchange back expects it (by
  // source rank, then local expert).
  std::vector<int64_t> place_at(static_cast<size_t>(W * El)), local_offsets(El + 1, 0);
  for (int64_t p = 0, pos = 0; p < W; ++p)
    for (int64_t j = 0; j < El; ++j) {
      place_at[p * El + j] = pos;
      pos += in.counts_WE[p * El + j];
    }
  std::vector<int64_t> take, place;
  for (int64_t j = 0; j < El; ++j) {
    for (int64_t p = 0; p < W; ++p)
      for (int64_t i = 0; i < in.counts_WE[p * El + j]; ++i) {
        take.push_back(in.at_WE[p * El + j] + i);
        place.push_back(place_at[p * El + j] + i);
      }
    local_offsets[j + 1] = static_cast<int64_t>(take.size());
  }
  torch::Tensor y_local = grouped_ffn(in.rows.index_select(0, torch::tensor(take, torch::kInt64)),
                                      w_in, b_in, w_out, b_out, local_offsets, act, deferred);
  const auto n_recv = static_cast<int64_t>(place.size());
  torch::Tensor y_recv = torch::zeros({n_recv, w_out.size(2)}, y_local.options())
                             .index_copy(0, torch::tensor(place, torch::kInt64), y_local);
  return all_to_all_rows(comm, y_recv, in.recv, send);
}

}  // namespace sw
