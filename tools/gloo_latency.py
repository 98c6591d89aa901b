#!/usr/bin/python3
"""All-to-all latency between two idle local processes on Gloo, as PyTorch measures it.

Usage: tools/gloo_latency.py [--rows 2,256] [--width 128] [--iters 300] [--port 29611]
Starts two ranks of torch.distributed (Debian's python3-torch, which tools/setup.sh
installs) and times all_to_all_single of `rows` float32 rows of `width` per peer: the floor
under switch's expert-parallel exchange on this machine, with no compute beside it.
"""
import argparse
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, args):
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            init_method=f"tcp://127.0.0.1:{args.port}")
    torch.set_num_threads(1)
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows * 2, args.width)
        y = torch.empty_like(x)
        for _ in range(20):  # warm up
            dist.all_to_all_single(y, x)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            dist.all_to_all_single(y, x)
        us = (time.perf_counter() - t0) / args.iters * 1e6
        if rank == 0:
            print(f"rows {rows} x {args.width} floats per peer: {us:.0f} us per all-to-all")
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="2,256")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--port", type=int, default=29611)
    args = p.parse_args()
    mp.spawn(rank_main, args=(args,), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
