#!/usr/bin/env python3
"""Builds the model for Kiln's end-to-end demo (`make run`).

Trains a small MLP on scikit-learn's bundled iris data with Python torch,
folds the feature standardization into the network, exports it with
torch.jit.script, and writes the held-out rows for Kiln to predict.

Usage: make_model.py OUTDIR
Writes OUTDIR/iris.pt, OUTDIR/iris_test.csv (4 features + "species" index),
OUTDIR/labels.txt.
"""
import csv
import os
import sys

import torch
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch import nn


class Classifier(nn.Module):
    """Raw features in, class logits out; the scaler fitted on the training
    split is part of the model."""

    def __init__(self, mean, std, d_in=4, hidden=32, classes=3):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_model.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    iris = load_iris()
    x_tr, x_te, y_tr, y_te = train_test_split(
        iris.data.astype("float32"), iris.target, test_size=0.3, random_state=0, stratify=iris.target
    )
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
    model = Classifier(xt.mean(0), xt.std(0))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
    torch.jit.script(model).save(os.path.join(out, "iris.pt"))
    with open(os.path.join(out, "iris_test.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([n.replace(" (cm)", "").replace(" ", "_") for n in iris.feature_names] + ["species"])
        for row, y in zip(x_te, y_te):
            w.writerow([f"{v:.1f}" for v in row] + [int(y)])
    with open(os.path.join(out, "labels.txt"), "w") as f:
        f.write("\n".join(iris.target_names) + "\n")
    print(f"demo model: trained in Python torch {torch.__version__}, test accuracy {acc:.3f}, "
          f"{len(y_te)} held-out rows -> {out}")


if __name__ == "__main__":
    main()
