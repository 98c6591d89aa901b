// A text corpus prepared once into a compact token file, then memory-mapped by every run.
//
// The first use of a text decodes it (streaming, in pieces) into `<text>.tokens`: its ids,
// 1, 2 or 4 bytes each by vocabulary size, little-endian, nothing else in the file (numpy
// reads it with np.memmap). Beside it `<text>.tokens.json` names the text (path, size,
// modification and change times, inode, sha256), the vocabulary (code points in id order),
// the dtype and the number of characters. Later uses check the text against it and map the
// token file read-only: start-up does not grow with the corpus, and the pages are shared by
// every rank and sweep point reading the same text. A text changed since (another sha256) is
// prepared again, never mixed. Preparing holds an exclusive flock on `<text>.tokens.lock`
// and writes under temporary names renamed into place; readers hold it shared while they
// check and map, so two processes preparing one text at once prepare it once.
//
// The files go beside the text when its folder is writable (or already holds them), else in
// $XDG_CACHE_HOME/switch/tokens (~/.cache/switch/tokens), or in data.cache_dir when set;
// in a cache folder their names carry a hash of the text's absolute path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "data/tokens.h"
#include "data/vocab.h"

namespace sw {

struct CorpusFiles {
  std::string tokens, meta, lock;
};

// Where the prepared files of `text_path` are (see above).
CorpusFiles corpus_files(const std::string& text_path, const std::string& cache_dir);

struct Corpus {
  std::string text_path;
  CorpusFiles files;
  std::string sha256;  // of the text
  Vocab vocab;
  Tokens tokens;  // every character of the text
  bool prepared_now = false;
};

using SayFn = std::function<void(const std::string&)>;

// The prepared corpus of `text_path`, preparing it first when it is missing, unreadable or
// out of date, and saying so through `say`. Errors (a missing, empty or non-UTF-8 text, a
// folder that cannot be written) name the file. `chunk_bytes`: the piece read at a time.
Corpus open_corpus(const std::string& text_path, const std::string& cache_dir, const SayFn& say,
                   size_t chunk_bytes = size_t{8} << 20);

struct CorpusInfo {
  int64_t characters = 0, vocab_size = 0;
  int width = 1;
};

// What an up-to-date prepared file says of the text (reading only the metadata and the
// text's status: nothing is prepared, written or locked); nothing when not prepared or stale.
std::optional<CorpusInfo> peek_corpus(const std::string& text_path, const std::string& cache_dir);

}  // namespace sw
