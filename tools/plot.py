#!/usr/bin/env python3
"""Pictures of switch runs, drawn with matplotlib (Debian: python3-matplotlib).

Usage: tools/plot.py DIR [DIR ...]
       tools/plot.py --eval DIR [DIR ...]   (switch-eval's folders only)

A run directory (it holds metrics.jsonl) gets DIR/plots/:
  loss.png         train and val loss against steps and against wall time
  expert_load.png  per MoE layer, the fraction of routed tokens each expert received
                   over the steps (a heatmap; 1/E everywhere is perfect balance)
  dropped.png      fraction of routed tokens dropped over the steps
A sweep directory (it holds sweep.json, written by switch-sweep) gets those for every point,
and DIR/plots/ with all points on one chart: val_loss.png (against steps and wall time) and
train_loss.png; a sweep over the expert count (moe.n_experts, with or without a dense point,
moe.every = 0) also gets experts.png: val loss at equal steps and at equal wall time, and
tokens/s, against the number of experts. A folder written by switch-eval (it holds
eval.json) gets capacity.png (loss and dropped % against the evaluation capacity factor, per
drop policy, dropless as a line) when the file has a capacity curve, and routing.png (per MoE
layer, the fraction of each character's tokens routed to each expert, characters by
frequency) when it has routing. Prints the files it wrote.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run):
    records = []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a torn last line after a crash
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    return train, evals


def plain_text(s):
    """A folder name as matplotlib text: '$' would start mathtext, so it is escaped."""
    return s.replace("$", r"\$")


def save(fig, path, written):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)


def plot_run(run, written):
    train, evals = read_metrics(run)
    if not train:
        return
    out = os.path.join(run, "plots")
    os.makedirs(out, exist_ok=True)
    name = plain_text(os.path.basename(os.path.normpath(run)))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, x in zip(axes, ("step", "time_s")):
        ax.plot([r[x] for r in train], [r["ce"] for r in train], label="train (cross-entropy)",
                lw=1)
        if evals:
            ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], "o-", label="val",
                    ms=3)
        ax.set_xlabel("step" if x == "step" else "wall time (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per character)")
    axes[0].legend()
    fig.suptitle(f"{name}: loss")
    save(fig, os.path.join(out, "loss.png"), written)

    layers = train[0].get("layers") or []
    if layers:
        fig, axes = plt.subplots(len(layers), 1, figsize=(11, 1.2 + 1.6 * len(layers)),
                                 squeeze=False, sharex=True)
        steps = [r["step"] for r in train]
        first = steps[0] - train[0].get("steps_in_record", 1)  # each column is one record
        for li, layer in enumerate(layers):
            E = len(layer["counts"])
            frac = []
            for r in train:
                c = r["layers"][li]["counts"]
                total = float(sum(c)) or 1.0
                frac.append([v / total for v in c])
            ax = axes[li][0]
            im = ax.imshow(list(map(list, zip(*frac))), aspect="auto", origin="lower",
                           cmap="viridis", vmin=0, vmax=max(2.0 / E, 0.05),
                           extent=[first, steps[-1], -0.5, E - 0.5],
                           interpolation="nearest")
            ax.set_ylabel(f"layer {layer['layer']}\nexpert")
            fig.colorbar(im, ax=ax, label="fraction of tokens")
        axes[-1][0].set_xlabel("step")
        fig.suptitle(f"{name}: expert load (balanced = 1/E)")
        save(fig, os.path.join(out, "expert_load.png"), written)

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([r["step"] for r in train], [100 * r.get("drop_frac", 0) for r in train], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("dropped (% of routed tokens)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: dropped tokens")
        save(fig, os.path.join(out, "dropped.png"), written)


def plot_sweep(sweep_dir, written):
    runs = []
    summary = None
    if os.path.exists(os.path.join(sweep_dir, "summary.json")):
        with open(os.path.join(sweep_dir, "summary.json")) as f:
            summary = json.load(f)
        names = [p["point"] for p in summary["points"]]
    else:
        names = sorted(os.listdir(sweep_dir))
    for name in names:
        run = os.path.join(sweep_dir, name)
        if os.path.exists(os.path.join(run, "metrics.jsonl")):
            plot_run(run, written)
            runs.append((name, *read_metrics(run)))
    if not runs:
        return
    out = os.path.join(sweep_dir, "plots")
    os.makedirs(out, exist_ok=True)
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    title = plain_text(os.path.basename(os.path.normpath(sweep_dir)))

    def chart(records_of, key, ylabel, suptitle, filename, style):
        """One figure, every point's curve against steps and against wall time."""
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for i, run in enumerate(runs):
            recs = records_of(run)
            for ax, x in zip(axes, ("step", "time_s")):
                ax.plot([r[x] for r in recs], [r[key] for r in recs], color=cmap(i % cmap.N),
                        label=run[0], **style)
        for ax, label in zip(axes, ("step", "wall time (s)")):
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ylabel)
        axes[1].legend(fontsize=7, loc="upper right")
        fig.suptitle(f"{title}: {suptitle}")
        save(fig, os.path.join(out, filename), written)

    if summary is not None:
        plot_expert_curve(sweep_dir, summary, out, title, written)

    chart(lambda run: run[2], "val_loss", "val loss",
          "validation loss (legend: best val loss first)", "val_loss.png",
          dict(marker="o", ms=2.5, lw=1.2))
    chart(lambda run: run[1], "ce", "train loss (cross-entropy)", "training loss",
          "train_loss.png", dict(lw=1))


