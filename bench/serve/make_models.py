#!/usr/bin/env python3
"""Writes bench/serve's models: a Kiln model repository and, when
torch-model-archiver is given, TorchServe archives of the same TorchScript
files.

Usage: make_models.py OUTDIR [TORCH_MODEL_ARCHIVER]

KILN_BENCH_INSTANCES (default 2) sets the Kiln models' instance_count.

  OUTDIR/repo/mlp   MLP 784 -> 512 -> 256 -> 10 (FP32 x [784] -> y [10])
  OUTDIR/repo/cnn   CNN on 3x32x32: conv 16, pool, conv 32, pool, fc 128, fc 10
                    (FP32 x [3, 32, 32] -> y [10])
  OUTDIR/store/{mlp,cnn}.mar   TorchServe archives (handler.py below)

Both serve with dynamic batching (max_batch_size 64) on 2 instances; the
TorchServe side gets 2 workers with batchSize 64. Weights are random
(seeded): the benchmark measures serving, not accuracy.
"""
import json
import os
import pathlib
import subprocess
import sys

import torch
from torch import nn

HANDLER = '''\
"""TorchServe handler for bench/serve: each request body is one row of raw
little-endian float32 values; TorchServe's batching hands several requests
at once, which run as one forward pass; each response is the row's raw
float32 output."""
import json
import os

import torch


class RawHandler:
    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        torch.set_num_threads(1)  # 2 workers x 1 thread, like Kiln's 2 instances
        model_dir = context.system_properties["model_dir"]
        self.model = torch.jit.load(os.path.join(model_dir, "model.pt")).eval()
        with open(os.path.join(model_dir, "shape.json")) as f:
            self.shape = json.load(f)
        self.initialized = True

    def handle(self, data, context):
        rows = []
        for req in data:
            body = req.get("body") or req.get("data")
            rows.append(torch.frombuffer(bytearray(body), dtype=torch.float32).reshape(self.shape))
        with torch.no_grad():
            out = self.model(torch.stack(rows))
        return [bytes(o.contiguous().numpy().tobytes()) for o in out]


_service = RawHandler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
'''


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


CONFIG = """\
name: {name}
max_batch_size: 64
inputs: [{{name: x, datatype: FP32, dims: {dims}}}]
outputs: [{{name: y, datatype: FP32, dims: [10]}}]
dynamic_batching:
  max_queue_delay_us: 100
  max_queue_size: 4096
instance_count: {instances}
"""


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: make_models.py OUTDIR [TORCH_MODEL_ARCHIVER]")
    out = pathlib.Path(sys.argv[1])
    archiver = sys.argv[2] if len(sys.argv) == 3 else ""
    torch.manual_seed(0)
    for name, module, dims in (("mlp", MLP(), [784]), ("cnn", CNN(), [3, 32, 32])):
        d = out / "repo" / name
        (d / "1").mkdir(parents=True, exist_ok=True)
        torch.jit.script(module.eval()).save(str(d / "1" / "model.pt"))
        (d / "config.yaml").write_text(CONFIG.format(name=name, dims=json.dumps(dims), instances=int(os.environ.get("KILN_BENCH_INSTANCES", "2"))))
        if archiver:
            work = out / "ts-src" / name
            work.mkdir(parents=True, exist_ok=True)
            (work / "handler.py").write_text(HANDLER)
            (work / "shape.json").write_text(json.dumps(dims))
            (out / "store").mkdir(parents=True, exist_ok=True)
            subprocess.run([archiver, "--model-name", name, "--version", "1.0",
                            "--serialized-file", str(d / "1" / "model.pt"),
                            "--handler", str(work / "handler.py"), "--extra-files", str(work / "shape.json"),
                            "--export-path", str(out / "store"), "--force"], check=True)
    print(f"bench/serve models -> {out}")


if __name__ == "__main__":
    main()
