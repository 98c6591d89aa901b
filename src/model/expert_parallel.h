// Expert parallelism: each of W ranks owns a contiguous slice of the E experts (rank r owns
// [r*E/W, (r+1)*E/W)). Kept assignments travel to their expert's rank by an all-to-all
// (an all-to-all of counts first, then the rows by variable splits; or, with a capacity,
// the rows in blocks of a known size with the counts in a header), run through the same
// grouped computation as in one process, and come back by the reverse all-to-all;
// backward sends gradients the same ways.
#pragma once

#include <vector>

#include <torch/torch.h>

#include "distributed/comm.h"
#include "model/experts.h"
#include "model/ffn.h"

namespace sw {

// The seed's interface, without communication: tokens_Nd [N, d] and routing_N (global
// expert per token) on one rank; local_weights the [d, d] matrices of this rank's experts.
// Returns [N, d]: rows of tokens routed to this rank's experts hold token x weight, the
// rest are zero. Summed over ranks, this is the whole layer.
torch::Tensor expert_parallel_dispatch(const torch::Tensor& tokens_Nd,
                                       const torch::Tensor& routing_N,
                                       const std::vector<torch::Tensor>& local_weights,
                                       int64_t rank, int64_t world_size);

// Differentiable all-to-all of rows: the backward sends the gradients back along the
// reverse splits.
torch::Tensor all_to_all_rows(Comm& comm, const torch::Tensor& x,
                              const std::vector<int64_t>& send_splits,
                              const std::vector<int64_t>& recv_splits);

// The experts' FFN over this rank's kept rows x_ND, sorted by global expert with
// offsets (E + 1 bounds over all experts), computed on the experts' owners. w_in etc. hold
// this rank's E/W experts; `deferred` as for grouped_ffn. Returns the rows' outputs in
// x_ND's order. With capacity >= 0 (every rank's dispatch keeps at most `capacity` rows an
// expert, and every rank passes the same capacity) the rows travel in blocks of that many
// seats an expert, and the all-to-all of counts before them is saved.
torch::Tensor expert_parallel_ffn(Comm& comm, const torch::Tensor& x_ND,
                                  const std::vector<int64_t>& offsets, const torch::Tensor& w_in,
                                  const torch::Tensor& b_in, const torch::Tensor& w_out,
                                  const torch::Tensor& b_out, Activation act,
                                  const c10::intrusive_ptr<DeferredGrads>& deferred = {},
                                  int64_t capacity = -1);

}  // namespace sw
