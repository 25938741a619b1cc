#!/usr/bin/env python3
"""The Python torch side of bench/cgo: the same operations Kiln's Go side
times, on the same libtorch, measured the same way (best of 5 timed rounds
after a warm-up). Prints one JSON object: operation -> nanoseconds per op.

Usage: peer.py MODEL.pt THREADS
"""
import json
import sys
import time

import torch


def per_op(fn, min_seconds=0.3):
    for _ in range(200):
        fn()
    n = 1
    while True:  # find an iteration count that runs ~min_seconds
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        dt = time.perf_counter_ns() - t0
        if dt > min_seconds * 1e9 / 5:
            break
        n *= 2
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def main():
    path, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    m = torch.jit.load(path)
    m.eval()
    res = {"call": per_op(torch.get_num_threads)}
    res["tensor"] = per_op(lambda: torch.zeros(1, 64))
    for b in (1, 64):
        x = torch.randn(b, 64)

        def fwd():
            with torch.inference_mode():
                return m(x)

        res[f"forward{b}"] = per_op(fwd)
    res["torch"] = torch.__version__
    print(json.dumps(res))


if __name__ == "__main__":
    main()
