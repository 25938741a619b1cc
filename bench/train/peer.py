#!/usr/bin/env python3
"""The Python PyTorch (eager mode) side of bench/train: the same models,
losses, optimizers, batch sizes and data as Kiln's side, on the same
libtorch. Each epoch shuffles with torch.randperm, gathers each batch by
index, and runs zero_grad, forward, loss, backward, step and loss.item(),
as Kiln's one-call epoch does.

Usage: peer.py TABULAR.bin ROWS THREADS RESNET.pt
  TABULAR.bin: float32 rows of 8 features and 1 target, written by Kiln's side.
  RESNET.pt: where to write the scripted ResNet-like model (resnet.py)
    that Kiln's side fine-tunes; this side fine-tunes the same weights in
    eager mode, with the same frozen layers and parameter groups.

Driven over stdin so that Kiln's and Python's epochs interleave on a
shared machine: each input line "mlp" or "cnn" trains one epoch of that
workload (or "resnet") and answers with one line: its samples per wall-clock second and
per CPU second of this process. "ready" is
printed once both models exist and have trained a warm-up epoch.
"""
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from resnet import FROZEN, HEAD_LR, ResNet, digits16


class Workload:
    def __init__(self, model, opt, loss_fn, x, y, batch):
        self.model, self.opt, self.loss_fn = model, opt, loss_fn
        self.x, self.y, self.batch = x, y, batch

    def epoch(self):
        """Trains one epoch; returns its samples per wall-clock second and
        per CPU second of this process."""
        n, batch = self.x.shape[0], self.batch
        self.model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        perm = torch.randperm(n)
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            self.opt.zero_grad()
            loss = self.loss_fn(self.model(xb), yb)
            loss.backward()
            self.opt.step()
            loss.item()
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main():
    path, rows, threads, resnet_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    raw = torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(rows, 9))
    x, y = raw[:, :8].contiguous(), raw[:, 8:].contiguous()
    mlp = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 1))
    work = {"mlp": Workload(mlp, torch.optim.SGD(mlp.parameters(), lr=0.01, momentum=0.9),
                            F.mse_loss, x, y, 32)}

    d = load_digits()
    lo, hi = d.data.min(axis=0), d.data.max(axis=0)
    scale = np.where(hi > lo, hi - lo, 1.0)
    dx = torch.from_numpy(((d.data - lo) / scale).astype(np.float32)).reshape(-1, 1, 8, 8)
    dy = torch.from_numpy(d.target.astype(np.int64))
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 10))
    work["cnn"] = Workload(cnn, torch.optim.AdamW(cnn.parameters(), lr=3e-3),
                           F.cross_entropy, dx, dy, 64)
    torch.manual_seed(0)
    resnet = ResNet()
    torch.jit.script(resnet).save(resnet_path)
    frozen, head, rest = [], [], []
    for name, p in resnet.named_parameters():
        if name.startswith(FROZEN):
            p.requires_grad_(False)
            frozen.append(p)
        elif name.startswith("fc."):
            head.append(p)
        else:
            rest.append(p)
    rx, ry = digits16(d)
    work["resnet"] = Workload(resnet, torch.optim.AdamW([{"params": rest}, {"params": head, "lr": HEAD_LR}], lr=1e-3),
                              F.cross_entropy, torch.from_numpy(rx), torch.from_numpy(ry), 64)
    for w in work.values():
        w.epoch()  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name:
            print("%f %f" % work[name].epoch(), flush=True)


if __name__ == "__main__":
    main()