def plot_expert_curve(sweep_dir, summary, out, title, written):
    """experts.png when the sweep varies only the expert count (a dense point, moe.every = 0,
    counts as one expert): val loss at equal steps and at equal wall time, and tokens/s,
    against the number of experts."""
    points = [p for p in summary["points"] if p.get("status") == "done"]
    keys = {k for p in summary["points"] for k in (p.get("overrides") or {})}
    if not keys or not keys <= {"moe.n_experts", "moe.every"} or len(points) < 3:
        return
    rows = []
    for p in points:
        with open(os.path.join(sweep_dir, p["point"], "config.json")) as f:
            moe = json.load(f)["moe"]
        experts = 1 if moe["every"] == 0 else moe["n_experts"]
        rows.append((experts, moe["every"] == 0, p))
    rows.sort(key=lambda r: (r[0], not r[1]))
    rows = [r for i, r in enumerate(rows) if i == 0 or r[0] != rows[i - 1][0]]  # one per x
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = [r[0] for r in rows]
    for key, label, style in (("final_val_loss", "val loss at equal steps", "o-"),
                              ("val_at_equal_time", "val loss at equal wall time "
                               f"({summary.get('equal_time_s') or 0:.0f} s)", "s--")):
        ys = [r[2].get(key) for r in rows]
        if all(y is not None for y in ys):  # summaries written before the key was added lack it
            axes[0].plot(xs, ys, style, label=label)
    for x, dense, p in rows:
        if dense:
            axes[0].annotate("dense", (x, p["final_val_loss"]), textcoords="offset points",
                             xytext=(6, 4), fontsize=8)
    axes[1].plot(xs, [r[2]["tokens_per_s"] for r in rows], "o-")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(xs)))
        ax.set_xticklabels([str(x) for x in sorted(set(xs))])
        ax.set_xlabel("experts per MoE layer (1 = dense)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val loss")
    axes[0].legend(fontsize=8)
    axes[1].set_ylabel("training tokens/s")
    fig.suptitle(f"{title}: more experts at the same active compute per token")
    save(fig, os.path.join(out, "experts.png"), written)


