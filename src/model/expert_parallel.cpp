#include "model/expert_parallel.h"

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

torch::Tensor expert_parallel_ffn(Comm& comm, const torch::Tensor& x_ND,
                                  const std::vector<int64_t>& offsets, const torch::Tensor& w_in,
                                  const torch::Tensor& b_in, const torch::Tensor& w_out,
                                  const torch::Tensor& b_out, Activation act,
                                  const c10::intrusive_ptr<DeferredGrads>& deferred) {
  const int64_t W = comm.size(), El = w_in.size(0), E = El * W;
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == E + 1,
              "expert_parallel_ffn: offsets must have E + 1 = ", E + 1, " entries");
  // Counts first: what this rank sends to each expert, and what each rank sends to ours.
  torch::Tensor send_counts_E = torch::empty({E}, torch::kInt64);
  for (int64_t e = 0; e < E; ++e)
    send_counts_E[e] = offsets[e + 1] - offsets[e];
  torch::Tensor recv_counts_WE = torch::empty({W * El}, torch::kInt64);
  comm.all_to_all(recv_counts_WE, send_counts_E, std::vector<int64_t>(W, El),
                  std::vector<int64_t>(W, El));
  const int64_t* rc = recv_counts_WE.data_ptr<int64_t>();
  std::vector<int64_t> send(W), recv(W, 0);
  for (int64_t p = 0; p < W; ++p) {
    send[p] = offsets[(p + 1) * El] - offsets[p * El];
    for (int64_t j = 0; j < El; ++j)
      recv[p] += rc[p * El + j];
  }

  // Rows arrive grouped by source rank, then by local expert: regroup them by local expert.
  torch::Tensor recv_rows = all_to_all_rows(comm, x_ND, send, recv);
  std::vector<int64_t> starts(W * El), local_offsets(El + 1, 0);
  for (int64_t p = 0, pos = 0; p < W; ++p)
    for (int64_t j = 0; j < El; ++j) {
      starts[p * El + j] = pos;
      pos += rc[p * El + j];
    }
  std::vector<int64_t> perm;
  perm.reserve(static_cast<size_t>(recv_rows.size(0)));
  for (int64_t j = 0; j < El; ++j) {
    for (int64_t p = 0; p < W; ++p)
      for (int64_t i = 0; i < rc[p * El + j]; ++i)
        perm.push_back(starts[p * El + j] + i);
    local_offsets[j + 1] = static_cast<int64_t>(perm.size());
  }
  torch::Tensor perm_t = torch::tensor(perm, torch::kInt64);
  torch::Tensor y_local = grouped_ffn(recv_rows.index_select(0, perm_t), w_in, b_in, w_out, b_out,
                                      local_offsets, act, deferred);
  torch::Tensor y_recv = torch::zeros({recv_rows.size(0), w_out.size(2)}, y_local.options())
                             .index_copy(0, perm_t, y_local);
  return all_to_all_rows(comm, y_recv, recv, send);
}

}  // namespace sw
