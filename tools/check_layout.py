#!/usr/bin/env python3
"""Checks two rules of the source layout and exits 1 when one is broken.

1. The folders under src/ depend one way, down the layers of LAYERS: a folder includes
   ("folder/file.h") only its own files and those of lower layers, so there is no cycle.
2. No function in src/ is longer than --max-lines lines (body braces included), tables
   aside: a function whose body is one initialized table is exempt (see TABLE_FUNCTIONS).

Usage: tools/check_layout.py [--src DIR] [--max-lines N] [--list N]
"""
import argparse
import os
import re
import sys

# The folders, lowest first; a folder may include from its own layer's other folders only
# where SAME_LAYER allows, and from every lower layer.
LAYERS = [
    ["util"],
    ["config", "data", "distributed"],
    ["model"],
    ["train"],
    ["sweep", "bench", "sample", "eval", "board"],
    ["cli"],
]
SAME_LAYER = set()

# Words that may end a function's head before its body: `f() const {`, `g() override {`.
FUNCTION_TAIL_WORDS = {"const", "override", "final", "noexcept", "mutable", "try"}

# Functions that are one table of data (a static initializer list), named by file and name.
TABLE_FUNCTIONS = {
    ("config/config.cpp", "bindings"),
}


def strip_code(text):
    """Blanks comments, string and character literals (newlines kept, so lines still count)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "R" and text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'R"([^(\s]*)\(', text[i:])
            if not m:
                out.append(c)
                i += 1
                continue
            end = ")" + m.group(1) + '"'
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + re.sub(r"[^\n]", " ", text[i + 2:j]))
            i = j
        elif c in "\"'":
            if c == "'" and i > 0 and text[i - 1].isalnum() and i + 1 < n and text[i + 1].isalnum():
                out.append(" ")  # digit separator, 1'000
                i += 1
                continue
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(c + " " * (j - i - 1) + c)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def functions(text):
    """Yields (name, first line, last line) of every function body outside another one."""
    code = strip_code(text)
    stack = []  # 'ns', 'class', 'func', 'other'
    head_start = 0  # where the text before the next brace starts
    line_of = lambda pos: code.count("\n", 0, pos) + 1
    for m in re.finditer(r"[{};]", code):
        ch, pos = m.group(), m.start()
        if ch == ";":
            if not any(k[0] in ("func", "other") for k in stack):
                head_start = pos + 1
            continue
        if ch == "{":
            inside = any(k[0] in ("func", "other") for k in stack)
            head = code[head_start:pos]
            tail = head.rstrip()
            last = re.search(r"(\w+)\s*$", tail)
            if inside:
                stack.append(("other", pos, None))
            elif head.count("(") > head.count(")") or (
                    last and last.group(1) not in FUNCTION_TAIL_WORDS and "->" not in head
                    and "(" in head and not re.search(r"\b(class|struct|union|enum|namespace)\b", head)):
                # A brace initializer in a signature or a constructor's initializer list,
                # `f(std::vector<int> v = {})` or `: a_{x}`: part of the function's head.
                stack.append(("init", pos, None))
                continue
            elif re.search(r"\bnamespace\b", head) or re.search(r'extern\s+""\s*$', head):
                stack.append(("ns", pos, None))
            elif re.search(r"\b(class|struct|union|enum)\b[^()]*$", head):
                stack.append(("class", pos, None))
            elif re.search(r"=\s*$", head) or "(" not in head:
                stack.append(("other", pos, None))
            else:
                name = re.findall(r"([~\w:]+|operator\s*\S+)\s*\(", head)
                stack.append(("func", pos, name[0] if name else "?"))
            head_start = pos + 1
        else:  # '}'
            if not stack:
                continue
            kind, start, name = stack.pop()
            if kind == "init":
                continue
            if kind == "func" and not any(k[0] in ("func", "other") for k in stack):
                yield name, line_of(start), line_of(pos)
            if not any(k[0] in ("func", "other") for k in stack):
                head_start = pos + 1

def include_graph(src):
    edges = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith((".h", ".cpp")):
                continue
            path = os.path.join(root, f)
            folder = os.path.relpath(path, src).split(os.sep)[0]
            with open(path, encoding="utf-8") as fh:
                for m in re.finditer(r'^\s*#\s*include\s+"([^"/]+)/', fh.read(), re.M):
                    if m.group(1) != folder:
                        edges.setdefault(folder, {}).setdefault(m.group(1), []).append(
                            os.path.relpath(path, src))
    return edges


def find_cycle(edges):
    state = {}
    path = []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(edges.get(u, {})):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if not state.get(v):
                c = visit(v)
                if c:
                    return c
        state[u] = 2
        path.pop()
        return None

    for u in sorted(edges):
        if not state.get(u):
            c = visit(u)
            if c:
                return c
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "src"))
    ap.add_argument("--max-lines", type=int, default=100)
    ap.add_argument("--list", type=int, default=0, help="print the N longest functions")
    args = ap.parse_args()
    src = os.path.normpath(args.src)
    ok = True

    edges = include_graph(src)
    cycle = find_cycle(edges)
    if cycle:
        ok = False
        print("include cycle between src/ folders: " + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            print(f"  {a} -> {b}: " + ", ".join(sorted(set(edges[a][b]))))
    layer = {f: i for i, fs in enumerate(LAYERS) for f in fs}
    folders = {d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d))}
    for f in sorted(folders - set(layer)):
        ok = False
        print(f"src/{f}/ is in no layer: add it to LAYERS in tools/check_layout.py")
    for a in sorted(edges):
        for b in sorted(edges[a]):
            if a not in layer or b not in layer:
                continue
            if layer[b] > layer[a] or (layer[b] == layer[a] and (a, b) not in SAME_LAYER):
                ok = False
                print(f"src/{a}/ includes src/{b}/, which is not below it "
                      f"({', '.join(sorted(set(edges[a][b])))}); layers, lowest first: "
                      + " < ".join("/".join(fs) for fs in LAYERS))

    found = []
    for root, _, files in os.walk(src):
        for f in sorted(files):
            if not f.endswith((".h", ".cpp")):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            for name, first, last in functions(text):
                found.append((last - first + 1, rel, first, name))
    found.sort(reverse=True)
    for length, rel, first, name in found[: args.list]:
        print(f"{length:5d}  src/{rel}:{first}  {name}")
    for length, rel, first, name in found:
        short = name.split("::")[-1]
        if length > args.max_lines and (rel, short) not in TABLE_FUNCTIONS:
            ok = False
            print(f"src/{rel}:{first}: {name} is {length} lines (at most {args.max_lines}; "
                  "split it into named steps)")
    if not found:
        ok = False
        print(f"no functions found under {src}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
