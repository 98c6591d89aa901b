#!/usr/bin/env python3
"""The seed's kind of Switch Transformer in Python: PyTorch modules, the experts run one
after another. It exists to time `configs/labml.json` against its reference in the same
minutes on the same machine (tools/labml_vs_python.sh), because this machine's speed drifts
too much for a figure measured on another day to be a baseline.

Same model and semantics as `configs/labml.json`: 6 pre-norm layers, width 128, 4 heads,
no position embedding, ReLU experts of width 256, top-1 routing with capacity
int(capacity_factor * T / E), tokens over capacity dropped at random and passed through,
expert outputs scaled by the router probability, the load-balancing loss summed over the
layers with weight 0.01. Trained with Adam (lr 1e-3, gradients clipped to norm 1) on random
64-character windows of the dataset, batch 32.

Needs PyTorch (`apt-get install python3-torch` on Debian: 1.13). Prints one JSON line.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Causal multi-head attention on [seq, batch, d] with einsum scores."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.output = nn.Linear(d_model, d_model)

    def forward(self, x, mask):
        s, b, _ = x.shape
        heads = (s, b, self.n_heads, self.d_head)
        q = self.query(x).view(heads)
        k = self.key(x).view(heads)
        v = self.value(x).view(heads)
        scores = torch.einsum("ibhd,jbhd->ijbh", q, k) / math.sqrt(self.d_head)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=1)
        out = torch.einsum("ijbh,jbhd->ibhd", weights, v).reshape(s, b, -1)
        return self.output(out)


class Expert(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


class SwitchFeedForward(nn.Module):
    """Top-1 routing; each expert's tokens gathered, run and scattered back in turn."""

    def __init__(self, d_model, d_ff, n_experts, capacity_factor):
        super().__init__()
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        self.experts = nn.ModuleList(Expert(d_model, d_ff) for _ in range(n_experts))
        self.switch = nn.Linear(d_model, n_experts)

    def forward(self, x):
        s, b, d = x.shape
        x = x.reshape(-1, d)
        prob = self.switch(x).softmax(dim=-1)
        prob_max, routes = prob.max(dim=-1)
        chosen = [torch.eq(routes, i).nonzero(as_tuple=True)[0] for i in range(self.n_experts)]
        counts = x.new_tensor([len(c) for c in chosen])
        capacity = int(self.capacity_factor * len(x) / self.n_experts)
        dropped = []
        for i in range(self.n_experts):
            if len(chosen[i]) > capacity:
                shuffled = chosen[i][torch.randperm(len(chosen[i]))]
                dropped.append(shuffled[capacity:])
                chosen[i] = shuffled[:capacity]
        out = x.new_zeros(x.shape)
        outputs = [self.experts[i](x[chosen[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[chosen[i], :] = outputs[i]
        n_dropped = 0
        if dropped:
            dropped = torch.cat(dropped)
            out[dropped, :] = x[dropped, :]
            n_dropped = len(dropped)
        out = out * prob_max.view(-1, 1)
        return out.view(s, b, d), counts, prob.sum(0), n_dropped


class Layer(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, n_experts, capacity_factor):
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = SwitchFeedForward(d_model, d_ff, n_experts, capacity_factor)

    def forward(self, x, mask):
        x = x + self.attn(self.norm_attn(x), mask)
        ff, counts, prob_sum, n_dropped = self.ff(self.norm_ff(x))
        return x + ff, counts, prob_sum, n_dropped


class Model(nn.Module):
    def __init__(self, n_vocab, args):
        super().__init__()
        self.embed = nn.Embedding(n_vocab, args.d_model)
        self.layers = nn.ModuleList(
            Layer(args.d_model, args.n_heads, args.d_ff, args.n_experts, args.capacity_factor)
            for _ in range(args.n_layers))
        self.norm = nn.LayerNorm(args.d_model)
        self.head = nn.Linear(args.d_model, n_vocab)

    def forward(self, tokens, mask):  # tokens [seq, batch]
        x = self.embed(tokens)
        counts, prob_sums, n_dropped = [], [], 0
        for layer in self.layers:
            x, c, p, d = layer(x, mask)
            counts.append(c)
            prob_sums.append(p)
            n_dropped += d
        return self.head(self.norm(x)), torch.stack(counts), torch.stack(prob_sums), n_dropped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/tinyshakespeare.txt")
    ap.add_argument("--experts", dest="n_experts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--capacity-factor", type=float, default=1.2)
    ap.add_argument("--alpha", type=float, default=0.01)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    train = data[: int(0.9 * len(data))]

    model = Model(len(vocab), args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    s, b = args.seq_len, args.batch_size
    mask = torch.ones(s, s, dtype=torch.bool).tril().view(s, s, 1, 1)
    step_s, losses, dropped = [], [], 0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        starts = torch.randint(len(train) - s - 1, (b,))
        x = torch.stack([train[i : i + s] for i in starts]).t().contiguous()
        y = torch.stack([train[i + 1 : i + s + 1] for i in starts]).t().contiguous()
        logits, counts, prob_sums, n_dropped = model(x, mask)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        total = counts.sum(dim=-1, keepdim=True)
        balance = args.n_experts * ((counts / total) * (prob_sums / total)).sum()
        opt.zero_grad()
        (loss + args.alpha * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
        dropped += n_dropped

    tokens = s * b
    windows = [sum(step_s[i : i + 10]) for i in range(0, len(step_s) - 9, 10)]
    print(json.dumps({
        "impl": "python-loop", "n_experts": args.n_experts, "steps": args.steps,
        "threads": args.threads, "torch": torch.__version__,
        "tokens_per_s": len(step_s) * tokens / sum(step_s),
        "tokens_per_s_median_10": 10 * tokens / statistics.median(windows),
        "first_loss": losses[0], "last_loss": statistics.mean(losses[-10:]),
        "dropped_fraction": dropped / (len(step_s) * tokens * args.n_layers),
    }))


if __name__ == "__main__":
    main()
