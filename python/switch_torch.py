"""A one-file PyTorch model of switch's checkpoints (PyTorch only, nothing else).

    import switch_torch
    m = switch_torch.load("runs/default")            # newest checkpoint; ckpt=STEP for another
    print(m.generate("ROMEO:", 200, temperature=0))  # switch-sample --temperature 0's text
    logits, routing = m(m.encode("To be, or not to be"))
    print(routing[0]["expert"])                      # each token's expert in the first MoE layer

It builds the model of a run's config.json / the checkpoint's state.json, loads model.pt
(torch.load(weights_only=True)) or model.safetensors, and follows switch's evaluation-mode
semantics: the router (softmax or sigmoid scores, top-k, the balancing bias), capacity from
moe.eval_capacity_factor over the tokens of one call, the drop policies (random draws from the
generator passed in), rerouting, what a dropped token outputs, probability scaling, shared
experts and the gelu / relu / swiglu feed-forwards. It does not train (no jitter, dropout,
auxiliary losses or bias updates) and refuses, naming the key, a config it does not know.
`eval_batches` and `evaluate` reproduce the fixed batches and the val_loss switch records.
It runs on the CPU, where it is tested against switch.
"""

import json
import math
import os
import re
import struct
from fractions import Fraction

import torch
import torch.nn.functional as F

__all__ = ["load", "SwitchModel", "read_safetensors", "eval_batches", "evaluate", "Unsupported"]

FORMAT_VERSION = 1
_TINY = torch.finfo(torch.float32).tiny
# Every config value this file knows how to run; anything else is refused with its key.
_CHOICES = {
    "model.activation": ("gelu", "relu", "swiglu"),
    "moe.score": ("softmax", "sigmoid"),
    "moe.drop_policy": ("random", "position", "probability"),
    "moe.dropped": ("pass", "zero"),
    "moe.strategy": ("loop", "capacity", "grouped"),
    "moe.balance": ("aux_loss", "bias", "variance", "none"),
    "moe.overflow": ("drop", "reroute"),
}
_KNOWN = {
    "data": {"path", "val_fraction", "test_fraction", "cache_dir"},
    "model": {"d_model", "n_layers", "n_heads", "d_ff", "seq_len", "dropout", "pos_emb",
              "activation"},
    "moe": {"n_experts", "d_expert", "every", "top_k", "score", "capacity_factor",
            "eval_capacity_factor", "drop_tokens", "drop_policy", "is_scale_prob", "dropped",
            "strategy", "balance", "bias_rate", "shared_experts", "overflow", "alpha", "z_loss",
            "jitter", "init_scale"},
    "train": None,  # training only: any key
    "dist": None,
}
# The generator of batch i's random drop order in switch's evaluation: seeded 0x6576616c + i.
EVAL_DROP_SEED = 0x6576616C
VAL_SALT, TRAIN_SALT, TEST_SALT = 0x76616C, 0x747261, 0x746573


class Unsupported(ValueError):
    """A checkpoint or config this file does not know how to run."""


# ---------------------------------------------------------------------------------------------
# Files


