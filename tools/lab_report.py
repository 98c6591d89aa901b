#!/usr/bin/python3
"""The MoE lab's table and pictures from a switch-sweep folder of configs/sweeps/lab.json.

    tools/lab_report.py runs/lab [--figures docs/figures] [--runs docs/lab-runs.json] > lab.md

--runs keeps each finished run's figures (its eval curve, wall time, load CV, dropped and
rerouted fractions) in a small JSON file and reads them back: runs measured in an earlier
session count with the sweep folder's (a run in both is taken from the folder).

Points are named <variant>_seed-<seed>. For each variant over its seeds: final val loss
(mean, and min..max over seeds), val loss at equal wall time, the load CV (std / mean of
the assignments per expert, per train record of the second half of training, mean over
records and MoE layers), the dropped and rerouted fractions and the wall time. An
upcycled variant's wall time includes its dense source's (`upcycled-1500` starts from
`dense-1500` of the same seed). A difference to the `switch` baseline is called beyond the
seed spread only when the seeds' ranges do not overlap (every seed of one variant better
than every seed of the other).
"""
import argparse
import json
import math
import os
import re
import statistics
import sys

GROUPS = [
    ("balance", ["switch", "bias", "variance", "no-balance"]),
    ("shared experts", ["switch", "shared-1"]),
    ("fine-grained experts", ["switch", "fine-16x128-k4", "fine-64x32-k16"]),
    ("score", ["switch", "sigmoid", "top2", "sigmoid-top2"]),
    ("overflow", ["cf1.0", "reroute-cf1.0", "switch", "reroute"]),
    ("upcycling", ["dense", "upcycled-1500", "switch"]),
]
SOURCES = {"upcycled-1500": "dense-1500"}


def read_run(path):
    records = []
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a torn last line
    summary = None
    if os.path.exists(os.path.join(path, "summary.json")):
        with open(os.path.join(path, "summary.json")) as f:
            summary = json.load(f)
    return records, summary


def cv(counts):
    m = sum(counts) / len(counts)
    if m <= 0:
        return None
    return math.sqrt(sum((c - m) ** 2 for c in counts) / len(counts)) / m


def run_stats(records, offset_s=0.0):
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last_step = train[-1]["step"] if train else 0
    cvs, dropped, rerouted, routed = [], 0, 0, 0
    for r in train:
        for layer in r.get("layers", []):
            routed += layer["tokens"]
            dropped += layer["dropped"]
            rerouted += layer.get("rerouted", 0)
            if r["step"] > last_step / 2 and len(layer["counts"]) > 1:
                c = cv(layer["counts"])
                if c is not None:
                    cvs.append(c)
    curve = [(r["step"], r["time_s"] + offset_s, r["val_loss"]) for r in evals]
    return {
        "final_val": evals[-1]["val_loss"] if evals else None,
        "curve": curve,
        "wall_s": (train[-1]["time_s"] if train else 0.0) + offset_s,
        "load_cv": statistics.mean(cvs) if cvs else None,
        "drop_pct": 100.0 * dropped / routed if routed else None,
        "reroute_pct": 100.0 * rerouted / routed if routed else None,
        "steps": last_step,
    }


def val_at_time(curve, t):
    """Val loss at wall time t, linear between evaluations; None past the last one."""
    prev = None
    for _, ts, v in curve:
        if ts >= t:
            if prev is None:
                return v if ts == t else None
            (t0, v0) = prev
            return v0 + (v - v0) * (t - t0) / (ts - t0) if ts > t0 else v
        prev = (ts, v)
    return None


def collect(sweep_dir):
    by_variant = {}
    pattern = re.compile(r"^(.*)_seed-(\d+)$")
    names = sorted(os.listdir(sweep_dir)) if os.path.isdir(sweep_dir) else []
    for name in names:
        m = pattern.match(name)
        path = os.path.join(sweep_dir, name)
        if not m or not os.path.exists(os.path.join(path, "metrics.jsonl")):
            continue
        records, summary = read_run(path)
        if summary is None:
            continue  # not finished
        variant, seed = m.group(1), int(m.group(2))
        offset = 0.0
        if variant in SOURCES:
            src = os.path.join(sweep_dir, f"{SOURCES[variant]}_seed-{seed}")
            src_records, _ = read_run(src)
            offset = run_stats(src_records)["wall_s"]
        by_variant.setdefault(variant, {})[seed] = run_stats(records, offset)
    return by_variant


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), min(values), max(values)


def beyond_spread(a, b):
    """'better' / 'worse' when a's seeds all beat / lose to b's, else 'within spread'."""
    a = [v for v in a if v is not None]
    b = [v for v in b if v is not None]
    if len(a) < 2 or len(b) < 2:
        return "one seed: no spread"
    if max(a) < min(b):
        return "better, beyond spread"
    if min(a) > max(b):
        return "worse, beyond spread"
    return "within spread"


