#include "data/corpus.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/sha256.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "token files are written little-endian");

namespace sw {
namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "switch tokens";
constexpr int kVersion = 1;
constexpr char32_t kCodePoints = 0x110000;

// What identifies the text's current content without reading it.
struct TextStat {
  int64_t bytes = 0, mtime_ns = 0, ctime_ns = 0;
  uint64_t inode = 0;
  bool operator==(const TextStat& o) const {
    return bytes == o.bytes && mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns && inode == o.inode;
  }
};

TextStat text_stat(const struct stat& st) {
  return {static_cast<int64_t>(st.st_size),
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec,
          static_cast<int64_t>(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec,
          static_cast<uint64_t>(st.st_ino)};
}

struct Meta {
  std::string source, sha256;
  TextStat stat;
  int64_t characters = 0;
  int width = 1;
  Vocab vocab;
};

// Opens the text and checks it is a non-empty regular file.
int open_text(const std::string& path, struct stat& st) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw Error(missing_text_message(path));
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(missing_text_message(path));
  }
  if (st.st_size == 0) {
    ::close(fd);
    throw Error(fmt::format("data file '{}' is empty", path));
  }
  return fd;
}

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Calls f(piece, n) for each piece of the file read from its start.
template <class F>
void read_pieces(int fd, const std::string& path, std::vector<unsigned char>& buf, F&& f) {
  if (::lseek(fd, 0, SEEK_SET) != 0)
    throw Error(fmt::format("cannot read data file '{}': {}", path, strerror(errno)));
  for (;;) {
    const ssize_t got = ::read(fd, buf.data(), buf.size());
    if (got < 0) {
      if (errno == EINTR) continue;
      throw Error(fmt::format("cannot read data file '{}': {}", path, strerror(errno)));
    }
    if (got == 0) return;
    f(buf.data(), static_cast<size_t>(got));
  }
}

void write_fully(int fd, const void* data, size_t n, const std::string& path) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(fmt::format("cannot write '{}': {}", path, strerror(errno)));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// A flock on the lock file, released when it goes.
class FileLock {
 public:
  // Shared or exclusive; `required`: throw when the lock file cannot be opened (else hold
  // nothing: a read-only folder that already holds a prepared file).
  FileLock(const std::string& path, bool exclusive, bool required) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd_ < 0 && !exclusive) fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd_ < 0) {
      if (!required) return;
      throw Error(
          fmt::format("cannot create '{}' to prepare the token file there: {} (set "
                      "data.cache_dir to a writable folder)",
                      path, strerror(errno)));
    }
    while (::flock(fd_, exclusive ? LOCK_EX : LOCK_SH) != 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      if (!required) return;
      throw Error(fmt::format("cannot lock '{}': {}", path, strerror(err)));
    }
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);
  }

 private:
  int fd_ = -1;
};

nlohmann::ordered_json meta_json(const Meta& m, const std::string& tokens_name) {
  std::vector<uint32_t> cps(m.vocab.chars().begin(), m.vocab.chars().end());
  nlohmann::ordered_json j;
  j["format"] = kFormat;
  j["version"] = kVersion;
  j["source"] = m.source;
  j["source_bytes"] = m.stat.bytes;
  j["source_mtime_ns"] = m.stat.mtime_ns;
  j["source_ctime_ns"] = m.stat.ctime_ns;
  j["source_inode"] = m.stat.inode;
  j["sha256"] = m.sha256;
  j["tokens"] = tokens_name;
  j["dtype"] = token_dtype(m.width);
  j["characters"] = m.characters;
  j["vocab_size"] = m.vocab.size();
  j["vocab"] = cps;  // code points, in id order
  return j;
}

void write_meta(const CorpusFiles& f, const Meta& m) {
  write_file_atomic(f.meta, meta_json(m, fs::path(f.tokens).filename().string()).dump(1) + "\n");
}

// The metadata file, checked for shape; nothing (with the reason in `why`) when it is
// missing or unusable.
std::optional<Meta> read_meta(const std::string& path, std::string& why) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    why = "not prepared yet";
    return std::nullopt;
  }
  try {
    const auto j = nlohmann::json::parse(read_file(path, "token metadata", size_t{64} << 20));
    if (!j.is_object() || j.value("format", "") != kFormat)
      throw Error("not a switch token metadata file");
    if (j.at("version").get<int>() != kVersion)
      throw Error(
          fmt::format("version {} (this switch reads {})", j.at("version").dump(), kVersion));
    Meta m;
    m.source = j.at("source").get<std::string>();
    m.sha256 = j.at("sha256").get<std::string>();
    m.stat.bytes = j.at("source_bytes").get<int64_t>();
    m.stat.mtime_ns = j.at("source_mtime_ns").get<int64_t>();
    m.stat.ctime_ns = j.at("source_ctime_ns").get<int64_t>();
    m.stat.inode = j.at("source_inode").get<uint64_t>();
    m.characters = j.at("characters").get<int64_t>();
    m.width = token_width_of(j.at("dtype").get<std::string>());
    const auto cps = j.at("vocab").get<std::vector<int64_t>>();
    std::u32string chars;
    for (size_t i = 0; i < cps.size(); ++i) {
      const int64_t c = cps[i];
      if (c < 0 || c >= kCodePoints || (c >= 0xD800 && c <= 0xDFFF) || (i > 0 && c <= cps[i - 1]))
        throw Error("its vocabulary is not ascending code points");
      chars.push_back(static_cast<char32_t>(c));
    }
    if (chars.empty()) throw Error("its vocabulary is empty");
    m.vocab = Vocab(chars);
    if (m.width != token_width(m.vocab.size()))
      throw Error(fmt::format("dtype {} does not suit a vocabulary of {}", j.at("dtype").dump(),
                              m.vocab.size()));
    if (m.characters < 1 || m.characters > m.stat.bytes)
      throw Error(fmt::format("{} characters from {} bytes", m.characters, m.stat.bytes));
    return m;
  } catch (const std::exception& e) {
    why = fmt::format("'{}' is unreadable ({})", path, e.what());
    return std::nullopt;
  }
}

