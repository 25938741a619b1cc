#!/usr/bin/env python3
"""Writes the model repository Kiln's serving tests run against.

Usage: make_repo.py OUTDIR

Models (all TorchScript, scripted with Python torch):
  affine      FP32 x[-1 batch, 4] -> y = x*scale + 1 (FP32 [4]), s = row sums
              (FP32 []); version 1 has scale 2, version 2 scale 3; dynamic
              batching, 2 instances, version policy "all".
  classifier  FP32 x[batch, 4] -> scores = x[:, :3] (FP32 [3]) with labels.
  probs       FP32 x[batch, 4] -> p = softmax(x[:, :3]) by the server (config
              softmax: true), labels cat/dog/bird.
  int_ops     INT64 ids[-1] (no batching) -> doubled (INT64), halves (FP32).
  corrupt     a config with a model.pt that is not a TorchScript archive.
"""
import os
import sys

import torch
from torch import nn


class Affine(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor):
        return x * self.scale + 1.0, x.sum(dim=1)


class Classifier(nn.Module):
    def forward(self, x: torch.Tensor):
        return x[:, :3].clone()


class IntOps(nn.Module):
    def forward(self, ids: torch.Tensor):
        return ids * 2, ids.to(torch.float32) * 0.5


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def save(module, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.jit.script(module.eval()).save(path)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_repo.py OUTDIR")
    out = sys.argv[1]
    save(Affine(2.0), f"{out}/affine/1/model.pt")
    save(Affine(3.0), f"{out}/affine/2/model.pt")
    write(f"{out}/affine/config.yaml", """\
name: affine
platform: pytorch_torchscript
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
    save(Classifier(), f"{out}/classifier/1/model.pt")
    write(f"{out}/classifier/labels.txt", "cat\ndog\nbird\n")
    write(f"{out}/classifier/config.json", """\
{"name": "classifier", "max_batch_size": 4,
 "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
 "outputs": [{"name": "scores", "datatype": "FP32", "dims": [3], "labels": "labels.txt"}]}
""")
    save(Classifier(), f"{out}/probs/1/model.pt")
    write(f"{out}/probs/labels.txt", "cat\ndog\nbird\n")
    write(f"{out}/probs/config.yaml", """\
max_batch_size: 4
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: p, datatype: FP32, dims: [3], labels: labels.txt, softmax: true}]
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
    write(f"{out}/corrupt/1/model.pt", "this is not a TorchScript archive\n")
    write(f"{out}/corrupt/config.yaml", """\
max_batch_size: 4
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}]
""")


if __name__ == "__main__":
    main()
