// File-system helpers for writing things whole or not at all: a file is written under a
// temporary name, flushed to disk, then renamed over its final name.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace sw {

// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename,
// fsync of the directory). Throws sw::Error naming the path on any failure; on failure the
// previous content of `path`, if any, is untouched.
void write_file_atomic(const std::string& path, const std::string& bytes);
void write_file_atomic(const std::string& path, const std::vector<char>& bytes);

// Reads a whole regular file of at most `max_bytes`; throws sw::Error naming `what` and the
// path otherwise (a directory, FIFO or device is refused without blocking on it).
std::string read_file(const std::string& path, const std::string& what,
                      size_t max_bytes = size_t{1} << 40);

// Flushes a file or directory to disk; throws sw::Error on failure.
void fsync_path(const std::string& path);

}  // namespace sw
