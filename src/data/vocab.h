// Text as Unicode characters: strict UTF-8 decoding and encoding, and the character
// vocabulary (the sorted set of distinct characters of a corpus) that maps them to ids.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace sw {

// Decodes UTF-8; throws sw::Error naming `source` and the byte offset of the first
// invalid sequence (stray continuation, truncated, overlong, surrogate, > U+10FFFF).
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
