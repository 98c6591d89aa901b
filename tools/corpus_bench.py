#!/usr/bin/env python3
"""What a large corpus costs: preparing its token file, starting on it, and memory.

Writes a text of Tiny Shakespeare repeated --copies times (190: 212 MB), then measures
  1. `switch-train --prepare-data` on it, fresh: wall time and MB/s of UTF-8 text;
  2. the same again, prepared: the check of the text and the mapping of its token file;
  3. the same short training run (configs/tiny.json, --steps steps) on Tiny Shakespeare and on
     the large text: wall time and peak RSS of each. The difference in peak RSS over the
     difference in characters is what the corpus costs per character above the model.

Usage: tools/corpus_bench.py [--build build] [--dir /tmp/switch-corpus-bench] [--copies 190]
                             [--steps 30] [--keep] [--baseline OLD_SWITCH_TRAIN]
--baseline runs the same training with another switch-train binary (e.g. one built from an
earlier commit) on the large text too, for its peak RSS.
Run it on a quiet machine: nothing else building or training.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measured(cmd):
    """Runs cmd; its wall time (s), its own peak RSS (bytes) and its output."""
    t0 = time.monotonic()
    with open(os.devnull, "rb") as stdin:
        p = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = p.stdout.read().decode("utf-8", "replace")
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"corpus_bench: {' '.join(cmd)} failed ({p.returncode}):\n{out}")
    return wall, usage.ru_maxrss * 1024, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--dir", default="/tmp/switch-corpus-bench")
    ap.add_argument("--copies", type=int, default=190)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--keep", action="store_true", help="keep the large text and its files")
    ap.add_argument("--baseline", help="another switch-train binary to compare")
    a = ap.parse_args()

    train = os.path.join(a.build, "switch-train")
    ts = os.path.join(ROOT, "data", "tinyshakespeare.txt")
    tiny = os.path.join(ROOT, "configs", "tiny.json")
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    big = os.path.join(a.dir, f"tinyshakespeare_x{a.copies}.txt")
    with open(ts, "rb") as f:
        piece = f.read()
    with open(big, "wb") as f:
        for _ in range(a.copies):
            f.write(piece)
    text_mb = len(piece) * a.copies / 1e6
    ts_chars = len(piece.decode("utf-8"))
    big_chars = ts_chars * a.copies

    def train_run(path, name, binary=train):
        return [binary, "--config", tiny, "--set", f"data.path={path}", "--set",
                f"train.steps={a.steps}", "--set", f"train.checkpoint_every={a.steps}",
                "--out", os.path.join(a.dir, name), "-q"]

    subprocess.run([train, "--prepare-data", "-q", "--set", f"data.path={ts}"], check=True)
    ts_wall, ts_rss, _ = measured(train_run(ts, "run_ts"))
    prep_wall, prep_rss, prep_out = measured([train, "--prepare-data", "--set", f"data.path={big}"])
    m = re.search(r"in ([0-9.]+) s \(([0-9]+) MB/s\)", prep_out)
    again_wall, _, again_out = measured([train, "--prepare-data", "--set", f"data.path={big}"])
    if "up to date" not in again_out:
        sys.exit(f"corpus_bench: the second --prepare-data prepared again:\n{again_out}")
    big_wall, big_rss, _ = measured(train_run(big, "run_big"))

    base = None
    if a.baseline:
        base_wall, base_rss, _ = measured(train_run(big, "run_baseline", a.baseline))
        base = (base_rss - ts_rss) / (big_chars - ts_chars)
    per_char = (big_rss - ts_rss) / (big_chars - ts_chars)
    tokens = os.path.getsize(big + ".tokens")
    print(f"text: {big}: {text_mb:.1f} MB, {big_chars} characters; token file {tokens / 1e6:.1f} MB")
    print(f"prepare (fresh):    {prep_wall:6.2f} s wall, {text_mb / prep_wall:5.0f} MB/s of text "
          f"(its own timing: {m.group(1)} s, {m.group(2)} MB/s), peak RSS {prep_rss / 2**20:.0f} MiB")
    print(f"prepare (prepared): {again_wall:6.2f} s wall (check the text, map its token file)")
    print(f"tiny run, {a.steps} steps, Tiny Shakespeare: {ts_wall:6.2f} s wall, "
          f"peak RSS {ts_rss / 2**20:.0f} MiB")
    print(f"tiny run, {a.steps} steps, large text:       {big_wall:6.2f} s wall, "
          f"peak RSS {big_rss / 2**20:.0f} MiB")
    print(f"start-up cost of the large text: {big_wall - ts_wall:+.2f} s; memory above the model: "
          f"{per_char:.3f} bytes per character")
    if base is not None:
        print(f"baseline {a.baseline} on the large text: {base_wall:6.2f} s wall, peak RSS "
              f"{base_rss / 2**20:.0f} MiB, {base:.3f} bytes per character above the model")
    print(json.dumps({"text_mb": text_mb, "characters": big_chars, "prepare_s": prep_wall,
                      "prepare_mb_per_s": text_mb / prep_wall, "check_and_map_s": again_wall,
                      "ts_run_s": ts_wall, "big_run_s": big_wall, "ts_peak_rss": ts_rss,
                      "big_peak_rss": big_rss, "bytes_per_char": per_char, "baseline_bytes_per_char": base}))
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
