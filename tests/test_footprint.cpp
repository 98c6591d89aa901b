// Memory before allocation: the parameter count the estimate uses equals the built model's,
// the estimate bounds what a training run really allocates, and the limit is read from
// cgroup files and /proc/meminfo as they are written.
#include <doctest/doctest.h>

#include "bench/memory.h"
#include "data/dataset.h"
#include "helpers.h"
#include "model/transformer.h"
#include "train/footprint.h"
#include "train/trainer.h"

TEST_CASE("footprint: count_params equals the built model's n_params") {
  struct Case {
    std::vector<std::string> sets;
  };
  const std::vector<Case> cases = {
      {{}},
      {{"moe.every=0"}},
      {{"moe.every=2", "model.n_layers=3", "moe.n_experts=8"}},
      {{"model.pos_emb=false", "moe.top_k=2", "model.d_ff=48"}},
      {{"model.activation=relu", "model.seq_len=16", "moe.n_experts=1"}},
      {{"moe.n_experts=16", "moe.d_expert=8", "moe.top_k=4"}},
      {{"moe.every=2", "model.n_layers=2", "moe.d_expert=100"}},
  };
  for (const auto& c : cases) {
    sw::Config cfg = test::tiny_config();
    for (const auto& s : c.sets)
      sw::apply_override(cfg, s);
    CAPTURE(sw::to_json(cfg).dump());
    for (int64_t vocab : {65, 300}) {
      sw::Transformer m(cfg, vocab);
      const sw::ParamCount p = sw::count_params(cfg, vocab);
      CHECK(p.total == static_cast<double>(m->n_params()));
      const double active =
          p.total - p.experts * (1.0 - static_cast<double>(cfg.moe.top_k) /
                                           static_cast<double>(cfg.moe.n_experts));
      if (cfg.n_moe_layers() > 0) CHECK(active == doctest::Approx(m->n_active_params()));
    }
  }
  // A config far past int64 in products stays a finite, huge double.
  sw::Config huge;
  huge.model.d_model = 4000000000;
  CHECK(sw::count_params(huge, 65).total > 1e19);
}

TEST_CASE("footprint: the estimate bounds what a training run allocates") {
  sw::MemoryTracker::install();
  // A short corpus, so that the model's own memory is most of what is measured.
  const std::string dir = test::scratch_dir("footprint_run");
  const std::string text = test::read_file(test::data_path()).substr(0, 100000);
  test::write_file(dir + "/text.txt", text);
  for (const std::string set : {"moe.every=1", "moe.every=0", "moe.top_k=2",
                                "moe.drop_tokens=false", "train.micro_batches=1"}) {
    CAPTURE(set);
    sw::Config cfg = test::tiny_config();
    cfg.data.path = dir + "/text.txt";
    for (const char* s : {"model.d_model=64", "model.n_heads=4", "model.d_ff=256",
                          "model.seq_len=64", "train.batch_size=32"})
      sw::apply_override(cfg, s);
    sw::apply_override(cfg, set);
    cfg.train.steps = 3;
    cfg.train.eval_every = 2;
    sw::TrainOptions opt;
    opt.out_dir = dir + "/run";
    test::fs::remove_all(opt.out_dir);
    opt.quiet = true;
    opt.checkpoints = false;
    const int64_t before = sw::MemoryTracker::current_bytes();
    sw::MemoryTracker::reset_peak();
    sw::train(cfg, opt);
    const double peak = static_cast<double>(sw::MemoryTracker::peak_bytes() - before);
    const sw::MemoryEstimate e =
        sw::estimate_memory(cfg, sw::Vocab::from_text(sw::utf8_decode(text, "text")).size(), 1,
                            static_cast<int64_t>(text.size()));
    // What LibTorch allocated: tensors only (the process itself is not counted).
    const double tensors = e.total() - e.runtime;
    MESSAGE(set << ": allocated peak " << sw::human_bytes(peak) << ", estimated " << e.describe());
    CHECK(peak <= tensors);
    CHECK(peak >= tensors / 3);  // an upper bound, not a guess off by orders of magnitude
  }
}

