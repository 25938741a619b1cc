#!/usr/bin/env python3
"""bench/python: the kiln Python package next to plain PyTorch, one run,
same machine, same libtorch, same thread count; prints one table.

1. predict overhead: Model.predict on one row vs calling the same TorchScript
   module from Python torch under inference_mode (best of 15 rounds of about
   20 ms each, torch's and Kiln's rounds alternating).
2. fit speed: samples/s of kiln.Sequential(...).fit on an 8->10->1 MLP with
   MSE, SGD, batch 32, vs the same loop in PyTorch eager mode; Kiln's figure
   is the whole fit call's wall time (data copy, split, package save
   included) and the training loop's own samples/s.

    python bench/python/bench.py [--threads N] [--rows N] [--epochs N]
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

import kiln


def _calls_for(fn, min_s):
    """How many calls of fn take at least min_s seconds (a power of two)."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > min_s:
            return n
        n *= 2


def per_call_paired(fns, rounds=15, min_s=0.02):
    """Best seconds per call of each function in fns, measured in rounds
    that alternate between them (fns[0] n calls, fns[1] n calls, ...), so
    that each sees the same spells of a shared machine's speed; the best
    round of each is the one least disturbed."""
    for fn in fns:
        for _ in range(200):
            fn()
    ns = [_calls_for(fn, min_s) for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, (fn, n) in enumerate(zip(fns, ns)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / n)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    kiln.set_num_threads(a.threads)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.rows, 8)).astype(np.float32)
    y = (x @ rng.standard_normal(8) + 0.1 * rng.standard_normal(a.rows)).astype(np.float32)

    # 1. predict overhead on one row, same TorchScript file.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 1)).eval()
    path = os.path.join(tempfile.mkdtemp(), "mlp.pt")
    torch.jit.script(net).save(path)
    ts = torch.jit.load(path)
    km = kiln.load(path)
    row_np = x[:1].copy()
    row_t = torch.from_numpy(row_np)

    def torch_predict():
        with torch.inference_mode():
            return ts(row_t)

    t_torch, t_kiln = per_call_paired([torch_predict, lambda: km.predict(row_np)])

    # 2. fit samples/s, 8->10->1, MSE, SGD lr 0.01, batch 32.
    model = kiln.Sequential([kiln.layers.Linear(10), kiln.layers.ReLU(), kiln.layers.Linear(1)])
    t0 = time.perf_counter()
    hist = model.fit(x, y, epochs=a.epochs, batch_size=32, validation_split=0.0, optimizer="sgd", lr=0.01,
                     loss="mse", seed=0, verbose=0)
    kiln_wall = a.rows * a.epochs / (time.perf_counter() - t0)
    kiln_loop = hist["report"]["result"].get("samples_per_sec") if isinstance(hist["report"].get("result"), dict) else None

    torch.manual_seed(0)
    tnet = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 1))
    opt = torch.optim.SGD(tnet.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).unsqueeze(1)
    t0 = time.perf_counter()
    for _ in range(a.epochs):
        perm = torch.randperm(a.rows)
        for i in range(0, a.rows, 32):
            idx = perm[i:i + 32]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(tnet(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    torch_sps = a.rows * a.epochs / (time.perf_counter() - t0)

    print(f"bench/python: kiln {kiln.__version__} on libtorch {kiln.torch_version()}, torch {torch.__version__}, "
          f"{a.threads} thread(s), {a.rows} rows x {a.epochs} epochs\n")
    print(f"{'measure':46} {'Kiln':>14} {'PyTorch':>14} {'ratio':>8}")
    print(f"{'predict, one row (us per call, lower is better)':46} {t_kiln * 1e6:14.1f} {t_torch * 1e6:14.1f} "
          f"{t_kiln / t_torch:7.2f}x")
    print(f"{'fit 8-10-1 MSE SGD b32, whole call (samples/s)':46} {kiln_wall:14,.0f} {torch_sps:14,.0f} "
          f"{kiln_wall / torch_sps:7.2f}x")
    if kiln_loop:
        print(f"{'fit, training loop only (samples/s)':46} {kiln_loop:14,.0f} {torch_sps:14,.0f} "
              f"{kiln_loop / torch_sps:7.2f}x")
    print("\npredict ratio: Kiln time / torch time (target <= 1.2); fit ratio: Kiln / PyTorch speed (target >= 1.5).")


if __name__ == "__main__":
    main()
