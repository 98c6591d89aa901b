// The page's files, built into the binary from src/board/page/ (tools/embed_assets.cmake),
// so that switch-board serves them from wherever it is installed.
#pragma once

#include <string_view>

namespace sw {

struct Asset {
  const char* name;  // its file name: index.html, board.js, board.css
  std::string_view body;
};

// Every file of src/board/page/; nullptr-named entry ends the list.
extern const Asset kBoardAssets[];

}  // namespace sw
