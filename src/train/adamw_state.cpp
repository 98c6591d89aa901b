#include "train/adamw_state.h"

namespace sw {

torch::optim::AdamWParamState* adamw_state(torch::optim::Optimizer& opt, const torch::Tensor& p) {
  auto& state = opt.state();
  using Key = typename std::decay_t<decltype(state)>::key_type;
  auto it = state.find(state_key<Key>(p.unsafeGetTensorImpl()));
  return it == state.end() ? nullptr
                           : static_cast<torch::optim::AdamWParamState*>(it->second.get());
}

}  // namespace sw
