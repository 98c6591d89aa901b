#include "train/pickle_check.h"

#include <cstdint>
#include <set>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>

#include "util/error.h"

namespace sw {

namespace {

constexpr int kMaxNesting = 32;                // containers within containers
constexpr size_t kMaxStack = size_t{1} << 20;  // items on the stack at once
constexpr size_t kMaxMarks = 32;
constexpr uint32_t kMaxMemo = 1u << 20;
constexpr uint32_t kMaxString = 16u << 20;

// The callables and classes an archive of tensors names.
const std::set<std::string>& allowed_globals() {
  static const std::set<std::string> g = {"torch._utils\n_rebuild_tensor_v2",
                                          "torch._utils\n_rebuild_tensor",
                                          "torch.jit._pickle\nrestore_type_tag",
                                          "collections\nOrderedDict",
                                          "torch\nFloatStorage",
                                          "torch\nDoubleStorage",
                                          "torch\nHalfStorage",
                                          "torch\nBFloat16Storage",
                                          "torch\nLongStorage",
                                          "torch\nIntStorage",
                                          "torch\nShortStorage",
                                          "torch\nCharStorage",
                                          "torch\nByteStorage",
                                          "torch\nBoolStorage"};
  return g;
}

class Checker {
 public:
  Checker(const std::string& b, const std::string& source) : b_(b), source_(source) {}

  void run() {
    while (pos_ < b_.size()) {
      const size_t at = pos_;
      const auto op = static_cast<uint8_t>(b_[pos_++]);
      if (step(op, at)) return;
    }
    fail(b_.size(), "ends without STOP");
  }

 private:
  [[noreturn]] void fail(size_t at, const std::string& why) const {
    throw Error(fmt::format("{}: malformed pickle at byte {}: {}", source_, at, why));
  }

  uint64_t read_le(size_t n, size_t at) {
    if (b_.size() - pos_ < n) fail(at, "truncated argument");
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i)
      v |= static_cast<uint64_t>(static_cast<uint8_t>(b_[pos_ + i])) << (8 * i);
    pos_ += n;
    return v;
  }

  std::string read_line(size_t at) {
    const size_t nl = b_.find('\n', pos_);
    if (nl == std::string::npos || nl - pos_ > 256) fail(at, "malformed GLOBAL");
    std::string s = b_.substr(pos_, nl - pos_);
    pos_ = nl + 1;
    return s;
  }

  size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }

  void need(size_t n, size_t at, const char* what) const {
    if (stack_.size() < floor() + n) fail(at, fmt::format("{} with too few items", what));
  }

  void push(int depth, size_t at) {
    if (depth > kMaxNesting) fail(at, fmt::format("nested deeper than {}", kMaxNesting));
    if (stack_.size() >= kMaxStack) fail(at, "too many items");
    stack_.push_back(depth);
  }

  // Pops the items above the innermost mark; returns their deepest nesting.
  int pop_to_mark(size_t at, const char* what) {
    if (marks_.empty()) fail(at, fmt::format("{} without MARK", what));
    int deepest = 0;
    for (size_t i = marks_.back(); i < stack_.size(); ++i)
      deepest = std::max(deepest, stack_[i]);
    stack_.resize(marks_.back());
    marks_.pop_back();
    return deepest;
  }

  // Adds items (of nesting `child`) into the container now on top of the stack.
  void into_top(int child, size_t at, const char* what) {
    if (stack_.size() <= floor()) fail(at, fmt::format("{} with no container", what));
    int& top = stack_.back();
    top = std::max(top, child + 1);
    if (top > kMaxNesting) fail(at, fmt::format("nested deeper than {}", kMaxNesting));
  }

  // One opcode; true at STOP.
  bool step(uint8_t op, size_t at) {
    switch (op) {
      case 0x80:  // PROTO
        if (read_le(1, at) > 2) fail(at, "a protocol above 2");
        return false;
      case '.':  // STOP
        if (stack_.size() != 1 || !marks_.empty())
          fail(at, "STOP with a stack of other than one item");
        return true;
      case '(':  // MARK
        if (marks_.size() >= kMaxMarks) fail(at, "too many open MARKs");
        marks_.push_back(stack_.size());
        return false;
      case '}':
      case ']':
      case ')':  // EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE
        push(1, at);
        return false;
      case 'N':
      case 0x88:
      case 0x89:  // NONE, NEWTRUE, NEWFALSE
        push(0, at);
        return false;
      case 'K':
      case 'M':
      case 'J':
      case 'G':
      case 0x8a:
      case 'X':
      case 'c':
        value(op, at);
        return false;
      case 'q':
      case 'r':
      case 'h':
      case 'j':
        memo(op, at);
        return false;
      case 't':
      case 'l':
      case 'd':
      case 0x85:
      case 0x86:
      case 0x87:
        container(op, at);
        return false;
      case 'a':
      case 's':
      case 'e':
      case 'u':
      case 'R':
      case 'b':
      case 'Q':
        fill(op, at);
        return false;
      default:
        fail(at, fmt::format("opcode 0x{:02x} is not one a tensor archive uses", op));
    }
  }