def read_safetensors(path):
    """(tensors, metadata) of a safetensors file, checked against the format's definition."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, 100_000_000):
        raise ValueError(f"{path}: a header of {n} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    body = memoryview(data)[8 + n:]
    metadata = header.pop("__metadata__", None) or {}
    tensors, spans = {}, []
    for name, e in header.items():
        try:
            dtype = dtypes[e["dtype"]]
            begin, end = (int(v) for v in e["data_offsets"])
            shape = [int(v) for v in e["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r}: {e!r} is not a dtype, shape and "
                             f"data_offsets entry") from None
        size = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(body) or end - begin != size:
            raise ValueError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not hold "
                             f"its shape {e['shape']}")
        raw = bytearray(body[begin:end])
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(shape)
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ValueError(f"{path}: the tensors' data has a gap or an overlap at byte {begin}")
        covered = end
    if covered != len(body):
        raise ValueError(f"{path}: the tensors cover {covered} of {len(body)} bytes of data")
    return tensors, metadata


def _checkpoint_dir(run_dir, ckpt):
    if ckpt is not None:
        ckpt = int(ckpt)
    if os.path.isfile(os.path.join(run_dir, "state.json")):
        return run_dir  # a checkpoint directory itself
    found = {}
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"ckpt-(\d{6,18})", name)
        if m and os.path.isfile(os.path.join(run_dir, name, "state.json")):
            found[int(m.group(1))] = os.path.join(run_dir, name)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint (ckpt-*/state.json)")
    if ckpt is None:
        return found[max(found)]
    if ckpt not in found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint of step {ckpt}; it has steps "
                                f"{sorted(found)}")
    return found[ckpt]


def _check_config(cfg):
    for section, values in cfg.items():
        if section not in _KNOWN:
            raise Unsupported(f"config section {section!r} is not one this model knows")
        known = _KNOWN[section]
        for key, value in values.items():
            full = f"{section}.{key}"
            if known is not None and key not in known:
                raise Unsupported(f"config key {full} is not one this model knows (a newer "
                                  f"switch?)")
            if full in _CHOICES and value not in _CHOICES[full]:
                raise Unsupported(f"{full} = {value!r}: this model runs {_CHOICES[full]}")


def load(run_dir, ckpt=None):
    """The model of a run's checkpoint (the newest, or step `ckpt`), in eval mode.
    `run_dir` may also be a checkpoint directory (ckpt-NNNNNN) or a model.safetensors file
    alone (its metadata holds the config and vocabulary)."""
    if os.path.isfile(run_dir):
        weights, meta = read_safetensors(run_dir)
        if "config" not in meta or "vocab" not in meta:
            raise Unsupported(f"{run_dir}: its metadata has no switch config and vocabulary")
        model = SwitchModel(json.loads(meta["config"]), meta["vocab"])
        model.load_state_dict(weights)
        model.step, model.checkpoint = int(meta.get("step", -1)), run_dir
        return model.eval()
    d = _checkpoint_dir(run_dir, ckpt)
    with open(os.path.join(d, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    if state.get("format_version") != FORMAT_VERSION:
        raise Unsupported(f"{d}/state.json: format_version {state.get('format_version')}; this "
                          f"model reads {FORMAT_VERSION}")
    cfg = state["config"]
    _check_config(cfg)
    pt, st = os.path.join(d, "model.pt"), os.path.join(d, "model.safetensors")
    if os.path.exists(pt):
        weights = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        weights = read_safetensors(st)[0]
    model = SwitchModel(cfg, state["vocab"])
    model.load_state_dict(weights)
    model.step = state.get("step")
    model.checkpoint = d
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The model


def _activate(h, act):
    if act == "gelu":
        return F.gelu(h)
    if act == "relu":
        return F.relu(h)
    a, b = h.chunk(2, dim=-1)  # swiglu
    return F.silu(a) * b


def _in_width(width, act):
    return 2 * width if act == "swiglu" else width


class DenseFFN(torch.nn.Module):
    def __init__(self, d, width, act):
        super().__init__()
        self.act = act
        self.fc_in = torch.nn.Linear(d, _in_width(width, act))
        self.fc_out = torch.nn.Linear(width, d)

    def forward(self, x):
        return self.fc_out(_activate(self.fc_in(x), self.act))


class Attention(torch.nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):
        B, S, D = x.shape
        H = self.n_heads
        q, k, v = self.qkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D // H))
        mask = torch.ones(S, S, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, S, D))


class Router(torch.nn.Module):
    def __init__(self, d, n_experts, with_bias):
        super().__init__()
        self.proj = torch.nn.Linear(d, n_experts)
        self.register_buffer("expert_bias", torch.zeros(n_experts) if with_bias else None)


class Experts(torch.nn.Module):
    def __init__(self, n, d, width, act):
        super().__init__()
        self.act = act
        self.w_in = torch.nn.Parameter(torch.empty(n, d, _in_width(width, act)))
        self.b_in = torch.nn.Parameter(torch.empty(n, _in_width(width, act)))
        self.w_out = torch.nn.Parameter(torch.empty(n, width, d))
        self.b_out = torch.nn.Parameter(torch.empty(n, d))

    def forward(self, x_ND, expert_N, n_experts):
        """Each row through its expert; rows grouped by expert (expert_N sorted)."""
        y = torch.empty_like(x_ND)
        bounds = torch.bincount(expert_N, minlength=n_experts).cumsum(0).tolist()
        lo = 0
        for e, hi in enumerate(bounds):
            if hi > lo:
                h = _activate(torch.addmm(self.b_in[e], x_ND[lo:hi], self.w_in[e]), self.act)
                y[lo:hi] = torch.addmm(self.b_out[e], h, self.w_out[e])
            lo = hi
        return y


class SwitchFFN(torch.nn.Module):
    """The MoE layer in switch's evaluation mode."""

    def __init__(self, d, width, moe, act):
        super().__init__()
        self.moe = dict(moe)
        self.E, self.K = moe["n_experts"], moe["top_k"]
        self.router = Router(d, self.E, moe["balance"] == "bias")
        self.experts = Experts(self.E, d, width, act)
        self.shared = DenseFFN(d, moe["shared_experts"] * width, act) if moe[
            "shared_experts"] > 0 else None

    def route(self, x_TD):
        """Each token's k experts (best first), their gates, the scores and probabilities."""
        logits = F.linear(x_TD.float(), self.router.proj.weight.float(),
                          self.router.proj.bias.float())
        bias, k = self.router.expert_bias, self.K
        if self.moe["score"] == "sigmoid":
            s = torch.sigmoid(logits)
            probs = s / s.sum(-1, keepdim=True).clamp_min(_TINY)
            if bias is None:
                s_TK, e_TK = s.topk(k, -1)
            else:
                e_TK = (s + bias).topk(k, -1)[1]
                s_TK = s.gather(-1, e_TK)
            gate_sum = s_TK.sum(-1, keepdim=True).clamp_min(_TINY)
            return dict(logits=logits, probs=probs, scores=s, gate_sum=gate_sum,
                        expert=e_TK, gate=s_TK / gate_sum)
        probs = torch.softmax(logits, -1)
        if bias is not None:
            e_TK = (probs + bias).topk(k, -1)[1]
            p_TK = probs.gather(-1, e_TK)
        elif k == 1:
            p_TK, e_TK = probs.max(-1, keepdim=True)
        else:
            p_TK, e_TK = probs.topk(k, -1)
        gate_sum = p_TK.sum(-1, keepdim=True) if k > 1 else None
        return dict(logits=logits, probs=probs, scores=probs, gate_sum=gate_sum, expert=e_TK,
                    gate=p_TK if k == 1 else p_TK / gate_sum)

    def dispatch(self, r, capacity, generator):
        """(expert of each assignment, kept assignments in seat order, dropped assignments)."""
        expert_TK = r["expert"]
        T, K = expert_TK.shape
        A, E = T * K, self.E
        expert_A = expert_TK.reshape(A)
        a_A = torch.arange(A)
        position_A = (a_A % K) * T + torch.div(a_A, K, rounding_mode="floor")
        policy = self.moe["drop_policy"]
        if policy == "random":
            rank_A = torch.randperm(A, generator=generator, dtype=torch.int64)
        elif policy == "position":
            rank_A = position_A
        else:  # probability: highest gates first, ties by position
            by_position = position_A.sort()[1]
            gate = r["gate"].reshape(A)[by_position]
            order = by_position[gate.sort(stable=True, dim=0, descending=True)[1]]
            rank_A = torch.empty(A, dtype=torch.int64).scatter_(0, order, a_A)
        counts = torch.bincount(expert_A, minlength=E)
        sorted_A = (expert_A * A + rank_A).sort()[1]
        starts = counts.cumsum(0) - counts
        seat = torch.arange(A) - starts[expert_A[sorted_A]]
        keep = seat < capacity if capacity >= 0 else torch.ones(A, dtype=torch.bool)
        order_N, dropped_M = sorted_A[keep], sorted_A[~keep]
        if capacity >= 0 and len(dropped_M) and self.moe["overflow"] == "reroute":
            return self._reroute(r, expert_A, order_N, dropped_M, rank_A, capacity)
        return expert_A, order_N, dropped_M

    def _reroute(self, r, expert_A, order_N, dropped_M, rank_A, capacity):
        E, K = self.E, self.K
        A = expert_A.numel()
        chosen_by = r["scores"] if self.router.expert_bias is None else (
            r["scores"] + self.router.expert_bias)
        pref = chosen_by.argsort(dim=-1, descending=True).tolist()
        ex = expert_A.tolist()
        load = torch.bincount(expert_A[order_N], minlength=E).tolist()
        moved, still = [], []
        for a in dropped_M[rank_A[dropped_M].argsort()].tolist():
            t = a // K
            used = set(ex[t * K:(t + 1) * K])
            to = next((e for e in pref[t] if e not in used and load[e] < capacity), -1)
            if to < 0:
                still.append(a)
                continue
            ex[a] = to
            load[to] += 1
            moved.append(a)
        expert_A = torch.tensor(ex, dtype=torch.int64)
        if not moved:
            return expert_A, order_N, torch.tensor(still, dtype=torch.int64)
        # Per expert, the kept seats first in their order (order_N is grouped by expert, by
        # seat), then the moved ones in the order they moved.
        key = torch.full((A,), -1, dtype=torch.int64)
        key[order_N] = expert_A[order_N] * (2 * A) + torch.arange(len(order_N))
        moved_t = torch.tensor(moved, dtype=torch.int64)
        key[moved_t] = expert_A[moved_t] * (2 * A) + A + torch.arange(len(moved))
        kept = (key >= 0).nonzero().squeeze(1)
        order_N = kept[key[kept].argsort()]
        return expert_A, order_N, torch.tensor(still, dtype=torch.int64)

    def forward(self, x, generator=None, drop_tokens=None):
        D = x.shape[-1]
        x_TD = x.reshape(-1, D)
        T, K, E = x_TD.shape[0], self.K, self.E
        r = self.route(x_TD)
        drop = self.moe["drop_tokens"] if drop_tokens is None else drop_tokens
        capacity = int(self.moe["eval_capacity_factor"] * K * T / E) if drop else -1
        expert_A, order_N, dropped_M = self.dispatch(r, capacity, generator)
        gate = r["gate"]
        if not torch.equal(expert_A, r["expert"].reshape(-1)):  # rerouted: its new score
            gate = r["scores"].gather(1, expert_A.view(T, K))
            if r["gate_sum"] is not None:
                gate = gate / r["gate_sum"]
        gate_A = gate.reshape(-1)
        scale_A = gate_A if self.moe["is_scale_prob"] else gate_A / gate_A.clamp_min(_TINY)
        scale_A = scale_A.to(x_TD.dtype)
        token_N = torch.div(order_N, K, rounding_mode="floor")
        y_ND = self.experts(x_TD[token_N], expert_A[order_N], E)
        y_TD = torch.zeros_like(x_TD).index_add(0, token_N, y_ND * scale_A[order_N].unsqueeze(1))
        if len(dropped_M) and self.moe["dropped"] == "pass":
            token_M = torch.div(dropped_M, K, rounding_mode="floor")
            y_TD = y_TD.index_add(0, token_M, x_TD[token_M] * scale_A[dropped_M].unsqueeze(1))
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        dropped_TK = torch.zeros(T * K, dtype=torch.bool)
        dropped_TK[dropped_M] = True
        routing = dict(expert=r["expert"], seated=expert_A.view(T, K), gate=gate.detach(),
                       dropped=dropped_TK.view(T, K), probs=r["probs"].detach(),
                       capacity=capacity)
        return y_TD.view(x.shape), routing


