// A corpus as ids in their compact width: 1 byte each for a vocabulary of up to 256
// characters, 2 up to 65,536, else 4 (little-endian, as a prepared token file holds them).
// The ids live in memory or in a read-only memory-mapped file shared with every process that
// maps it; slices share them too. Batches copy out only the windows they need, as int64.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace sw {

// The bytes per id for a vocabulary of `vocab_size` characters: 1, 2 or 4.
int token_width(int64_t vocab_size);
// "uint8", "uint16" or "uint32"; and back (0 for anything else).
std::string token_dtype(int width);
int token_width_of(const std::string& dtype);

class Tokens {
 public:
  Tokens() = default;
  // `ids` stored `width` bytes each; each id must fit.
  static Tokens from_ids(const std::vector<int64_t>& ids, int width);
  // The whole of `path` mapped read-only: `n` ids of `width` bytes (the file's size must be
  // n * width). Throws sw::Error naming the file.
  static Tokens map_file(const std::string& path, int width, int64_t n);

  int64_t size() const { return n_; }
  int width() const { return width_; }
  int64_t at(int64_t i) const;
  // Ids [begin, end), sharing the storage.
  Tokens slice(int64_t begin, int64_t end) const;
  // Ids at or above `bound` are refused by copy_to (a corrupt file): the message names `what`.
  void set_bound(int64_t bound, std::string what);
  // Ids [off, off + len) as int64 into `out`.
  void copy_to(int64_t off, int64_t len, int64_t* out) const;
  torch::Tensor to_int64() const;

 private:
  struct Storage;
  std::shared_ptr<const Storage> storage_;
  const unsigned char* data_ = nullptr;
  int width_ = 1;
  int64_t n_ = 0;
  int64_t bound_ = 0;  // 0: unchecked
  std::shared_ptr<const std::string> what_;
};

}  // namespace sw
