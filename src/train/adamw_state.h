// Where an optimizer keeps a parameter's AdamW state (step, exp_avg, exp_avg_sq): apart
// from the fused update, so that checkpoint reading needs no more than this.
#pragma once

#include <sstream>
#include <string>
#include <type_traits>

#include <torch/torch.h>

namespace sw {

// The optimizer's state map is keyed by the parameter's TensorImpl: by its printed address
// in LibTorch 1.x, by the pointer itself in later versions.
template <typename Key>
Key state_key(c10::TensorImpl* impl) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream ss;
    ss << impl;
    return ss.str();
  } else {
    return impl;
  }
}

// The AdamW state of parameter `p` in `opt`, or nullptr before its first update.
torch::optim::AdamWParamState* adamw_state(torch::optim::Optimizer& opt, const torch::Tensor& p);

}  // namespace sw