def plot_capacity(curve, out, title, written):
    numeric = [p for p in curve if not isinstance(p["capacity_factor"], str)]
    dropless = [p for p in curve if isinstance(p["capacity_factor"], str)]
    policies = list(dict.fromkeys(p["drop_policy"] for p in curve))
    fig, (ax_loss, ax_drop) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in policies:
        pts = sorted((p["capacity_factor"], p["loss"]) for p in numeric if p["drop_policy"] == policy)
        if pts:
            ax_loss.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"drop {policy}")
    if dropless:
        ax_loss.axhline(dropless[0]["loss"], color="black", linestyle="--", linewidth=1,
                        label=f"dropless {dropless[0]['loss']:.4f}")
    ax_loss.set_xlabel("evaluation capacity factor")
    ax_loss.set_ylabel("loss (nats per character)")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)
    # The first policy's drops: the first layer's do not depend on the policy, later layers'
    # barely (they route what the earlier drops made).
    pts = sorted((p for p in numeric if p["drop_policy"] == policies[0]),
                 key=lambda p: p["capacity_factor"])
    if pts:
        for i, layer in enumerate(pts[0]["layers"]):
            ax_drop.plot([p["capacity_factor"] for p in pts],
                         [p["layers"][i]["dropped_pct"] for p in pts], marker="o",
                         label=f"layer {layer['layer']}")
        ax_drop.legend(fontsize=8)
    ax_drop.set_xlabel("evaluation capacity factor")
    ax_drop.set_ylabel("assignments dropped (%)")
    ax_drop.set_title(f"dropped, per MoE layer (drop {policies[0]})")
    for ax in (ax_loss, ax_drop):
        if numeric and min(p["capacity_factor"] for p in numeric) > 0:
            ax.set_xscale("log")
            ticks = sorted({p["capacity_factor"] for p in numeric})
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save(fig, os.path.join(out, "capacity.png"), written)


def plot_routing(routing, out, title, written, max_rows=80):
    chars = routing["characters"][:max_rows]
    layers = routing["layers"]
    if not layers or not chars:
        return
    experts = routing["experts"]
    width = max(2.2, 0.16 * experts + 1.2)
    fig, axes = plt.subplots(1, len(layers), figsize=(width * len(layers) + 1, 0.16 * len(chars) + 1.6),
                             squeeze=False)
    image = None
    for ax, layer in zip(axes[0], layers):
        rows = layer["fraction"][: len(chars)]
        image = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {layer['layer']}\nI(char; expert) {layer['mutual_information_bits']:.2f} bits",
                     fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(chars)))
        ax.set_yticklabels([plain_text(c["label"]) for c in chars], fontsize=6)
        step = max(1, experts // 16)
        ax.set_xticks(range(0, experts, step))
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].set_ylabel("character (commonest first)")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="fraction of the character's tokens")
    more = len(routing["characters"]) - len(chars)
    fig.suptitle(title + (f" ({more} rarer characters not shown)" if more > 0 else ""))
    save(fig, os.path.join(out, "routing.png"), written)


def plot_eval(d, written):
    with open(os.path.join(d, "eval.json")) as f:
        doc = json.load(f)
    ck = doc["checkpoint"]
    data = doc["data"]
    title = plain_text(f"{os.path.basename(os.path.normpath(ck['run']))}, step {ck['step']}, "
                       f"{data['split']} ({data['characters']} characters)")
    if "capacity_curve" in doc:
        plot_capacity(doc["capacity_curve"], d, title, written)
    if "routing" in doc:
        plot_routing(doc["routing"], d, title, written)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) >= 2 else 2
    written = []
    sweeps = []
    if argv[1] == "--eval":  # switch-eval's folders, whatever else they hold
        for d in argv[2:]:
            plot_eval(d, written)
        for w in written:
            print(f"plot: {w}")
        return 0
    for d in argv[1:]:
        if os.path.exists(os.path.join(d, "sweep.json")):
            plot_sweep(d, written)
            sweeps.append(os.path.join(d, "plots"))
        elif os.path.exists(os.path.join(d, "metrics.jsonl")):
            plot_run(d, written)
        elif os.path.exists(os.path.join(d, "eval.json")):
            plot_eval(d, written)
        else:
            print(f"plot.py: '{d}' is neither a run (metrics.jsonl), a sweep (sweep.json) nor "
                  "an evaluation (eval.json)",
                  file=sys.stderr)
            return 2
    top = [w for w in written if os.path.dirname(w) in sweeps]
    per_run = [w for w in written if w not in top]
    for w in top:
        print(f"plot: {w}")
    runs = sorted({os.path.dirname(w) for w in per_run})
    if len(runs) == 1:
        for w in per_run:
            print(f"plot: {w}")
    elif runs:
        print(f"plot: {len(per_run)} more in the plots/ directory of each of {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
