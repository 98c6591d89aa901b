// The fused AdamW against LibTorch's, clipping included, and the parameter groups of a
// run's optimizer.
#include <doctest/doctest.h>

#include "helpers.h"
#include "model/transformer.h"
#include "train/fused_adamw.h"
#include "train/optimizer.h"
#include "train/schedule.h"

TEST_CASE("FusedAdamW matches LibTorch's AdamW, with clipping folded in") {
  torch::manual_seed(2);
  const double lr = 1e-2, wd = 0.1;
  std::vector<torch::Tensor> pa = {torch::randn({300, 7}), torch::randn({5})};
  std::vector<torch::Tensor> pb = {pa[0].clone(), pa[1].clone()};
  for (auto& p : pa)
    p.requires_grad_(true);
  for (auto& p : pb)
    p.requires_grad_(true);
  auto opts = torch::optim::AdamWOptions(lr).betas({0.9, 0.95}).weight_decay(wd);
  torch::optim::AdamW reference(pa, opts);
  sw::FusedAdamW fused(pb, opts);
  for (int step = 0; step < 6; ++step) {
    std::vector<torch::Tensor> grads = {torch::randn({300, 7}) * 3, torch::randn({5}) * 3};
    for (int i = 0; i < 2; ++i) {
      pa[i].mutable_grad() = grads[i].clone();
      pb[i].mutable_grad() = grads[i].clone();
    }
    const double total = torch::nn::utils::clip_grad_norm_(pa, 1.0);
    const sw::GradNorm g = sw::grad_norm(pb, 1.0);
    CHECK(g.norm == doctest::Approx(total).epsilon(1e-5));
    CHECK(g.clip_scale < 1.0);
    fused.set_grad_scale(g.clip_scale);
    reference.step();
    fused.step();
  }
  const double d = std::max((pa[0] - pb[0]).abs().max().item<double>(),
                            (pa[1] - pb[1]).abs().max().item<double>());
  MESSAGE("max |AdamW - FusedAdamW| after 6 steps: " << d);
  CHECK(d < 1e-6);
}

TEST_CASE("optimizer groups: weight decay on matrices and embeddings, never on biases or norms") {
  sw::Config c;
  c.model.n_layers = 2;
  sw::Transformer m(c, 7);
  for (const auto& item : m->named_parameters()) {
    const std::string& name = item.key();
    const bool bias =
        name.find("bias") != std::string::npos || name.find(".b_in") != std::string::npos ||
        name.find(".b_out") != std::string::npos || name.find("ln_") != std::string::npos;
    CAPTURE(name);
    CHECK(sw::is_decayed(name, item.value()) == !bias);
  }
  auto opt = sw::make_optimizer(*m, c.train);
  REQUIRE(opt->param_groups().size() == 2);
  const auto& decayed = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[0].options());
  const auto& plain = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[1].options());
  CHECK(decayed.weight_decay() == c.train.weight_decay);
  CHECK(plain.weight_decay() == 0.0);
  sw::set_lr(*opt, 0.5);
  CHECK(decayed.lr() == 0.5);
  CHECK(plain.lr() == 0.5);
}

TEST_CASE("learning rate: linear warmup, then cosine to min_lr at the last step") {
  sw::TrainConfig t;
  t.lr = 1e-3;
  t.min_lr = 1e-4;
  t.warmup = 10;
  t.steps = 110;
  CHECK(sw::lr_at(t, 0) == doctest::Approx(1e-4));
  CHECK(sw::lr_at(t, 9) == doctest::Approx(1e-3));
  CHECK(sw::lr_at(t, 10) == doctest::Approx(1e-3));
  CHECK(sw::lr_at(t, 60) == doctest::Approx(5.5e-4));
  CHECK(sw::lr_at(t, 110) == doctest::Approx(1e-4));
  CHECK(sw::lr_at(t, 500) == doctest::Approx(1e-4));
}
