// libFuzzer target: the checkpoint readers, as resuming and sampling use them. Each input
// is one checkpoint file: its first byte picks which (0 model.pt, 1 optim.pt, 2 rng.pt,
// 3 state.json, 4 the pickle inside model.pt, put in the real archive's place, 5
// model.safetensors, read in a checkpoint without model.pt), the rest are its bytes; the other
// files come from a real checkpoint (SWITCH_FUZZ_CKPT, made by tools/fuzz.sh with switch-train).
// They are read into the model and the optimizer switch builds for that checkpoint's config, as
// --resume does. Rejecting an input with sw::Error is the expected outcome; any other exception, a
// crash or a sanitizer report is a bug.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include <caffe2/serialize/inline_container.h>
#include <torch/torch.h>

#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"
#include "util/error.h"
#include "util/fs.h"

namespace fs = std::filesystem;

namespace {

const char* const kFiles[] = {"model.pt", "optim.pt", "rng.pt", "state.json", "model.safetensors"};
constexpr size_t kNumFiles = 5;
std::string g_ref, g_dir;
std::string g_ref_bytes[kNumFiles];  // the reference checkpoint's files
sw::Transformer g_model{nullptr};

}  // namespace

// The reference model.pt with its data.pkl replaced by `pickle`.
std::string with_pickle(const std::string& archive, const std::string& pickle) {
  std::istringstream in(archive);
  caffe2::serialize::PyTorchStreamReader reader(&in);
  std::ostringstream out;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* buf, size_t n) {
    out.write(static_cast<const char*>(buf), static_cast<std::streamsize>(n));
    return n;
  });
  for (const std::string& name : reader.getAllRecords()) {
    if (name == "version" || name == ".data/version") continue;  // the writer adds its own
    if (name == "data.pkl") {
      writer.writeRecord(name, pickle.data(), pickle.size());
      continue;
    }
    at::DataPtr ptr;
    size_t size = 0;
    std::tie(ptr, size) = reader.getRecord(name);
    writer.writeRecord(name, ptr.get(), size);
  }
  writer.writeEndOfFile();
  return out.str();
}

void remove_dir() {
  std::error_code ec;
  fs::remove_all(g_dir, ec);
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* ref = std::getenv("SWITCH_FUZZ_CKPT");
  if (ref == nullptr) {
    std::cerr << "fuzz_checkpoint: set SWITCH_FUZZ_CKPT to a checkpoint directory\n";
    std::exit(2);
  }
  g_ref = ref;
  std::string tmpl = (fs::temp_directory_path() / "switch-fuzz-ckpt-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) {
    std::cerr << "fuzz_checkpoint: cannot create a temporary directory\n";
    std::exit(2);
  }
  g_dir = tmpl;
  std::atexit(remove_dir);
  for (size_t i = 0; i < kNumFiles; ++i)
    g_ref_bytes[i] = sw::read_file(g_ref + "/" + kFiles[i], "reference checkpoint");
  const sw::CheckpointMeta meta = sw::read_checkpoint_meta(g_ref);
  g_model = sw::Transformer(meta.config, meta.vocab.size());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t which = data[0] % 6;
  const std::string input(reinterpret_cast<const char*>(data) + 1, size - 1);
  for (size_t i = 0; i < kNumFiles; ++i) {
    const std::string bytes = which == 4 && i == 0 ? with_pickle(g_ref_bytes[0], input)
                              : (which < 4 && i == which) || (which == 5 && i == 4)
                                  ? input
                                  : g_ref_bytes[i];
    std::ofstream(g_dir + "/" + kFiles[i], std::ios::binary | std::ios::trunc) << bytes;
  }
  if (which == 5) fs::remove(g_dir + "/model.pt");
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