class Block(torch.nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        m, d = cfg["model"], cfg["model"]["d_model"]
        self.ln_attn = torch.nn.LayerNorm(d)
        self.attn = Attention(d, m["n_heads"])
        self.ln_ffn = torch.nn.LayerNorm(d)
        width = cfg["moe"]["d_expert"] or m["d_ff"]
        self.is_moe = moe
        self.ffn = (SwitchFFN(d, width, cfg["moe"], m["activation"]) if moe else
                    DenseFFN(d, m["d_ff"], m["activation"]))

    def forward(self, x, generator, drop_tokens):
        x = x + self.attn(self.ln_attn(x))
        if not self.is_moe:
            return x + self.ffn(self.ln_ffn(x)), None
        y, routing = self.ffn(self.ln_ffn(x), generator, drop_tokens)
        return x + y, routing


class SwitchModel(torch.nn.Module):
    """switch's language model. `model(ids)` -> (logits [B, S, V], routing of each MoE layer)."""

    def __init__(self, cfg, vocab):
        super().__init__()
        _check_config(cfg)
        self.cfg, self.vocab = cfg, vocab
        self.stoi = {c: i for i, c in enumerate(vocab)}
        m, moe = cfg["model"], cfg["moe"]
        d, V = m["d_model"], len(vocab)
        self.seq_len = m["seq_len"]
        self.tok_emb = torch.nn.Embedding(V, d)
        self.pos_emb = torch.nn.Embedding(m["seq_len"], d) if m["pos_emb"] else None
        every = moe["every"]
        self.blocks = torch.nn.ModuleList(
            Block(cfg, every > 0 and i % every == every - 1) for i in range(m["n_layers"]))
        self.ln_f = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, V)

    def encode(self, text):
        """Ids of `text` ([1, len]); a character outside the vocabulary is an error."""
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            raise ValueError(f"characters {missing} are not in the vocabulary")
        return torch.tensor([[self.stoi[c] for c in text]], dtype=torch.int64)

    def decode(self, ids):
        return "".join(self.vocab[int(i)] for i in torch.as_tensor(ids).reshape(-1))

    def forward(self, ids, generator=None, drop_tokens=None):
        """Logits of every position, and per MoE layer a dict: its block `layer`, each token's
        `expert`s as the router chose them (best first), where each was `seated` (after
        rerouting), `gate`, whether it was `dropped`, the router's `probs` and the `capacity`
        (-1: none). All of `ids`' tokens are one routing group, as one batch in switch's
        evaluation; `drop_tokens=False` routes without capacity, as generation does;
        `generator` draws the random drop order. Gradients flow as usual (wrap the call in
        torch.no_grad() when they are not wanted); the routing tensors are detached."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        S = ids.shape[1]
        if S > self.seq_len:
            raise ValueError(f"{S} positions; the model's context is {self.seq_len}")
        x = self.tok_emb(ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(S))
        routing = []
        for i, block in enumerate(self.blocks):
            x, r = block(x, generator, drop_tokens)
            if r is not None:
                T = ids.numel()
                r = {k: (v.reshape(*ids.shape, *v.shape[1:]) if torch.is_tensor(v) and
                         v.dim() > 0 and v.shape[0] == T else v) for k, v in r.items()}
                r["layer"] = i
                routing.append(r)
        return self.head(self.ln_f(x)), routing

    @torch.no_grad()
    def generate(self, prompt="\n", n=200, temperature=1.0, top_k=0, seed=1337):
        """switch-sample's text: `n` characters after `prompt`, without capacity; when the
        context is full it keeps its newest half. temperature 0 is greedy."""
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature {temperature}: must be a finite number >= 0")
        if top_k < 0 or n < 0:
            raise ValueError(f"top_k {top_k}, n {n}: must be >= 0")
        ids = self.encode(prompt)[0].tolist()
        if not ids:
            raise ValueError("the prompt is empty")
        gen = torch.Generator().manual_seed(seed)
        ctx, keep = self.seq_len, max(1, self.seq_len // 2)
        begin = max(0, len(ids) - ctx)
        out = []
        for _ in range(n):
            if len(ids) - begin > ctx:
                begin = len(ids) - keep
            logits = self(torch.tensor([ids[begin:]]), drop_tokens=False)[0][0, -1].float()
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if 0 < top_k < logits.numel():
                    kth = logits.topk(top_k)[0][-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, False, generator=gen))
            ids.append(nxt)
            out.append(self.vocab[nxt])
        return "".join(out)


# ---------------------------------------------------------------------------------------------
# switch's evaluation batches


class _Rng:
    """switch's data generator: xoshiro256**, seeded by splitmix64."""
    M = (1 << 64) - 1

    def __init__(self, seed):
        self.s = []
        for _ in range(4):
            seed = (seed + 0x9E3779B97F4A7C15) & self.M
            z = seed
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.M
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.M
            self.s.append(z ^ (z >> 31))

    def _rotl(self, x, k):
        return ((x << k) | (x >> (64 - k))) & self.M

    def next(self):
        s = self.s
        result = (self._rotl((s[1] * 5) & self.M, 7) * 9) & self.M
        t = (s[1] << 17) & self.M
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = self._rotl(s[3], 45)
        return result

    def below(self, n):
        limit = self.M - self.M % n
        while True:
            x = self.next()
            if x < limit:
                return x % n