def fmt(x, f="{:.4f}"):
    return "" if x is None else f.format(x)


def table(by_variant, equal_t):
    base = [r["final_val"] for r in by_variant.get("switch", {}).values()]
    base_t = [val_at_time(r["curve"], equal_t) for r in by_variant.get("switch", {}).values()]
    out = []
    for group, variants in GROUPS:
        present = [v for v in variants if v in by_variant]
        if not present:
            continue
        out.append(f"\n**{group}**\n")
        out.append(
            f"| variant | seeds | final val (min..max) | vs switch | val @ {equal_t:.0f} s "
            "| vs switch | load CV | dropped % | rerouted % | wall s |"
        )
        out.append("|---|---:|---|---|---|---|---:|---:|---:|---:|")
        for v in present:
            runs = list(by_variant[v].values())
            finals = [r["final_val"] for r in runs]
            at_t = [val_at_time(r["curve"], equal_t) for r in runs]
            s, st = spread(finals), spread(at_t)
            cvs = spread([r["load_cv"] for r in runs])
            drop = spread([r["drop_pct"] for r in runs])
            rer = spread([r["reroute_pct"] for r in runs])
            wall = spread([r["wall_s"] for r in runs])
            cmp_final = "" if v == "switch" else beyond_spread(finals, base)
            cmp_t = "" if v == "switch" else beyond_spread(at_t, base_t)
            out.append(
                f"| {v} | {len(runs)} | "
                + (f"{s[0]:.4f} ({s[1]:.4f}..{s[2]:.4f})" if s else "")
                + f" | {cmp_final} | "
                + (f"{st[0]:.4f} ({st[1]:.4f}..{st[2]:.4f})" if st else "")
                + f" | {cmp_t} | {fmt(cvs and cvs[0], '{:.3f}')} | {fmt(drop and drop[0], '{:.2f}')}"
                + f" | {fmt(rer and rer[0], '{:.2f}')} | {fmt(wall and wall[0], '{:.0f}')} |"
            )
    return "\n".join(out)


def plot(by_variant, fig_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for group, variants in GROUPS:
        present = [v for v in variants if v in by_variant]
        if len(present) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for v in present:
            runs = list(by_variant[v].values())
            for ax, col, label in ((axes[0], 0, "step"), (axes[1], 1, "wall s")):
                xs = [[p[col] for p in r["curve"]] for r in runs]
                ys = [[p[2] for p in r["curve"]] for r in runs]
                n = min(len(y) for y in ys)
                x = [statistics.mean(xx[i] for xx in xs) for i in range(n)]
                y = [statistics.mean(yy[i] for yy in ys) for i in range(n)]
                lo = [min(yy[i] for yy in ys) for i in range(n)]
                hi = [max(yy[i] for yy in ys) for i in range(n)]
                line = ax.plot(x, y, marker=".", label=f"{v} ({len(runs)} seeds)")[0]
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
                ax.set_xlabel(label)
        for ax in axes:
            ax.set_ylabel("val loss")
            ax.set_ylim(top=min(2.2, ax.get_ylim()[1]))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"MoE lab: {group} (mean over seeds, band: min..max)")
        fig.tight_layout()
        path = os.path.join(fig_dir, "lab-" + group.replace(" ", "_") + ".png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--figures", help="write one picture per group into this folder")
    ap.add_argument("--runs", help="JSON file of runs' figures: read, merged, written back")
    args = ap.parse_args()
    by_variant = collect(args.sweep_dir)
    if args.runs:
        kept = {}
        if os.path.exists(args.runs):
            with open(args.runs) as f:
                kept = json.load(f)
        for variant, runs in kept.items():
            for seed, stats in runs.items():
                by_variant.setdefault(variant, {}).setdefault(int(seed), stats)
        with open(args.runs, "w") as f:
            json.dump(by_variant, f, indent=0, sort_keys=True)
            f.write("\n")
    if not by_variant:
        sys.exit(f"lab_report: no finished <variant>_seed-<n> runs in {args.sweep_dir}")
    # Equal wall time: the shortest finished run's, so every run has reached it.
    shown = {v for _, vs in GROUPS for v in vs}
    equal_t = min(r["wall_s"] for v, runs in by_variant.items() if v in shown for r in runs.values())
    print(table(by_variant, equal_t))
    if args.figures:
        for path in plot(by_variant, args.figures):
            print(f"\n![{os.path.basename(path)}]({os.path.relpath(path, 'docs')})")


if __name__ == "__main__":
    main()
