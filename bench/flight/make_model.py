#!/usr/bin/env python3
"""Writes bench/flight's model repository: mlp, FP32 x[batch, 16] ->
y = tanh(x W + b) (FP32 [16]), max_batch_size 65536, dynamic batching.

Usage: make_model.py OUTDIR   (writes OUTDIR/mlp/config.yaml and
OUTDIR/mlp/1/model.pt)
"""
import os
import sys

import torch


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor):
        return torch.tanh(self.fc(x))


def main():
    out = sys.argv[1]
    os.makedirs(f"{out}/mlp/1", exist_ok=True)
    torch.jit.script(MLP().eval()).save(f"{out}/mlp/1/model.pt")
    with open(f"{out}/mlp/config.yaml", "w") as f:
        f.write("""\
max_batch_size: 65536
inputs:
  - {name: x, datatype: FP32, dims: [16]}
outputs:
  - {name: y, datatype: FP32, dims: [16]}
dynamic_batching:
  max_queue_delay_us: 100
""")


if __name__ == "__main__":
    main()
