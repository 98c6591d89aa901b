"""switch's checkpoints from Python with PyTorch alone: model.pt under
torch.load(weights_only=True), model.safetensors read by an independent reader written here
from the format's definition, and python/switch_torch.py against the binaries: its val_loss
on the run's fixed batches equals the recorded one to 1e-5, its per-layer routing equals
switch-eval's, its greedy text equals switch-sample --temperature 0's.

    test_switch_torch.py --bin-dir build --data data/tinyshakespeare.txt [--only NAME]

Exit 0: all passed; 77: PyTorch for Python is missing (skipped, with a message); 1: a failure.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

try:
    import torch
except ImportError:
    print("SKIPPED: this Python cannot import torch; on Debian: apt-get install python3-torch "
          "(tools/setup.sh installs it)")
    sys.exit(77)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.dont_write_bytecode = True  # nothing written into the source tree
import switch_torch  # noqa: E402

TINY = os.path.join(ROOT, "configs", "tiny.json")
DEFAULT = os.path.join(ROOT, "configs", "default.json")
# name, config, --set overrides, ranks. Eval capacity factors below 1 make evaluation drop,
# so that the drop policies, rerouting and what a dropped token outputs are all exercised.
CASES = [
    ("default", DEFAULT,
     ["train.steps=100", "train.eval_every=100", "train.checkpoint_every=100"], 1),
    ("tiny", TINY, [], 1),
    ("top2-sigmoid-bias-reroute", TINY,
     ["moe.top_k=2", "moe.score=sigmoid", "moe.balance=bias", "moe.overflow=reroute",
      "moe.eval_capacity_factor=1.0", "moe.bias_rate=0.01"], 1),
    ("swiglu-shared-fine-probability-zero", TINY,
     ["model.activation=swiglu", "moe.shared_experts=1", "moe.d_expert=32", "moe.n_experts=8",
      "moe.drop_policy=probability", "moe.dropped=zero", "moe.eval_capacity_factor=0.5",
      "model.pos_emb=false", "model.n_layers=3", "moe.every=2"], 1),
    ("relu-position-unscaled-top2", TINY,
     ["model.activation=relu", "moe.drop_policy=position", "moe.is_scale_prob=false",
      "moe.top_k=2", "moe.eval_capacity_factor=0.7", "moe.balance=variance"], 1),
    ("random-drop-pass", TINY, ["moe.eval_capacity_factor=0.5"], 1),
    ("dropless", TINY, ["moe.drop_tokens=false", "moe.strategy=capacity"], 1),
    ("dense", TINY, ["moe.every=0"], 1),
    ("two-ranks", TINY, ["moe.eval_capacity_factor=0.5"], 2),
]
PROMPT = "ROMEO:\nWhat"
CHARS = 300


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise Failure(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def safetensors_by_definition(path):
    """The format as its definition gives it: u64 little-endian N, N bytes of JSON, data."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    check(8 + n <= len(raw), f"{path}: header length {n} past the end")
    check(n % 8 == 0, f"{path}: the header ({n} bytes) does not pad the data to 8-byte alignment")
    text = raw[8:8 + n].decode("utf-8")
    check(text.startswith("{"), f"{path}: the header does not start with '{{'")
    header = json.loads(text)
    data = raw[8 + n:]
    meta = header.pop("__metadata__")
    check(all(isinstance(v, str) for v in meta.values()), "__metadata__ values must be strings")
    sizes = {"F32": 4, "F64": 8, "I64": 8}
    codes = {"F32": "f", "F64": "d", "I64": "q"}
    out, spans = {}, []
    for name, e in header.items():
        check(set(e) == {"dtype", "shape", "data_offsets"}, f"{name}: entry keys {sorted(e)}")
        begin, end = e["data_offsets"]
        count = 1
        for s in e["shape"]:
            count *= s
        check(end - begin == count * sizes[e["dtype"]], f"{name}: offsets do not fit the shape")
        check(begin % sizes[e["dtype"]] == 0, f"{name}: data not aligned to its element size")
        values = struct.unpack(f"<{count}{codes[e['dtype']]}", data[begin:end])
        out[name] = torch.tensor(values, dtype=torch.float32).reshape(e["shape"])
        spans.append((begin, end))
    spans.sort()
    check(spans[0][0] == 0 and spans[-1][1] == len(data) and
          all(a[1] == b[0] for a, b in zip(spans, spans[1:])),
          f"{path}: the data is not covered exactly (gap or overlap)")
    return out, meta