def _part_of(n, f):
    x = Fraction(n) * Fraction(f)
    r = round(x)
    return int(r) if abs(x - r) <= Fraction(1e-9) * max(1, x) else math.floor(x)


def split_bounds(n, val_fraction, test_fraction):
    """(train_end, val_end): switch's train / validation / test split of n characters."""
    if not test_fraction > 0:
        return max(0, min(int(n * (1.0 - val_fraction)), n)), n
    n_test = min(n, _part_of(n, test_fraction))
    n_val = min(n - n_test, _part_of(n, val_fraction))
    return n - n_test - n_val, n - n_test


def eval_batches(model, text_path=None, split="val"):
    """The fixed batches switch evaluates the run on: train.eval_batches batches of
    train.batch_size windows of `split` ("val", "train" for train_loss, "test"), from the
    text at `text_path` (default: the config's data.path, relative to where the run was
    started). A list of (x, y) id tensors."""
    cfg = model.cfg
    text_path = text_path or cfg["data"]["path"]
    with open(text_path, encoding="utf-8", newline="") as f:  # as switch: \r kept
        text = f.read()
    ids = model.encode(text)[0]
    train_end, val_end = split_bounds(len(ids), cfg["data"]["val_fraction"],
                                      cfg["data"].get("test_fraction", 0.0))
    part = {"train": ids[:train_end], "val": ids[train_end:val_end], "test": ids[val_end:]}[split]
    salt = {"train": TRAIN_SALT, "val": VAL_SALT, "test": TEST_SALT}[split]
    t, S = cfg["train"], model.seq_len
    if len(part) <= S:
        raise ValueError(f"{text_path}: the {split} split holds {len(part)} characters; "
                         f"model.seq_len = {S} needs at least {S + 1}"
                         + (" (data.test_fraction is 0: there is no test split)"
                            if split == "test" and len(part) == 0 else ""))
    rng = _Rng(t["seed"] ^ salt)
    batches = []
    for _ in range(t["eval_batches"]):
        offs = [rng.below(len(part) - S) for _ in range(t["batch_size"])]
        x = torch.stack([part[o:o + S] for o in offs])
        y = torch.stack([part[o + 1:o + S + 1] for o in offs])
        batches.append((x, y))
    return batches


@torch.no_grad()
def evaluate(model, batches, ranks=1):
    """The mean cross-entropy switch records (val_loss) over `batches`: each batch one routing
    group (its rows in `ranks` shares for a run of that many ranks), its random drop order
    from a generator of its own."""
    if not batches or ranks < 1:
        raise ValueError(f"{len(batches)} batches, {ranks} ranks: need at least one of each")
    total = 0.0
    for share in range(ranks):
        for i, (x, y) in enumerate(batches):
            rows = x.shape[0] // ranks
            xs, ys = x[share * rows:(share + 1) * rows], y[share * rows:(share + 1) * rows]
            gen = torch.Generator().manual_seed(EVAL_DROP_SEED + i)
            logits = model(xs, generator=gen)[0]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1)))
    return total / ranks / len(batches)
