// Text as Unicode characters: strict UTF-8 decoding and encoding, and the character
// vocabulary (the sorted set of distinct characters of a corpus) that maps them to ids.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace sw {

// Decodes UTF-8 given in pieces of any size (a sequence may straddle two pieces), handing
// each character to a callback; throws sw::Error naming `source` and the byte offset, from
// the start of the stream, of the first invalid sequence (stray continuation, truncated,
// overlong, surrogate, > U+10FFFF).
class Utf8Stream {
 public:
  explicit Utf8Stream(std::string source) : source_(std::move(source)) {}

  template <class Emit>
  void feed(const unsigned char* s, size_t n, Emit&& emit) {
    size_t i = 0;
    while (pending_ > 0 && i < n) {  // a sequence begun in the previous piece
      held_[pending_++] = s[i++];
      char32_t cp;
      const int len = decode_one(held_, static_cast<size_t>(pending_), held_at_, cp);
      if (len > 0) {
        emit(cp);
        pending_ = 0;
      }
    }
    while (i < n) {
      if (s[i] < 0x80) {
        emit(static_cast<char32_t>(s[i++]));
        continue;
      }
      char32_t cp;
      const int len = decode_one(s + i, n - i, offset_ + i, cp);
      if (len == 0) {  // cut by the end of this piece
        pending_ = static_cast<int>(n - i);
        held_at_ = offset_ + i;
        std::copy(s + i, s + n, held_);
        offset_ += n;
        return;
      }
      emit(cp);
      i += static_cast<size_t>(len);
    }
    offset_ += n;
  }
  // The end of the stream: a sequence still open is an error.
  void finish() const;
  uint64_t bytes() const { return offset_; }

 private:
  // The character at s[0] (of `avail` bytes, at stream offset `at`): its length, or 0 when
  // more bytes are needed to tell.
  int decode_one(const unsigned char* s, size_t avail, uint64_t at, char32_t& cp) const;

  std::string source_;
  uint64_t offset_ = 0;                   // bytes fed before the current piece
  unsigned char held_[4] = {0, 0, 0, 0};  // a sequence cut by the end of a piece
  int pending_ = 0;                       // its bytes so far
  uint64_t held_at_ = 0;                  // its offset in the stream
};

// Decodes UTF-8 in one piece (Utf8Stream's rules and messages).
std::u32string utf8_decode(const std::string& bytes, const std::string& source);
std::string utf8_encode(const std::u32string& text);
std::string utf8_encode(char32_t c);

// A printable description of a character for error messages: 'a', '\n', U+00E9 'é'.
std::string describe_char(char32_t c);

class Vocab {
 public:
  Vocab() = default;
  explicit Vocab(std::u32string chars);  // sorted and de-duplicated here
  static Vocab from_text(const std::u32string& text);

  int64_t size() const { return static_cast<int64_t>(chars_.size()); }
  bool contains(char32_t c) const { return index_.count(c) != 0; }
  int64_t id(char32_t c) const;  // throws sw::Error for a character outside the vocabulary
  char32_t chr(int64_t id) const { return chars_.at(static_cast<size_t>(id)); }
  const std::u32string& chars() const { return chars_; }

  std::vector<int64_t> encode(const std::u32string& text) const;
  // UTF-8 text given with command-line flag `flag` (e.g. "--prompt"), as ids: invalid
  // UTF-8, or a character outside the vocabulary, is an error naming it and its position.
  std::vector<int64_t> encode_flag(const std::string& utf8, const std::string& flag) const;
  std::string decode(const std::vector<int64_t>& ids) const;

  bool operator==(const Vocab& o) const { return chars_ == o.chars_; }

 private:
  std::u32string chars_;
  std::unordered_map<char32_t, int64_t> index_;
};

}  // namespace sw
