// A pass over a pickle before LibTorch's unpickler sees it. That unpickler (1.13) trusts
// its input: an opcode that pops more than the stack holds, a memo index out of range or
// a container nested a million deep makes it read past its stack or overflow the C++ one.
// This pass walks the opcodes the project's archives use (protocol 2: those of
// torch::pickle_save), simulates the stack, the marks, the memo and the nesting, and
// accepts only known globals, so what reaches the unpickler is well formed.
#pragma once

#include <string>

namespace sw {

// Throws sw::Error naming `source`, the byte offset and what is wrong.
void check_pickle(const std::string& bytes, const std::string& source);

}  // namespace sw