// Reads the text twice, in pieces: its vocabulary and sha256, then its ids into the token
// file (under a temporary name, renamed into place), then the metadata.
Meta prepare(const std::string& text_path, const CorpusFiles& files, size_t chunk_bytes,
             const SayFn& say) {
  struct stat st0 {};
  Fd text(open_text(text_path, st0));
  const std::string source = "data file '" + text_path + "'";
  std::vector<unsigned char> buf(std::max<size_t>(chunk_bytes, 1));
  const auto t0 = std::chrono::steady_clock::now();

  // 1. The characters present, their count, and the digest.
  std::vector<uint64_t> seen(kCodePoints / 64, 0);
  int64_t count = 0;
  Sha256 sha;
  Utf8Stream scan(source);
  read_pieces(text.fd, text_path, buf, [&](const unsigned char* p, size_t n) {
    sha.update(p, n);
    scan.feed(p, n, [&](char32_t c) {
      seen[c >> 6] |= uint64_t{1} << (c & 63);
      ++count;
    });
  });
  scan.finish();
  Meta m;
  m.source = fs::absolute(text_path).lexically_normal().string();
  m.sha256 = sha.hex();
  m.stat = text_stat(st0);
  m.characters = count;
  std::u32string chars;
  for (char32_t c = 0; c < kCodePoints; ++c)
    if (seen[c >> 6] >> (c & 63) & 1) chars.push_back(c);
  m.vocab = Vocab(chars);
  m.width = token_width(m.vocab.size());

  // 2. The ids, `width` bytes each.
  std::vector<uint32_t> id_of(kCodePoints, 0);
  for (int64_t i = 0; i < m.vocab.size(); ++i)
    id_of[m.vocab.chr(i)] = static_cast<uint32_t>(i);
  const std::string tmp = files.tokens + ".tmp";
  ::unlink(tmp.c_str());
  Fd out(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644));
  if (out.fd < 0)
    throw Error(
        fmt::format("cannot write the token file '{}': {} (set data.cache_dir to a "
                    "writable folder)",
                    tmp, strerror(errno)));
  try {
    const size_t width = static_cast<size_t>(m.width);
    std::vector<unsigned char> ids(buf.size() * width);
    size_t filled = 0;
    int64_t written = 0;
    Utf8Stream encode(source);
    read_pieces(text.fd, text_path, buf, [&](const unsigned char* p, size_t n) {
      filled = 0;
      if (width == 1) {
        encode.feed(p, n,
                    [&](char32_t c) { ids[filled++] = static_cast<unsigned char>(id_of[c]); });
      } else if (width == 2) {
        encode.feed(p, n, [&](char32_t c) {
          const auto v = static_cast<uint16_t>(id_of[c]);
          std::memcpy(&ids[filled], &v, 2);
          filled += 2;
        });
      } else {
        encode.feed(p, n, [&](char32_t c) {
          std::memcpy(&ids[filled], &id_of[c], 4);
          filled += 4;
        });
      }
      write_fully(out.fd, ids.data(), filled, tmp);
      written += static_cast<int64_t>(filled / width);
    });
    encode.finish();
    struct stat st1 {};
    if (::fstat(text.fd, &st1) != 0 || !(text_stat(st1) == m.stat) || written != count)
      throw Error(
          fmt::format("{} changed while it was being prepared; run again once it is "
                      "written",
                      source));
    if (::fsync(out.fd) != 0)
      throw Error(fmt::format("cannot flush '{}' to disk: {}", tmp, strerror(errno)));
    if (::rename(tmp.c_str(), files.tokens.c_str()) != 0)
      throw Error(
          fmt::format("cannot rename '{}' to '{}': {}", tmp, files.tokens, strerror(errno)));
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  write_meta(files, m);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  say(
      fmt::format("data: prepared {} characters ({:.1f} MB) in {:.2f} s ({:.0f} MB/s): {} ids, "
                  "vocabulary {}",
                  m.characters, static_cast<double>(m.stat.bytes) / 1e6, s,
                  static_cast<double>(m.stat.bytes) / 1e6 / std::max(s, 1e-9), token_dtype(m.width),
                  m.vocab.size()));
  return m;
}

