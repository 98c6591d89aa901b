// libFuzzer target: the checkpoint readers, as resuming and sampling use them. Each input
// is one checkpoint file: its first byte picks which (0 model.pt, 1 optim.pt, 2 rng.pt,
// 3 state.json), the rest are its bytes; the other three files come from a real checkpoint
// (SWITCH_FUZZ_CKPT, made by tools/fuzz.sh with switch-train). They are read into the
// model and the optimizer switch builds for that checkpoint's config, as --resume does.
// Rejecting an input with sw::Error is the expected outcome; any other exception, a crash
// or a sanitizer report is a bug.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include <torch/torch.h>

#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/schedule.h"
#include "util/error.h"
#include "util/fs.h"

namespace fs = std::filesystem;

namespace {

const char* const kFiles[] = {"model.pt", "optim.pt", "rng.pt", "state.json"};
std::string g_ref, g_dir;
std::string g_ref_bytes[4];  // the reference checkpoint's files
sw::Transformer g_model{nullptr};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* ref = std::getenv("SWITCH_FUZZ_CKPT");
  if (ref == nullptr) {
    std::cerr << "fuzz_checkpoint: set SWITCH_FUZZ_CKPT to a checkpoint directory\n";
    std::exit(2);
  }
  g_ref = ref;
  g_dir = (fs::temp_directory_path() / ("switch-fuzz-ckpt-" + std::to_string(getpid()))).string();
  fs::create_directories(g_dir);
  for (size_t i = 0; i < 4; ++i)
    g_ref_bytes[i] = sw::read_file(g_ref + "/" + kFiles[i], "reference checkpoint");
  const sw::CheckpointMeta meta = sw::read_checkpoint_meta(g_ref);
  g_model = sw::Transformer(meta.config, meta.vocab.size());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t which = data[0] % 4;
  for (size_t i = 0; i < 4; ++i) {
    const std::string bytes = i == which
                                  ? std::string(reinterpret_cast<const char*>(data) + 1, size - 1)
                                  : g_ref_bytes[i];
    std::ofstream(g_dir + "/" + kFiles[i], std::ios::binary | std::ios::trunc) << bytes;
  }
  try {
    const sw::CheckpointMeta meta = sw::read_checkpoint_meta(g_dir);
    (void)meta;
  } catch (const sw::Error&) {
  }
  try {
    sw::load_weights(g_dir, *g_model);
  } catch (const sw::Error&) {
  }
  try {
    const sw::CheckpointMeta ref = sw::read_checkpoint_meta(g_ref);
    auto opt = sw::make_optimizer(*g_model, ref.config.train);
    sw::load_optimizer_and_rng(g_dir, *opt, 0, 1);
  } catch (const sw::Error&) {
  }
  return 0;
}