def one_case(name, config, sets, ranks, args, work):
    out = os.path.join(work, name)
    cmd = [os.path.join(args.bin_dir, "switch-train"), "--config", config, "--out", out, "-q",
           "--set", f"data.path={args.data}"]
    for s in sets:
        cmd += ["--set", s]
    if config == TINY:  # long enough for a greedy text of more than one character
        cmd += ["--set", "train.steps=300", "--set", "train.eval_every=300",
                "--set", "train.checkpoint_every=300"]
    if ranks > 1:
        cmd += ["--nproc", str(ranks)]
    run(cmd)
    model = switch_torch.load(out)
    ckpt = model.checkpoint

    # model.pt: the weights-only unpickler, a plain dict of tensors.
    pt = torch.load(os.path.join(ckpt, "model.pt"), weights_only=True)
    check(type(pt) is dict and all(torch.is_tensor(v) for v in pt.values()),
          "model.pt is not a plain {name: tensor} dict")
    for f in ("optim.pt", "rng.pt"):
        d = torch.load(os.path.join(ckpt, f), weights_only=True)
        check(type(d) is dict and d, f"{f} is not a plain dict of tensors")
    # model.safetensors: same names, shapes and values; metadata with the config and vocab.
    st, meta = safetensors_by_definition(os.path.join(ckpt, "model.safetensors"))
    check(sorted(st) == sorted(pt), f"safetensors names {sorted(st)} != model.pt's {sorted(pt)}")
    for k in pt:
        check(st[k].shape == pt[k].shape and torch.equal(st[k], pt[k]),
              f"tensor {k} differs between model.pt and model.safetensors")
    module_st, _ = switch_torch.read_safetensors(os.path.join(ckpt, "model.safetensors"))
    check(all(torch.equal(module_st[k], pt[k]) for k in pt),
          "switch_torch's safetensors reader differs")
    with open(os.path.join(ckpt, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    check(json.loads(meta["config"]) == state["config"], "metadata config != state.json's")
    check(meta["vocab"] == state["vocab"], "metadata vocab != state.json's")
    check(meta["format"] == "pt" and int(meta["step"]) == state["step"], f"metadata {meta}")
    # The model holds exactly the checkpoint's tensors (load_state_dict is strict).
    check(sorted(model.state_dict()) == sorted(pt), "the Python model's names differ")

    # The recorded val_loss on the run's fixed batches.
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        evals = [json.loads(line) for line in f if '"kind":"eval"' in line]
    recorded = next(e["val_loss"] for e in evals if e["step"] == state["step"])
    batches = switch_torch.eval_batches(model, args.data)
    mine = switch_torch.evaluate(model, batches, ranks=ranks)
    check(abs(mine - recorded) <= 1e-5, f"val loss {mine} vs recorded {recorded}")

    # Routing: switch-eval's per-layer loads, drops and reroutes on the same batches.
    report = json.loads(run([os.path.join(args.bin_dir, "switch-eval"), "--run", out, "--json"]))
    check(report["data"]["batches"] == len(batches), f"switch-eval scored {report['data']}")
    layers = {}
    for share in range(ranks):
        for i, (x, _) in enumerate(batches):
            rows = x.shape[0] // ranks
            gen = torch.Generator().manual_seed(switch_torch.EVAL_DROP_SEED + i)
            for r in model(x[share * rows:(share + 1) * rows], generator=gen)[1]:
                acc = layers.setdefault(r["layer"], {"counts": 0, "dropped": 0, "rerouted": 0})
                acc["counts"] = acc["counts"] + torch.bincount(
                    r["expert"].reshape(-1), minlength=model.cfg["moe"]["n_experts"])
                acc["dropped"] += int(r["dropped"].sum())
                acc["rerouted"] += int(((r["seated"] != r["expert"]) & ~r["dropped"]).sum())
    check(len(report["layers"]) == len(layers), "switch-eval reports another number of layers")
    for rep in report["layers"]:
        acc = layers[rep["layer"]]
        total = int(acc["counts"].sum())
        load = (acc["counts"].double() / total).tolist()
        check(all(abs(a - b) < 1e-12 for a, b in zip(load, rep["load"])),
              f"layer {rep['layer']}: load {load} vs switch-eval {rep['load']}")
        for what in ("dropped", "rerouted"):
            pct = 100.0 * acc[what] / total
            check(abs(pct - rep[f"{what}_pct"]) < 1e-9,
                  f"layer {rep['layer']}: {what} {pct}% vs switch-eval {rep[f'{what}_pct']}%")

    # Greedy text, past the context (it slides).
    want = run([os.path.join(args.bin_dir, "switch-sample"), "--run", out, "--prompt", PROMPT,
                "--chars", str(CHARS), "--temperature", "0"])
    got = PROMPT + model.generate(PROMPT, CHARS, temperature=0)
    check(want.rstrip("\n") == got.rstrip("\n"), f"greedy text differs:\n{want!r}\n{got!r}")
    drops = sum(v["dropped"] for v in layers.values())
    moved = sum(v["rerouted"] for v in layers.values())
    return (f"val_loss {mine:.6f} (recorded {recorded:.6f}, difference {abs(mine - recorded):.2g}); "
            f"in evaluation {drops} dropped, "
            f"{moved} rerouted; greedy text of {len(set(got))} distinct characters")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--only", help="run only the case of this name")
    args = ap.parse_args()
    args.data = os.path.abspath(args.data)
    torch.set_num_threads(2)
    if args.only and args.only not in [c[0] for c in CASES]:
        print(f"--only {args.only}: no such case; the cases are {[c[0] for c in CASES]}")
        return 2
    failed = 0
    with tempfile.TemporaryDirectory(prefix="switch-py-") as work:
        for name, config, sets, ranks in CASES:
            if args.only and name != args.only:
                continue
            try:
                print(f"ok   {name}: {one_case(name, config, sets, ranks, args, work)}", flush=True)
            except Failure as e:
                failed += 1
                print(f"FAIL {name}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