std::string text_sha256(const std::string& text_path, size_t chunk_bytes) {
  struct stat st {};
  Fd text(open_text(text_path, st));
  std::vector<unsigned char> buf(std::max<size_t>(chunk_bytes, 1));
  Sha256 sha;
  read_pieces(text.fd, text_path, buf, [&](const unsigned char* p, size_t n) { sha.update(p, n); });
  return sha.hex();
}

Corpus mapped(const std::string& text_path, const CorpusFiles& files, const Meta& m) {
  Corpus c;
  c.text_path = text_path;
  c.files = files;
  c.sha256 = m.sha256;
  c.vocab = m.vocab;
  c.tokens = Tokens::map_file(files.tokens, m.width, m.characters);
  return c;
}

// The metadata when it describes the text as it is now and its token file can be mapped.
std::optional<Corpus> try_fresh(const std::string& text_path, const CorpusFiles& files,
                                const TextStat& now, std::optional<Meta>& meta, std::string& why) {
  meta = read_meta(files.meta, why);
  if (!meta) return std::nullopt;
  if (!(meta->stat == now)) {
    why = meta->stat.bytes != now.bytes
              ? fmt::format("the text has changed ({} bytes, prepared from {})", now.bytes,
                            meta->stat.bytes)
              : "the text's times or inode have changed";
    return std::nullopt;
  }
  try {
    return mapped(text_path, files, *meta);
  } catch (const Error& e) {
    why = e.what();
    meta.reset();
    return std::nullopt;
  }
}

std::string cache_home() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg && *xdg == '/') return xdg;
  const char* home = std::getenv("HOME");
  if (home && *home) return std::string(home) + "/.cache";
  return (fs::temp_directory_path() / "switch-cache").string();
}

}  // namespace

CorpusFiles corpus_files(const std::string& text_path, const std::string& cache_dir) {
  const fs::path text = fs::absolute(text_path).lexically_normal();
  const std::string name = text.filename().string();
  auto in_cache = [&](const fs::path& dir) {
    const std::string stem =
        (dir / (name + "." + sha256_hex(text.string()).substr(0, 16))).string();
    return CorpusFiles{stem + ".tokens", stem + ".tokens.json", stem + ".tokens.lock"};
  };
  if (!cache_dir.empty()) return in_cache(fs::path(cache_dir));
  const std::string beside = text.string();
  const CorpusFiles here{beside + ".tokens", beside + ".tokens.json", beside + ".tokens.lock"};
  if (::access(here.meta.c_str(), R_OK) == 0 || ::access(text.parent_path().c_str(), W_OK) == 0)
    return here;
  return in_cache(fs::path(cache_home()) / "switch" / "tokens");
}

Corpus open_corpus(const std::string& text_path, const std::string& cache_dir, const SayFn& say,
                   size_t chunk_bytes) {
  const CorpusFiles files = corpus_files(text_path, cache_dir);
  struct stat st {};
  { Fd probe(open_text(text_path, st)); }
  TextStat now = text_stat(st);
  std::string why;
  std::optional<Meta> meta;
  {
    const FileLock shared(files.lock, false, false);
    if (auto c = try_fresh(text_path, files, now, meta, why)) return std::move(*c);
  }
  const fs::path dir = fs::path(files.tokens).parent_path();
  std::error_code ec;
  fs::create_directories(dir, ec);
  const FileLock exclusive(files.lock, true, true);
  // Another process may have prepared it while this one waited.
  { Fd probe(open_text(text_path, st)); }
  now = text_stat(st);
  if (auto c = try_fresh(text_path, files, now, meta, why)) return std::move(*c);
  // The same bytes under new times (a copy, a touch): the token file stands.
  const bool same_size = meta && meta->stat.bytes == now.bytes;
  if (same_size && text_sha256(text_path, chunk_bytes) == meta->sha256) {
    meta->stat = now;
    meta->source = fs::absolute(text_path).lexically_normal().string();
    write_meta(files, *meta);
    say(fmt::format("data: {} has new times but the same sha256: its token file {} is kept",
                    text_path, files.tokens));
    return mapped(text_path, files, *meta);
  }
  if (same_size) why = "the text has changed: another sha256";
  say(fmt::format("data: preparing {} into {} ({})", text_path, files.tokens, why));
  const Meta m = prepare(text_path, files, chunk_bytes, say);
  Corpus c = mapped(text_path, files, m);
  c.prepared_now = true;
  return c;
}

std::optional<CorpusInfo> peek_corpus(const std::string& text_path, const std::string& cache_dir) {
  struct stat st {};
  if (::stat(text_path.c_str(), &st) != 0) return std::nullopt;
  std::string why;
  const std::optional<Meta> m = read_meta(corpus_files(text_path, cache_dir).meta, why);
  if (!m || !(m->stat == text_stat(st))) return std::nullopt;
  return CorpusInfo{m->characters, m->vocab.size(), m->width};
}

}  // namespace sw
