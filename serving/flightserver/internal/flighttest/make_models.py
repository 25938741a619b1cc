#!/usr/bin/env python3
"""Writes the model repository the Flight service's tests run against.

Usage: make_models.py OUTDIR

Models (TorchScript, scripted with Python torch):
  affine  FP32 x[-1 batch, 4] -> y = x*scale + 1 (FP32 [4]), s = row sums
          (FP32 []); version 1 has scale 2, version 2 scale 3; max_batch_size
          8, dynamic batching, 2 instances, version policy "all".
  image   FP32 x[batch, 2, 3] -> flat = 2*x as [6] (FP32 [6]), mean (FP32 []);
          max_batch_size 16, dynamic batching.
  pair    FP32 a[batch, 3], INT64 b[batch] -> a * b (FP32 [3]);
          max_batch_size 32, no dynamic batching.
  int_ops INT64 ids[-1] (no batching) -> doubled (INT64), halves (FP32).
"""
import os
import sys

import torch
from torch import nn

# The serving tests' models and helpers, shared rather than copied.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "..", "..", "serving", "internal", "testmodels"))
from make_repo import Affine, IntOps, save, write  # noqa: E402


class Image(nn.Module):
    def forward(self, x: torch.Tensor):
        return (x * 2.0).reshape(x.shape[0], 6), x.mean(dim=[1, 2])


class Pair(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return a * b.to(torch.float32).unsqueeze(1)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_models.py OUTDIR")
    out = sys.argv[1]
    save(Affine(2.0), f"{out}/affine/1/model.pt")
    save(Affine(3.0), f"{out}/affine/2/model.pt")
    write(f"{out}/affine/config.yaml", """\
max_batch_size: 8
inputs:
  - {name: x, datatype: FP32, dims: [4]}
outputs:
  - {name: y, datatype: FP32, dims: [4]}
  - {name: s, datatype: FP32, dims: []}
dynamic_batching:
  max_queue_delay_us: 2000
  max_queue_size: 512
instance_count: 2
version_policy: {all: true}
""")
    save(Image(), f"{out}/image/1/model.pt")
    write(f"{out}/image/config.yaml", """\
max_batch_size: 16
inputs:
  - {name: x, datatype: FP32, dims: [2, 3]}
outputs:
  - {name: flat, datatype: FP32, dims: [6]}
  - {name: mean, datatype: FP32, dims: []}
dynamic_batching:
  max_queue_delay_us: 500
""")
    save(Pair(), f"{out}/pair/1/model.pt")
    write(f"{out}/pair/config.yaml", """\
max_batch_size: 32
inputs:
  - {name: a, datatype: FP32, dims: [3]}
  - {name: b, datatype: INT64, dims: []}
outputs:
  - {name: prod, datatype: FP32, dims: [3]}
""")
    save(IntOps(), f"{out}/int_ops/1/model.pt")
    write(f"{out}/int_ops/config.yaml", """\
max_batch_size: 0
inputs:
  - {name: ids, datatype: INT64, dims: [-1]}
outputs:
  - {name: doubled, datatype: INT64, dims: [-1]}
  - {name: halves, datatype: FP32, dims: [-1]}
""")


if __name__ == "__main__":
    main()
