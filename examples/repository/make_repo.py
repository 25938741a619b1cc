#!/usr/bin/env python3
"""Builds Kiln's default demo model repository, the one `make run` serves.

Usage: make_repo.py OUTDIR

Trains two models with Python torch on data sets bundled with scikit-learn
(nothing is downloaded) and writes them as a Kiln model repository:

  OUTDIR/iris/config.yaml     the iris classifier of examples/demo/make_model.py
  OUTDIR/iris/labels.txt      (MLP 4 -> 32 -> 3); FP32 input "features" [4],
  OUTDIR/iris/1/model.pt      output "probabilities" [3] (softmax applied by
                              the server, labels setosa/versicolor/virginica)
  OUTDIR/digits/config.yaml   a small CNN on scikit-learn's 8x8 handwritten
  OUTDIR/digits/labels.txt    digits; FP32 input "image" [1, 8, 8] (pixel
  OUTDIR/digits/1/model.pt    values 0..16), output "logits" [10]

Both batch dynamically (max_batch_size 64) and run 2 instances.
"""
import importlib.util
import os
import pathlib
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent


def demo_module():
    """examples/demo/make_model.py, imported for its iris Classifier."""
    spec = importlib.util.spec_from_file_location("kiln_demo", HERE.parent / "demo" / "make_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class DigitsCNN(nn.Module):
    """8x8 grey image (0..16) in, 10 class logits out."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image / 16.0))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build_iris(out):
    demo = demo_module()
    tmp = out / ".iris-build"
    demo_argv = sys.argv
    sys.argv = ["make_model.py", str(tmp)]
    try:
        demo.main()  # trains and writes iris.pt, labels.txt, iris_test.csv
    finally:
        sys.argv = demo_argv
    (out / "iris" / "1").mkdir(parents=True, exist_ok=True)
    os.replace(tmp / "iris.pt", out / "iris" / "1" / "model.pt")
    os.replace(tmp / "labels.txt", out / "iris" / "labels.txt")
    os.replace(tmp / "iris_test.csv", out / "iris" / "iris_test.csv")
    tmp.rmdir()
    write(out / "iris" / "config.yaml", """\
# The iris classifier (examples/demo/make_model.py): 4 measurements in cm
# (sepal length, sepal width, petal length, petal width) -> class
# probabilities. Query it with the classification extension for labels.
name: iris
platform: pytorch_torchscript
max_batch_size: 64
inputs:
  - {name: features, datatype: FP32, dims: [4]}
outputs:
  - {name: probabilities, datatype: FP32, dims: [3], labels: labels.txt, softmax: true}
dynamic_batching:
  max_queue_delay_us: 200
  max_queue_size: 1024
instance_count: 2
""")


def build_digits(out):
    torch.manual_seed(0)
    digits = load_digits()
    x = digits.images.astype("float32")[:, None, :, :]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    for epoch in range(12):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
    (out / "digits" / "1").mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(out / "digits" / "1" / "model.pt"))
    write(out / "digits" / "labels.txt", "".join(f"{d}\n" for d in range(10)))
    np.save(out / "digits" / "sample_images.npy", x_te[:16])
    np.save(out / "digits" / "sample_labels.npy", y_te[:16])
    write(out / "digits" / "config.yaml", """\
# A small CNN trained on scikit-learn's 8x8 handwritten digits: one grey
# image (pixel values 0..16) -> 10 logits.
name: digits
platform: pytorch_torchscript
max_batch_size: 64
inputs:
  - {name: image, datatype: FP32, dims: [1, 8, 8]}
outputs:
  - {name: logits, datatype: FP32, dims: [10], labels: labels.txt}
dynamic_batching:
  max_queue_delay_us: 200
  max_queue_size: 1024
instance_count: 2
""")
    print(f"digits CNN: trained in Python torch {torch.__version__}, test accuracy {acc:.3f} -> {out / 'digits'}")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_repo.py OUTDIR")
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    build_iris(out)
    build_digits(out)


if __name__ == "__main__":
    main()