TEST_CASE("footprint: only the capacity strategy pays for the capacity factor") {
  sw::Config c;
  const double base = sw::estimate_memory(c, 65, 1, 0).activations;
  c.moe.capacity_factor = 1000;  // a way to say "never drop" with the grouped strategy
  CHECK(sw::estimate_memory(c, 65, 1, 0).activations == base);
  c.moe.strategy = sw::Strategy::Capacity;  // pads every expert to its capacity
  CHECK(sw::estimate_memory(c, 65, 1, 0).activations > 100 * base);
  c.moe.capacity_factor = 1.25;
  c.moe.eval_capacity_factor = 3000;  // evaluation buffers at the evaluation factor
  CHECK(sw::estimate_memory(c, 65, 1, 0).eval > 100 * sw::estimate_memory(c, 65, 1, 0).activations);
  c.moe.drop_tokens = false;  // padded to the busiest expert: at worst all tokens
  CHECK(sw::estimate_memory(c, 65, 1, 0).activations > 2 * base);
}

TEST_CASE("footprint: the limit is the tightest cgroup room or MemAvailable") {
  const std::string root = test::scratch_dir("footprint_root");
  auto put = [&](const std::string& rel, const std::string& text) {
    test::fs::create_directories(test::fs::path(root + rel).parent_path());
    test::write_file(root + rel, text);
  };
  put("/proc/meminfo", "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n");
  put("/proc/self/cgroup", "0::/job/step\n");
  sw::MemoryLimit l = sw::memory_limit(root);
  CHECK(l.bytes == 20000000.0 * 1024);
  CHECK(l.source == "MemAvailable");
  // cgroup v2: the group itself unlimited, its parent at 4 GiB of which 1 GiB is used.
  put("/sys/fs/cgroup/job/step/memory.max", "max\n");
  put("/sys/fs/cgroup/job/step/memory.current", "1000\n");
  put("/sys/fs/cgroup/job/memory.max", "4294967296\n");
  put("/sys/fs/cgroup/job/memory.current", "1073741824\n");
  l = sw::memory_limit(root);
  CHECK(l.bytes == 3.0 * 1024 * 1024 * 1024);
  CHECK(l.source == "cgroup memory.max");
  // Inactive page cache is reclaimable: it does not count as used.
  put("/sys/fs/cgroup/job/memory.stat", "anon 1000\ninactive_file 536870912\nactive_file 7\n");
  CHECK(sw::memory_limit(root).bytes == 3.5 * 1024 * 1024 * 1024);
  test::fs::remove(root + "/sys/fs/cgroup/job/memory.stat");
  // cgroup v1 at the mount's root: 2 GiB, 0.5 GiB used; "no limit" is 2^63 rounded to pages.
  put("/proc/self/cgroup", "4:memory:/\n0::/\n");
  put("/sys/fs/cgroup/memory/memory.limit_in_bytes", "2147483648\n");
  put("/sys/fs/cgroup/memory/memory.usage_in_bytes", "536870912\n");
  l = sw::memory_limit(root);
  CHECK(l.bytes == 1.5 * 1024 * 1024 * 1024);
  CHECK(l.source == "cgroup memory.limit_in_bytes");
  put("/sys/fs/cgroup/memory/memory.stat", "cache 9\ntotal_inactive_file 268435456\n");
  CHECK(sw::memory_limit(root).bytes == 1.75 * 1024 * 1024 * 1024);
  test::fs::remove(root + "/sys/fs/cgroup/memory/memory.stat");
  put("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
  l = sw::memory_limit(root);
  CHECK(l.source == "MemAvailable");
  // Nothing readable: unknown, and nothing is refused.
  const std::string empty = test::scratch_dir("footprint_empty");
  CHECK(sw::memory_limit(empty).bytes < 0);
  sw::Config huge;
  huge.model.d_model = 4000000000;
  const sw::MemoryEstimate e = sw::estimate_memory(huge, 65, 1, 1000);
  CHECK_NOTHROW(sw::check_fits(huge, e, 1, sw::memory_limit(empty)));
  const std::string msg = test::error_of([&] { sw::check_fits(huge, e, 1, l); });
  CHECK(test::contains(msg, "the run does not fit in memory"));
  CHECK(test::contains(msg, "(MemAvailable)"));
  CHECK(sw::human_bytes(1536.0 * 1024 * 1024) == "1.5 GiB");
  CHECK(sw::human_bytes(512) == "512 B");
}