  // An opcode that pushes one value read from its argument.
  void value(uint8_t op, size_t at) {
    switch (op) {
      case 'K':  // BININT1
      case 'M':  // BININT2
      case 'J':  // BININT
      case 'G':  // BINFLOAT
        read_le(op == 'K' ? 1 : op == 'M' ? 2 : op == 'J' ? 4 : 8, at);
        break;
      case 0x8a: {  // LONG1
        const uint64_t n = read_le(1, at);
        if (n > 8) fail(at, "an integer of more than 8 bytes");
        read_le(n, at);
        break;
      }
      case 'X': {  // BINUNICODE
        const uint64_t n = read_le(4, at);
        if (n > kMaxString || n > b_.size() - pos_) fail(at, "a string longer than the data");
        pos_ += n;
        break;
      }
      default: {  // 'c', GLOBAL
        const std::string module = read_line(at);
        const std::string name = read_line(at);
        if (allowed_globals().count(module + "\n" + name) == 0)
          fail(at, fmt::format("global '{}.{}' is not one a tensor archive uses", module, name));
      }
    }
    push(0, at);
  }

  // BINPUT, LONG_BINPUT, BINGET, LONG_BINGET.
  void memo(uint8_t op, size_t at) {
    const uint64_t id = read_le(op == 'q' || op == 'h' ? 1 : 4, at);
    if (op == 'q' || op == 'r') {
      if (id >= kMaxMemo) fail(at, "a memo index out of range");
      if (stack_.empty()) fail(at, "PUT with an empty stack");
      memo_[static_cast<uint32_t>(id)] = stack_.back();
      return;
    }
    const auto it = memo_.find(static_cast<uint32_t>(id));
    if (id >= kMaxMemo || it == memo_.end()) fail(at, "GET of a memo entry never PUT");
    push(it->second, at);
  }

  // TUPLE, LIST, DICT (the items above the mark), TUPLE1..3 (the top 1 to 3 items).
  void container(uint8_t op, size_t at) {
    if (op == 't' || op == 'l' || op == 'd') {
      const size_t n = marks_.empty() ? 0 : stack_.size() - marks_.back();
      if (op == 'd' && n % 2 != 0) fail(at, "DICT of an odd number of items");
      push(pop_to_mark(at, "TUPLE/LIST/DICT") + 1, at);
      return;
    }
    const size_t n = static_cast<size_t>(op - 0x84);
    need(n, at, "TUPLEn");
    push(pop_top(n) + 1, at);
  }

  // APPEND, SETITEM, APPENDS, SETITEMS (into the container below), REDUCE (callable, args),
  // BUILD (object, state), BINPERSID (a storage, named by the tuple on top).
  void fill(uint8_t op, size_t at) {
    if (op == 'a' || op == 's') {
      const size_t n = op == 'a' ? 1 : 2;
      need(n + 1, at, op == 'a' ? "APPEND" : "SETITEM");
      into_top(pop_top(n), at, "APPEND/SETITEM");
    } else if (op == 'e' || op == 'u') {
      if (marks_.empty()) fail(at, "APPENDS/SETITEMS without MARK");
      const size_t n = stack_.size() - marks_.back();
      if (op == 'u' && n % 2 != 0) fail(at, "SETITEMS of an odd number of items");
      const int deepest = pop_to_mark(at, "APPENDS/SETITEMS");
      into_top(deepest, at, "APPENDS/SETITEMS");
    } else if (op == 'R' || op == 'b') {
      need(2, at, op == 'R' ? "REDUCE" : "BUILD");
      const int arg = stack_.back();
      stack_.pop_back();
      stack_.back() = std::max(stack_.back(), arg);
    } else {
      need(1, at, "BINPERSID");
      stack_.back() = 0;
    }
  }

  // Pops the top n items; returns their deepest nesting.
  int pop_top(size_t n) {
    int deepest = 0;
    for (size_t i = 0; i < n; ++i) {
      deepest = std::max(deepest, stack_.back());
      stack_.pop_back();
    }
    return deepest;
  }

  const std::string& b_;
  const std::string& source_;
  size_t pos_ = 0;
  std::vector<int> stack_;  // the nesting depth of each item
  std::vector<size_t> marks_;
  std::unordered_map<uint32_t, int> memo_;
};

}  // namespace

void check_pickle(const std::string& bytes, const std::string& source) {
  Checker(bytes, source).run();
}

}  // namespace sw
