#include "train/optimizer.h"

namespace sw {

bool is_decayed(const std::string& name, const torch::Tensor& p) {
  const std::string leaf = name.substr(name.rfind('.') + 1);
  if (leaf == "bias" || leaf == "b_in" || leaf == "b_out") return false;
  if (name.find("ln_") != std::string::npos) return false;
  return p.dim() >= 2;
}

std::unique_ptr<FusedAdamW> make_optimizer(torch::nn::Module& model, const TrainConfig& t) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& item : model.named_parameters())
    (is_decayed(item.key(), item.value()) ? decay : no_decay).push_back(item.value());
  auto options = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(t.lr).betas({t.beta1, t.beta2}).weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, options(t.weight_decay));
  groups.emplace_back(no_decay, options(0.0));
  return std::make_unique<FusedAdamW>(groups, torch::optim::AdamWOptions(t.lr));
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& group : opt.param_groups())
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

}  // namespace sw
