// SwitchFeedForward against hand-worked cases and against the dense FFN; dispatch indices.
#include <cmath>

#include <doctest/doctest.h>

#include "helpers.h"
#include "model/switch_ffn.h"

namespace {

torch::Tensor identity_perm(int64_t n) {
  return torch::arange(n, torch::kInt64);
}
torch::Tensor reverse_perm(int64_t n) {
  return torch::arange(n - 1, -1, -1, torch::kInt64);
}

std::vector<int64_t> to_vec(const torch::Tensor& t) {
  torch::Tensor c = t.contiguous().to(torch::kInt64);
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// Top-1 dispatch of a list of experts with fixed ranks for the random policy.
sw::Dispatch top1(const torch::Tensor& expert_T, int64_t E, int64_t capacity,
                  const sw::RankFn& ranks = sw::random_ranks,
                  sw::DropPolicy policy = sw::DropPolicy::Random) {
  return sw::make_dispatch(expert_T.unsqueeze(1), torch::ones({expert_T.size(0), 1}), E, capacity,
                           policy, ranks);
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

double sigmoid(double z) {
  return 1.0 / (1.0 + std::exp(-z));
}

// A 2-wide, 2-expert layer whose routing and expert outputs are known in closed form:
// the router's logits are 10 * x, expert e computes relu(x) * (e + 2).
sw::SwitchFFN hand_layer(sw::MoeConfig moe) {
  moe.n_experts = 2;
  sw::SwitchFFN layer(2, 2, moe, sw::Activation::Relu);
  torch::NoGradGuard no_grad;
  layer->router->proj->weight.copy_(torch::eye(2) * 10);
  layer->router->proj->bias.zero_();
  auto& ex = layer->experts;
  ex->w_in.copy_(torch::eye(2).expand({2, 2, 2}));
  ex->b_in.zero_();
  ex->w_out[0].copy_(torch::eye(2) * 2);
  ex->w_out[1].copy_(torch::eye(2) * 3);
  ex->b_out.zero_();
  layer->random_rank = identity_perm;
  return layer;
}

}  // namespace

TEST_CASE("capacity is int(capacity_factor * tokens / experts)") {
  CHECK(sw::expert_capacity(1.25, 10, 4) == 3);
  CHECK(sw::expert_capacity(1.0, 7, 2) == 3);
  CHECK(sw::expert_capacity(2.0, 8, 4) == 4);
  CHECK(sw::expert_capacity(0.1, 4, 4) == 0);
  CHECK(sw::expert_capacity(1.0, 1024, 4) == 256);
}

TEST_CASE("dispatch: who goes where and who is dropped, under fixed permutations") {
  // Tokens 0..7 routed to experts 0,1,0,0,2,0,1,0: expert 0 gets {0,2,3,5,7}.
  torch::Tensor expert_T = torch::tensor({0, 1, 0, 0, 2, 0, 1, 0}, torch::kInt64);

  sw::Dispatch d = top1(expert_T, 3, /*capacity=*/2, identity_perm);
  CHECK(to_vec(d.counts_E) == std::vector<int64_t>{5, 2, 1});
  CHECK(to_vec(d.order_N) == std::vector<int64_t>{0, 2, 1, 6, 4});
  CHECK(d.offsets == std::vector<int64_t>{0, 2, 4, 5});
  CHECK(to_vec(d.dropped_M) == std::vector<int64_t>{3, 5, 7});
  CHECK(to_vec(d.slot_N) == std::vector<int64_t>{0, 1, 0, 1, 0});
  CHECK(to_vec(d.expert_N) == std::vector<int64_t>{0, 0, 1, 1, 2});

  // Reversed ranks: expert 0's five tokens in the order 7, 5, 3, 2, 0 keep 7 and 5.
  d = top1(expert_T, 3, 2, reverse_perm);
  CHECK(to_vec(d.order_N) == std::vector<int64_t>{7, 5, 6, 1, 4});
  CHECK(to_vec(d.dropped_M) == std::vector<int64_t>{3, 2, 0});

  // Unlimited capacity: grouped by expert, nothing dropped.
  d = top1(expert_T, 3, -1, sw::random_ranks, sw::DropPolicy::Position);
  CHECK(to_vec(d.order_N) == std::vector<int64_t>{0, 2, 3, 5, 7, 1, 6, 4});
  CHECK(d.offsets == std::vector<int64_t>{0, 5, 7, 8});
  CHECK(d.n_dropped() == 0);

  // Capacity 0 drops everything; an expert without tokens has an empty segment.
  d = top1(expert_T, 4, 0, identity_perm);
  CHECK(d.n_kept() == 0);
  CHECK(d.n_dropped() == 8);
  CHECK(d.offsets == std::vector<int64_t>{0, 0, 0, 0, 0});
  CHECK(to_vec(d.counts_E) == std::vector<int64_t>{5, 2, 1, 0});
}

TEST_CASE("drop policies: position, probability, and top-2 priority of first choices") {
  torch::Tensor expert_T = torch::tensor({0, 0, 0, 1}, torch::kInt64);
  torch::Tensor gate_T1 = torch::tensor({0.5f, 0.9f, 0.7f, 0.6f}).unsqueeze(1);
  // position: tokens 0 and 1 keep their seats in expert 0.
  sw::Dispatch d =
      sw::make_dispatch(expert_T.unsqueeze(1), gate_T1, 2, 2, sw::DropPolicy::Position);
  CHECK(to_vec(d.order_N) == std::vector<int64_t>{0, 1, 3});
  CHECK(to_vec(d.dropped_M) == std::vector<int64_t>{2});
  // probability: tokens 1 (0.9) and 2 (0.7) keep theirs.
  d = sw::make_dispatch(expert_T.unsqueeze(1), gate_T1, 2, 2, sw::DropPolicy::Probability);
  CHECK(to_vec(d.order_N) == std::vector<int64_t>{1, 2, 3});
  CHECK(to_vec(d.dropped_M) == std::vector<int64_t>{0});

  // Top-2 over 3 tokens: first choices 0,0,1; second choices 1,1,0 (assignment a = t*2 + j).
  // Expert 0 receives assignments 0, 2 (first choices) and 5 (token 2's second choice).
  torch::Tensor expert_TK = torch::tensor({0, 1, 0, 1, 1, 0}, torch::kInt64).view({3, 2});
  torch::Tensor gate_TK = torch::tensor({0.6f, 0.4f, 0.3f, 0.7f, 0.9f, 0.1f}).view({3, 2});
  CHECK(sw::expert_capacity(1.0, 3, 2, 2) == 3);
  // Capacity 2, position: first choices outrank second choices, whatever the position.
  d = sw::make_dispatch(expert_TK, gate_TK, 2, 2, sw::DropPolicy::Position);
  CHECK(to_vec(d.counts_E) == std::vector<int64_t>{3, 3});
  CHECK(to_vec(d.order_N) == std::vector<int64_t>{0, 2, 4, 1});
  CHECK(to_vec(d.dropped_M) == std::vector<int64_t>{5, 3});
  CHECK(to_vec(d.token_N()) == std::vector<int64_t>{0, 1, 2, 0});
  // Capacity 2, probability: expert 0 keeps gates 0.6 (a0) and 0.3 (a2) over 0.1 (a5);
  // expert 1 keeps 0.9 (a4) and 0.7 (a3) over 0.4 (a1).
  d = sw::make_dispatch(expert_TK, gate_TK, 2, 2, sw::DropPolicy::Probability);
  CHECK(to_vec(d.order_N) == std::vector<int64_t>{0, 2, 4, 3});
  CHECK(to_vec(d.dropped_M) == std::vector<int64_t>{5, 1});
}

TEST_CASE("random dropping keeps exactly `capacity` distinct tokens of the over-full expert") {
  torch::manual_seed(3);
  torch::Tensor expert_T = torch::zeros({10}, torch::kInt64);
  sw::Dispatch d = top1(expert_T, 2, 4);
  CHECK(d.n_kept() == 4);
  CHECK(d.n_dropped() == 6);
  torch::Tensor all = std::get<0>(torch::cat({d.order_N, d.dropped_M}).sort());
  CHECK(torch::equal(all, torch::arange(10, torch::kInt64)));
  // Over many draws every token keeps its seat about 4 times in 10.
  torch::Tensor kept = torch::zeros({10});
  for (int i = 0; i < 2000; ++i)
    kept.index_add_(0, top1(expert_T, 2, 4).order_N, torch::ones({4}));
  const double lo = (kept / 2000).min().item<double>(), hi = (kept / 2000).max().item<double>();
  MESSAGE("per-token keep rate in [" << lo << ", " << hi << "], expected 0.4");
  CHECK(lo > 0.35);
  CHECK(hi < 0.45);
}

TEST_CASE("hand-worked layer: capacity, drop with pass-through, scaling, counts, lb and z loss") {
  // x rows: [1,0] [2,0] [0,1] [3,0] -> logits 10x -> experts 0, 0, 1, 0.
  // Capacity int(1.0 * 4 / 2) = 2: expert 0 keeps tokens 0 and 1 (identity order), drops 3.
  torch::Tensor x = torch::tensor({1.f, 0.f, 2.f, 0.f, 0.f, 1.f, 3.f, 0.f}).view({4, 2});
  const double p0 = sigmoid(10), p1 = sigmoid(20), p2 = sigmoid(10), p3 = sigmoid(30);

  sw::MoeConfig moe;
  moe.capacity_factor = 1.0;
  moe.drop_tokens = true;
  moe.is_scale_prob = true;
  moe.dropped = sw::DroppedOutput::Pass;
  sw::SwitchFFN layer = hand_layer(moe);
  sw::SwitchFFNOutput out = layer->forward(x);

  torch::Tensor expected = torch::tensor({float(p0 * 2), 0.f, float(p1 * 4), 0.f, 0.f,
                                          float(p2 * 3), float(p3 * 3), 0.f})
                               .view({4, 2});
  MESSAGE("max |y - expected| = " << max_abs_diff(out.y, expected));
  CHECK(torch::allclose(out.y, expected, 1e-6, 1e-6));
  CHECK(to_vec(out.stats.counts_E) == std::vector<int64_t>{3, 1});
  CHECK(out.stats.dropped == 1);
  CHECK(out.stats.tokens == 4);
  CHECK(torch::allclose(out.stats.prob_max_T.to(torch::kFloat64),
                        torch::tensor({p0, p1, p2, p3}, torch::kFloat64), 1e-6));
  // prob_sum: expert 0 collects p0 + p1 + (1 - p2) + p3, expert 1 the rest.
  const double P0 = p0 + p1 + (1 - p2) + p3, P1 = 4 - P0;
  CHECK(out.stats.prob_sum_E[0].item<double>() == doctest::Approx(P0).epsilon(1e-6));
  CHECK(out.stats.prob_sum_E[1].item<double>() == doctest::Approx(P1).epsilon(1e-6));
  // lb = E * sum_i f_i P_i = 2 * (3/4 * P0/4 + 1/4 * P1/4).
  const double lb = 2 * (0.75 * P0 / 4 + 0.25 * P1 / 4);
  CHECK(out.stats.lb_loss.item<double>() == doctest::Approx(lb).epsilon(1e-6));
  // z = mean_t logsumexp(logits_t)^2, logits [10, 0], [20, 0], [0, 10], [30, 0].
  auto lse = [](double big) { return big + std::log1p(std::exp(-big)); };
  const double z =
      (std::pow(lse(10), 2) + std::pow(lse(20), 2) + std::pow(lse(10), 2) + std::pow(lse(30), 2)) /
      4;
  CHECK(out.stats.z_loss.item<double>() == doctest::Approx(z).epsilon(1e-6));

  SUBCASE("moe.dropped = zero: the dropped token outputs zero") {
    moe.dropped = sw::DroppedOutput::Zero;
    sw::SwitchFFN z = hand_layer(moe);
    torch::Tensor y = z->forward(x).y;
    CHECK(y[3].abs().sum().item<double>() == 0.0);
    CHECK(torch::allclose(y.slice(0, 0, 3), expected.slice(0, 0, 3), 1e-6, 1e-6));
  }
  SUBCASE("is_scale_prob = false: unscaled outputs, gradients still reach the router") {
    moe.is_scale_prob = false;
    sw::SwitchFFN u = hand_layer(moe);
    torch::Tensor y = u->forward(x).y;
    torch::Tensor unscaled = torch::tensor({2.f, 0.f, 4.f, 0.f, 0.f, 3.f, 3.f, 0.f}).view({4, 2});
    CHECK(torch::allclose(y, unscaled, 1e-6, 1e-6));
    y.sum().backward();
    torch::Tensor g = u->router->proj->weight.grad();
    REQUIRE(g.defined());
    CHECK(g.abs().sum().item<double>() > 0);
  }
  SUBCASE("drop_tokens = false: nobody is dropped") {
    moe.drop_tokens = false;
    sw::SwitchFFN n = hand_layer(moe);
    sw::SwitchFFNOutput o = n->forward(x);
    CHECK(o.stats.dropped == 0);
    CHECK(o.y[3][0].item<double>() == doctest::Approx(p3 * 6).epsilon(1e-6));
  }
}

TEST_CASE("sigmoid scores: chosen by score, gates normalised over the chosen, hand-worked") {
  // hand_layer's router: logits 10 * x. Tokens [1, 0], [0, 1], [3, 0] give logits
  // [10, 0], [0, 10], [30, 0]; sigmoid scores s(10), s(0) = 0.5, s(30).
  torch::Tensor x = torch::tensor({1.f, 0.f, 0.f, 1.f, 3.f, 0.f}).view({3, 2});
  sw::MoeConfig moe;
  moe.score = sw::Score::Sigmoid;
  moe.drop_tokens = false;
  for (int64_t k : {1, 2}) {
    CAPTURE(k);
    moe.top_k = k;
    sw::SwitchFFN layer = hand_layer(moe);
    layer->router->top_k = k;
    const sw::Routing r = layer->route(x);
    const double s10 = sigmoid(10), s30 = sigmoid(30);
    CHECK(to_vec(r.expert_TK.select(1, 0)) == std::vector<int64_t>{0, 1, 0});
    // The balancing losses see the scores normalised over all experts.
    CHECK(r.probs_TE[0][0].item<double>() == doctest::Approx(s10 / (s10 + 0.5)).epsilon(1e-6));
    CHECK(r.probs_TE[2][1].item<double>() == doctest::Approx(0.5 / (s30 + 0.5)).epsilon(1e-6));
    if (k == 1) {  // one chosen expert: its gate is 1, the output the expert's own
      CHECK(r.gate_TK.squeeze(1).eq(1.0).all().item<bool>());
      torch::Tensor y = layer->forward(x).y;
      torch::Tensor expected = torch::tensor({2.f, 0.f, 0.f, 3.f, 6.f, 0.f}).view({3, 2});
      CHECK(torch::allclose(y, expected, 1e-6, 1e-6));
    } else {  // both chosen: gates s / (s10 + 0.5) for token 0
      CHECK(r.gate_TK[0][0].item<double>() == doctest::Approx(s10 / (s10 + 0.5)).epsilon(1e-6));
      CHECK(r.gate_TK[0][1].item<double>() == doctest::Approx(0.5 / (s10 + 0.5)).epsilon(1e-6));
    }
  }
}

TEST_CASE("moe.balance: the Switch loss, the variance of the mean probabilities, or nothing") {
  torch::Tensor x = torch::tensor({1.f, 0.f, 2.f, 0.f, 0.f, 1.f, 3.f, 0.f}).view({4, 2});
  sw::MoeConfig moe;
  const double p0 = sigmoid(10), p1 = sigmoid(20), p2 = sigmoid(10), p3 = sigmoid(30);
  const double P0 = (p0 + p1 + (1 - p2) + p3) / 4, P1 = 1 - P0;  // mean router probabilities
  for (const auto& b : sw::choices<sw::Balance>()) {
    CAPTURE(b.name);
    moe.balance = b.value;
    sw::SwitchFFN layer = hand_layer(moe);
    const sw::MoeStats s = layer->forward(x).stats;
    const double got = s.balance_loss.item<double>();
    switch (b.value) {
      case sw::Balance::AuxLoss:
        CHECK(got == s.lb_loss.item<double>());
        break;
      case sw::Balance::Variance:
        CHECK(
            got ==
            doctest::Approx(((P0 - 0.5) * (P0 - 0.5) + (P1 - 0.5) * (P1 - 0.5)) / 2).epsilon(1e-5));
        break;
      case sw::Balance::Bias:  // balanced by the router's bias, not by a loss
      case sw::Balance::None:
        CHECK(got == 0.0);
        break;
    }
    CHECK(s.lb_loss.item<double>() > 1.0);  // the Switch loss is reported whatever the mode
  }
  // Under sigmoid scores the term sees the scores normalised over the experts.
  moe.score = sw::Score::Sigmoid;
  moe.balance = sw::Balance::Variance;
  const double h = 0.5, s10 = sigmoid(10), s20 = sigmoid(20), s30 = sigmoid(30);
  const double Q0 = (s10 / (s10 + h) + s20 / (s20 + h) + h / (h + s10) + s30 / (s30 + h)) / 4;
  const double Q1 = 1 - Q0;
  CHECK(hand_layer(moe)->forward(x).stats.balance_loss.item<double>() ==
        doctest::Approx(((Q0 - 0.5) * (Q0 - 0.5) + (Q1 - 0.5) * (Q1 - 0.5)) / 2).epsilon(1e-5));
}

TEST_CASE("one expert with unlimited capacity equals the dense FFN: outputs and gradients") {
  torch::manual_seed(0);
  const int64_t D = 16, F = 40;
  for (const auto& sc : std::vector<std::pair<sw::Score, bool>>{
           {sw::Score::Softmax, true}, {sw::Score::Softmax, false}, {sw::Score::Sigmoid, true}}) {
    const sw::Score score = sc.first;
    const bool scale = sc.second;
    CAPTURE(scale);
    CAPTURE(std::string(sw::name_of(score)));
    sw::MoeConfig moe;
    moe.n_experts = 1;
    moe.drop_tokens = false;
    moe.is_scale_prob = scale;
    moe.score = score;
    sw::SwitchFFN sw_layer(D, F, moe, sw::Activation::Gelu);
    sw::DenseFFN dense(D, F, sw::Activation::Gelu);
    {
      torch::NoGradGuard no_grad;
      dense->fc_in->weight.copy_(sw_layer->experts->w_in[0].t());
      dense->fc_in->bias.copy_(sw_layer->experts->b_in[0]);
      dense->fc_out->weight.copy_(sw_layer->experts->w_out[0].t());
      dense->fc_out->bias.copy_(sw_layer->experts->b_out[0]);
    }
    torch::Tensor x0 = torch::randn({3, 5, D});
    torch::Tensor xa = x0.clone().requires_grad_(true), xb = x0.clone().requires_grad_(true);
    torch::Tensor target = torch::randn({3, 5, D});
    torch::Tensor ya = sw_layer->forward(xa).y, yb = dense->forward(xb);
    (ya * target).sum().backward();
    (yb * target).sum().backward();
    const double dy = max_abs_diff(ya, yb), dx = max_abs_diff(xa.grad(), xb.grad());
    const double dw_in =
        max_abs_diff(sw_layer->experts->w_in.grad()[0].t(), dense->fc_in->weight.grad());
    const double dw_out =
        max_abs_diff(sw_layer->experts->w_out.grad()[0].t(), dense->fc_out->weight.grad());
    const double db = max_abs_diff(sw_layer->experts->b_in.grad()[0], dense->fc_in->bias.grad());
    MESSAGE(sw::name_of(score) << " scale=" << scale << " max diff: y " << dy << ", dx " << dx
                               << ", dw_in " << dw_in << ", dw_out " << dw_out << ", db_in " << db);
    CHECK(dy < 1e-5);
    CHECK(dx < 1e-5);
    CHECK(dw_in < 1e-5);
    CHECK(dw_out < 1e-5);
    CHECK(db < 1e-5);
  }
}

TEST_CASE("moe.balance = bias: chooses by score + bias, gates stay unbiased, moves the right way") {
  // hand_layer's router: token [1, 0] has probabilities p = s(10) for expert 0 and 1 - p
  // for expert 1; token [0, 1] the reverse. A bias of 1.5 on expert 1 sends both there
  // (1 - p + 1.5 > p), with their unbiased probabilities as gates.
  torch::Tensor x = torch::tensor({1.f, 0.f, 0.f, 1.f}).view({2, 2});
  sw::MoeConfig moe;
  moe.balance = sw::Balance::Bias;
  moe.drop_tokens = false;
  sw::SwitchFFN layer = hand_layer(moe);
  REQUIRE(layer->router->expert_bias.defined());
  CHECK(layer->named_buffers().contains("router.expert_bias"));
  const double p = sigmoid(10);
  sw::Routing r = layer->route(x);
  CHECK(to_vec(r.expert_TK.squeeze(1)) == std::vector<int64_t>{0, 1});
  {
    torch::NoGradGuard no_grad;
    layer->router->expert_bias.copy_(torch::tensor({0.f, 1.5f}));
  }
  r = layer->route(x);
  CHECK(to_vec(r.expert_TK.squeeze(1)) == std::vector<int64_t>{1, 1});
  // The gate is the chosen expert's own probability, without the bias.
  CHECK(r.gate_TK[0][0].item<double>() == doctest::Approx(1 - p).epsilon(1e-6));
  CHECK(r.gate_TK[1][0].item<double>() == doctest::Approx(p).epsilon(1e-6));

  // Loads 3, 1, 0, 4 (mean 2): the busy experts' biases fall by the rate, the idle ones'
  // rise, an expert at the mean keeps its bias.
  sw::MoeConfig four = moe;
  four.n_experts = 4;
  sw::SwitchFFN l4(2, 2, four, sw::Activation::Relu);
  l4->update_bias(torch::tensor({3, 1, 0, 4}, torch::kInt64), 0.01);
  l4->update_bias(torch::tensor({2, 2, 2, 2}, torch::kInt64), 0.01);
  const torch::Tensor b = l4->router->expert_bias;
  CHECK(b[0].item<float>() == -0.01f);
  CHECK(b[1].item<float>() == 0.01f);
  CHECK(b[2].item<float>() == 0.01f);
  CHECK(b[3].item<float>() == -0.01f);
}

TEST_CASE("moe.balance = bias evens out a deliberately skewed router") {
  // 8 experts, a router whose own bias sends most tokens to expert 0; the bias is updated
  // from each batch's loads (no other training). The load's coefficient of variation over
  // experts must fall from heavily skewed to near balance: over the last 100 batches (sign
  // updates of a fixed step make single batches jitter around the balance).
  torch::manual_seed(11);
  const int64_t D = 16, E = 8, T = 512;
  sw::MoeConfig moe;
  moe.n_experts = E;
  moe.balance = sw::Balance::Bias;
  moe.drop_tokens = false;
  sw::SwitchFFN layer(D, 8, moe, sw::Activation::Gelu);
  {
    torch::NoGradGuard no_grad;
    layer->router->proj->bias.copy_(torch::tensor({3.f, 1.f, 0.f, 0.f, 0.f, 0.f, 0.f, -1.f}));
  }
  auto load_cv = [&](const torch::Tensor& counts) {
    const torch::Tensor c = counts.to(torch::kFloat64);
    return (c.std(/*unbiased=*/false) / c.mean()).item<double>();
  };
  torch::NoGradGuard no_grad;
  double first = 0;
  torch::Tensor late = torch::zeros({E}, torch::kInt64);
  for (int step = 0; step < 400; ++step) {
    const sw::MoeStats s = layer->forward(torch::randn({T, D})).stats;
    if (step == 0) first = load_cv(s.counts_E);
    if (step >= 300) late += s.counts_E;
    layer->update_bias(s.counts_E, 0.01);
  }
  const double last = load_cv(late);
  MESSAGE("load CV over 8 experts: " << first << " in the first batch, " << last
                                     << " over batches 300-399");
  CHECK(first > 1.0);
  CHECK(last < 0.1);
  // The skew is undone by the bias: expert 0's is the lowest.
  CHECK(layer->router->expert_bias.argmin().item<int64_t>() == 0);
}

TEST_CASE("moe.shared_experts: the layer plus a dense FFN of shared x expert width") {
  torch::manual_seed(5);
  const int64_t D = 12, F = 10;
  sw::MoeConfig moe;
  moe.n_experts = 3;
  moe.shared_experts = 2;
  moe.capacity_factor = 1.0;  // with dropping: the shared part is added for dropped tokens too
  sw::SwitchFFN with(D, F, moe, sw::Activation::Gelu);
  CHECK(with->shared->fc_in->weight.sizes() == torch::IntArrayRef({2 * F, D}));
  sw::MoeConfig none = moe;
  none.shared_experts = 0;
  sw::SwitchFFN without(D, F, none, sw::Activation::Gelu);
  sw::DenseFFN dense(D, 2 * F, sw::Activation::Gelu);
  {
    torch::NoGradGuard no_grad;
    auto from = with->named_parameters();
    for (auto& item : without->named_parameters())
      item.value().copy_(from[item.key()]);
    dense->fc_in->weight.copy_(with->shared->fc_in->weight);
    dense->fc_in->bias.copy_(with->shared->fc_in->bias);
    dense->fc_out->weight.copy_(with->shared->fc_out->weight);
    dense->fc_out->bias.copy_(with->shared->fc_out->bias);
  }
  with->random_rank = without->random_rank = identity_perm;
  torch::Tensor x = torch::randn({2, 9, D});
  const sw::SwitchFFNOutput a = with->forward(x), b = without->forward(x);
  CHECK(a.stats.dropped > 0);
  const double d = max_abs_diff(a.y, b.y + dense->forward(x));
  MESSAGE("max |shared layer - (routed layer + dense FFN of width 2F)| = " << d);
  CHECK(d < 1e-6);
}

TEST_CASE("moe.overflow = reroute: hand-worked seats, never drops while an expert has room") {
  // 4 tokens all prefer expert 0 (then 1, then 2); capacity 1 per expert, 3 experts.
  // Position policy: token 0 keeps expert 0; token 1 moves to expert 1, token 2 to expert 2,
  // token 3 finds no room and is dropped.
  torch::Tensor expert_T = torch::zeros({4, 1}, torch::kInt64);
  torch::Tensor pref = torch::tensor({0, 1, 2}, torch::kInt64).repeat({4, 1});
  sw::Dispatch d = sw::make_dispatch(expert_T, torch::ones({4, 1}), 3, 1, sw::DropPolicy::Position,
                                     sw::random_ranks, pref);
  CHECK(to_vec(d.order_N) == std::vector<int64_t>{0, 1, 2});
  CHECK(to_vec(d.expert_N) == std::vector<int64_t>{0, 1, 2});
  CHECK(to_vec(d.slot_N) == std::vector<int64_t>{0, 0, 0});
  CHECK(d.offsets == std::vector<int64_t>{0, 1, 2, 3});
  CHECK(to_vec(d.rerouted_R) == std::vector<int64_t>{1, 2});
  CHECK(to_vec(d.dropped_M) == std::vector<int64_t>{3});
  CHECK(to_vec(d.counts_E) == std::vector<int64_t>{4, 0, 0});  // the router's choices
  CHECK(to_vec(d.expert_A) == std::vector<int64_t>{0, 1, 2, 0});

  // Top-2: a token never gets the same expert twice. Tokens 0 and 1 choose experts {0, 1};
  // capacity 2 for 3 experts. Position order: both first choices sit at 0, both second
  // choices at 1; nothing overflows, nothing moves.
  torch::Tensor e2 = torch::tensor({0, 1, 0, 1}, torch::kInt64).view({2, 2});
  torch::Tensor pref2 = torch::tensor({0, 1, 2, 0, 1, 2}, torch::kInt64).view({2, 3});
  d = sw::make_dispatch(e2, torch::full({2, 2}, 0.5), 3, 2, sw::DropPolicy::Position,
                        sw::random_ranks, pref2);
  CHECK(d.n_rerouted() == 0);
  CHECK(d.n_dropped() == 0);
  // Capacity 1: the second tokens' choices overflow and go to expert 2, the only one
  // neither has; the first of them (token 1's first choice, by position) gets the seat.
  d = sw::make_dispatch(e2, torch::full({2, 2}, 0.5), 3, 1, sw::DropPolicy::Position,
                        sw::random_ranks, pref2);
  CHECK(to_vec(d.rerouted_R) == std::vector<int64_t>{2});
  CHECK(to_vec(d.dropped_M) == std::vector<int64_t>{3});
  CHECK(to_vec(d.expert_A) == std::vector<int64_t>{0, 1, 2, 1});

  // Random routings: an assignment is dropped only when every expert its token does not
  // use is full, and with room to spare rerouting equals dropping (nothing overflows).
  torch::manual_seed(3);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t T = 40, E = 5, K = 1 + trial % 2, C = 3 + trial % 7;
    torch::Tensor scores = torch::rand({T, E});
    torch::Tensor p = scores.argsort(-1, /*descending=*/true);
    torch::Tensor chosen = p.slice(1, 0, K);
    sw::Dispatch r = sw::make_dispatch(chosen, torch::ones({T, K}), E, C, sw::DropPolicy::Random,
                                       sw::random_ranks, p);
    std::vector<int64_t> load(E, 0);
    for (int64_t e = 0; e < E; ++e)
      load[e] = r.offsets[e + 1] - r.offsets[e];
    for (int64_t e : load)
      CHECK(e <= C);
    const auto ex = to_vec(r.expert_A);
    for (int64_t a : to_vec(r.dropped_M)) {
      const int64_t t = a / K;
      for (int64_t e = 0; e < E; ++e) {
        bool used = false;
        for (int64_t j = 0; j < K; ++j)
          used |= ex[t * K + j] == e;
        if (!used)
          CHECK_MESSAGE(load[e] == C, "a token was dropped while expert " << e << " had room");
      }
    }
    CHECK(r.n_kept() + r.n_dropped() == T * K);
    sw::Dispatch roomy = sw::make_dispatch(chosen, torch::ones({T, K}), E, T * K,
                                           sw::DropPolicy::Position, sw::random_ranks, p);
    sw::Dispatch drop =
        sw::make_dispatch(chosen, torch::ones({T, K}), E, T * K, sw::DropPolicy::Position);
    CHECK(roomy.n_rerouted() == 0);
    CHECK(to_vec(roomy.order_N) == to_vec(drop.order_N));
    CHECK(to_vec(roomy.slot_N) == to_vec(drop.slot_N));
  }
}

TEST_CASE("moe.overflow = reroute in the layer: the new expert's output, scaled by its score") {
  // hand_layer: tokens [1, 0], [2, 0] both choose expert 0 (capacity int(1.0 * 2 / 2) = 1).
  // Position policy: token 0 keeps it, token 1 moves to expert 1 with gate p1 = 1 - s(20).
  torch::Tensor x = torch::tensor({1.f, 0.f, 2.f, 0.f}).view({2, 2});
  sw::MoeConfig moe;
  moe.capacity_factor = 1.0;
  moe.drop_policy = sw::DropPolicy::Position;
  moe.overflow = sw::Overflow::Reroute;
  sw::SwitchFFN layer = hand_layer(moe);
  const sw::SwitchFFNOutput out = layer->forward(x);
  CHECK(out.stats.rerouted == 1);
  CHECK(out.stats.dropped == 0);
  CHECK(to_vec(out.stats.counts_E) == std::vector<int64_t>{2, 0});
  const double p0 = sigmoid(10), q1 = 1 - sigmoid(20);
  // Expert 0 doubles relu(x), expert 1 triples it.
  torch::Tensor expected = torch::tensor({float(p0 * 2), 0.f, float(q1 * 6), 0.f}).view({2, 2});
  CHECK(torch::allclose(out.y, expected, 1e-6, 1e-6));
}
