#!/usr/bin/env python3
"""The PyTorch DDP side of bench/train's distributed rows, run by torchrun
(gloo backend): the same models, losses, optimizers, per-rank batch sizes
and data as Kiln's two ranks. Each rank takes its DistributedSampler shard
(shuffled by epoch, padded to equal length) and runs zero_grad, forward,
loss, backward (DDP all-reduces gradients in buckets) and step.

Usage: torchrun --nproc_per_node 2 ddp_peer.py TABULAR.bin ROWS THREADS EPOCHS DIGITS.csv
Rank 0 prints lines "mlp SAMPLES_PER_S", "cnn SAMPLES_PER_S" (global
samples per second of the fastest epoch) and "allreduce BYTES GB_PER_S"
(a plain all_reduce of a 25 MiB float32 tensor).
"""
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


def bench(name, model, opt, loss_fn, x, y, batch, epochs, rank, world):
    model = DDP(model)
    n = x.shape[0]
    best = 0.0
    for epoch in range(epochs + 1):  # epoch 0 warms up
        idx_all = shard(n, epoch, rank, world)
        dist.barrier()
        t0 = time.perf_counter()
        model.train()
        for s in range(0, idx_all.shape[0], batch):
            idx = idx_all[s:s + batch]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            loss.item()
        dist.barrier()
        if epoch > 0:
            best = max(best, n / (time.perf_counter() - t0))
    if rank == 0:
        print(f"{name} {best:f}", flush=True)


def main():
    path, rows, threads, epochs, digits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    raw = torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(rows, 9))
    x, y = raw[:, :8].contiguous(), raw[:, 8:].contiguous()
    mlp = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 1))
    bench("mlp", mlp, torch.optim.SGD(mlp.parameters(), lr=0.01, momentum=0.9), F.mse_loss, x, y, 32, epochs, rank, world)

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
    bench("cnn", cnn, torch.optim.AdamW(cnn.parameters(), lr=3e-3), F.cross_entropy, dx, dy, 64, epochs, rank, world)

    t = torch.ones(25 << 18)  # 25 MiB of float32
    dist.all_reduce(t)
    reps = 10
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(t)
    el = time.perf_counter() - t0
    if rank == 0:
        print(f"allreduce {t.numel() * 4} {t.numel() * 4 * reps / el / 1e9:f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
