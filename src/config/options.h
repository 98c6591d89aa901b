// The config's enumerated options (model.activation, moe.score, moe.balance, moe.overflow,
// moe.drop_policy, moe.dropped, moe.strategy, train.on_nonfinite): each an enum with one
// table of names. Config files,
// --set, validation, --list-keys, docs/config.md and switch-bench read these tables, so a
// new value is one row here plus its implementation. Strings are parsed once, at config
// load; the rest of the project sees only the enums.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace sw {

enum class Activation { Gelu, Relu, Swiglu };
enum class DropPolicy { Random, Position, Probability };
enum class DroppedOutput { Pass, Zero };
enum class Strategy { Loop, Capacity, Grouped };
enum class OnNonfinite { Stop, Skip };
enum class Score { Softmax, Sigmoid };
enum class Balance { AuxLoss, Bias, Variance, None };
enum class Overflow { Drop, Reroute };

// One value of an option: its name in configs and what it means.
template <typename E>
struct Choice {
  E value;
  const char* name;
  const char* doc;
};

// The table of E's values, in the order they are listed (options.cpp).
template <typename E>
const std::vector<Choice<E>>& choices();
template <>
const std::vector<Choice<Activation>>& choices<Activation>();
template <>
const std::vector<Choice<DropPolicy>>& choices<DropPolicy>();
template <>
const std::vector<Choice<DroppedOutput>>& choices<DroppedOutput>();
template <>
const std::vector<Choice<Strategy>>& choices<Strategy>();
template <>
const std::vector<Choice<OnNonfinite>>& choices<OnNonfinite>();
template <>
const std::vector<Choice<Score>>& choices<Score>();
template <>
const std::vector<Choice<Balance>>& choices<Balance>();
template <>
const std::vector<Choice<Overflow>>& choices<Overflow>();

template <typename E>
const char* name_of(E value) {
  for (const auto& c : choices<E>())
    if (c.value == value) return c.name;
  return "?";
}

template <typename E>
std::optional<E> choice_named(const std::string& name) {
  for (const auto& c : choices<E>())
    if (name == c.name) return c.value;
  return std::nullopt;
}

// The names, as "a | b | c".
template <typename E>
std::string choice_list() {
  std::string out;
  for (const auto& c : choices<E>())
    out += (out.empty() ? "" : " | ") + std::string(c.name);
  return out;
}

}  // namespace sw
