// Files of named tensors that Python reads without switch:
//   - the archive Python's torch.save writes for a plain {name: tensor} dict: a zip (LibTorch's
//     own archive writer) holding data.pkl, a protocol-2 pickle that names only what
//     torch.load(path, weights_only=True) accepts (a dict, torch._utils._rebuild_tensor_v2,
//     typed storages, an empty OrderedDict of backward hooks), and one record per tensor;
//   - safetensors: an 8-byte little-endian header length, a JSON header (each tensor's dtype,
//     shape and data_offsets, and "__metadata__", a map of strings), then the tensors' bytes,
//     back to back, each aligned to its element size.
// Little-endian hosts only, as LibTorch's own files.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

namespace sw {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

NamedTensors named_tensors(const c10::Dict<std::string, at::Tensor>& dict);

// The bytes of torch.save({name: tensor, ...}) for CPU tensors of the dtypes PyTorch has typed
// storages for (float, double, half, bfloat16, int64/32/16/8, uint8, bool); each tensor is
// written contiguous, alone in its storage. Throws sw::Error naming a tensor it cannot write.
std::string torch_save_bytes(const NamedTensors& tensors);

// A safetensors file of `tensors` (same dtypes) with `metadata` as its "__metadata__".
std::string safetensors_bytes(const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata);

struct Safetensors {
  NamedTensors tensors;  // in the order of their data
  std::map<std::string, std::string> metadata;
};

// Parses a safetensors file, checking it against the format's definition before any byte is
// used: a header that fits the file and parses as an object, known dtypes, data_offsets that
// match each tensor's shape and cover the data exactly (no gap, no overlap). Throws sw::Error
// naming `path` and what is wrong.
Safetensors read_safetensors(const std::string& bytes, const std::string& path);

}  // namespace sw
