#!/usr/bin/env python3
"""The PyTorch DDP side of bench/train's distributed rows, run by torchrun
(gloo backend): the same models, losses, optimizers, per-rank batch sizes
and data as Kiln's two ranks. Each rank takes its DistributedSampler shard
(shuffled by epoch, padded to equal length) and runs zero_grad, forward,
loss, backward (DDP all-reduces gradients in buckets) and step.

Usage: torchrun --nproc_per_node 2 ddp_peer.py TABULAR.bin ROWS THREADS DIGITS.csv PORT

The ranks stay up and work on request, so that the benchmark can alternate
Kiln's epochs with these: rank 0 connects to 127.0.0.1:PORT (the Go side
listens there), says "ready", then reads one command per line, hands it to
every rank (broadcast_object_list) and answers one line:
  threads    -> "THREADS OMP_NUM_THREADS" (torch.get_num_threads() per rank)
  mlp | cnn  -> global samples per second of one epoch (barrier to barrier)
  allreduce  -> "BYTES GB_PER_S": 10 all_reduce calls of a 25 MiB float32 tensor
  quit       -> ends
"""
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def shard(n, epoch, rank, world):
    g = torch.Generator()
    g.manual_seed(epoch)
    perm = torch.randperm(n, generator=g)
    per = (n + world - 1) // world
    perm = torch.cat([perm, perm[:per * world - n]])
    return perm[rank::world]


class Workload:
    def __init__(self, model, opt, loss_fn, x, y, batch):
        self.model, self.opt, self.loss_fn = DDP(model), opt, loss_fn
        self.x, self.y, self.batch = x, y, batch
        self.epoch = 0

    def run_epoch(self, rank, world):
        """One epoch; returns global samples per second."""
        n = self.x.shape[0]
        idx_all = shard(n, self.epoch, rank, world)
        self.epoch += 1
        dist.barrier()
        t0 = time.perf_counter()
        self.model.train()
        for s in range(0, idx_all.shape[0], self.batch):
            idx = idx_all[s:s + self.batch]
            xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            self.opt.zero_grad()
            loss = self.loss_fn(self.model(xb), yb)
            loss.backward()
            self.opt.step()
            loss.item()
        dist.barrier()
        return n / (time.perf_counter() - t0)


def main():
    path, rows, threads, digits, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    raw = torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(rows, 9))
    x, y = raw[:, :8].contiguous(), raw[:, 8:].contiguous()
    mlp = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 1))
    work = {"mlp": Workload(mlp, torch.optim.SGD(mlp.parameters(), lr=0.01, momentum=0.9), F.mse_loss, x, y, 32)}

    d = np.loadtxt(digits, delimiter=",", skiprows=1, dtype=np.float64)
    feats, target = d[:, :-1], d[:, -1]
    lo, hi = feats.min(axis=0), feats.max(axis=0)
    scale = np.where(hi > lo, hi - lo, 1.0)
    dx = torch.from_numpy(((feats - lo) / scale).astype(np.float32)).reshape(-1, 1, 8, 8)
    dy = torch.from_numpy(target.astype(np.int64))
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 10))
    work["cnn"] = Workload(cnn, torch.optim.AdamW(cnn.parameters(), lr=3e-3), F.cross_entropy, dx, dy, 64)
    big = torch.ones(25 << 18)  # 25 MiB of float32

    conn = None
    if rank == 0:
        conn = socket.create_connection(("127.0.0.1", port))
        rd, wr = conn.makefile("r"), conn.makefile("w")
        wr.write("ready\n")
        wr.flush()
    while True:
        cmd = [rd.readline().strip() or "quit"] if rank == 0 else [None]
        dist.broadcast_object_list(cmd, src=0)
        cmd = cmd[0]
        if cmd == "quit":
            break
        if cmd in work:
            answer = f"{work[cmd].run_epoch(rank, world):f}"
        elif cmd == "allreduce":
            dist.all_reduce(big)
            reps = 10
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                dist.all_reduce(big)
            answer = f"{big.numel() * 4} {big.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9:f}"
        elif cmd == "threads":
            t = torch.tensor([torch.get_num_threads()])
            ts = [torch.zeros_like(t) for _ in range(world)]
            dist.all_gather(ts, t)
            answer = f"{','.join(str(int(v)) for v in ts)} {os.environ.get('OMP_NUM_THREADS', '')}"
        else:
            answer = f"error unknown command {cmd!r}"
        if rank == 0:
            wr.write(answer + "\n")
            wr.flush()
    dist.destroy_process_group()
    if conn is not None:
        conn.close()


if __name__ == "__main__":
    main()
