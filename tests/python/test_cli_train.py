"""`kiln train` end to end: the CLI trains on scikit-learn's breast-cancer
data, and Python's torch.jit.load of the saved package predicts the test
rows as the manifest says (raw features in, preprocessing inside)."""
import csv
import json
import subprocess

import numpy as np
import torch

from conftest import make_fixture

SPEC = """
model:
  layers:
    - {type: linear, out: 32}
    - {type: relu}
    - {type: linear}
split: {val: 0.15, test: 0.2, stratify: true}
train:
  epochs: 40
  batch_size: 32
  seed: 1
  optimizer: {type: adam, lr: 0.001}
  early_stopping: {patience: 8, metric: loss}
"""


def test_train_saves_a_package_python_serves(kiln_bin, tmp_path):
    make_fixture("datasets", tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "pkg"
    run = subprocess.run(
        [str(kiln_bin), "train", "--spec", str(spec), "--data", str(tmp_path / "breast_cancer.csv"),
         "--target", "diagnosis", "--out", str(out)],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "epoch 1/40" in run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "kiln-model/1"
    assert manifest["labels"] == ["benign", "malignant"]
    assert manifest["metrics"]["test"]["accuracy"] >= 0.95

    # Raw feature rows in manifest column order; torch predicts the labels.
    cols = [c["name"] for c in manifest["inputs"][0]["columns"]]
    with open(tmp_path / "breast_cancer.csv") as f:
        rows = list(csv.DictReader(f))
    x = torch.tensor(np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float32))
    truth = [manifest["labels"].index(r["diagnosis"]) for r in rows]
    model = torch.jit.load(str(out / "model.pt"))
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(dim=1).tolist()
    acc = sum(p == t for p, t in zip(pred, truth)) / len(truth)
    assert acc >= 0.95  # every row, train split included


def test_train_names_a_missing_column(kiln_bin, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("a,b\n1,2\n3,4\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    run = subprocess.run(
        [str(kiln_bin), "train", "--spec", str(spec), "--data", str(data), "--target", "label",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True)
    assert run.returncode == 1
    assert 'target column "label" not found; the data has columns a, b' in run.stderr


KERAS_SPEC = """
model:
  layers:
    - {type: linear, out: 10}
    - {type: relu}
    - {type: linear, out: 1}
    - {type: sigmoid}
split: {val: 0.15, test: 0.2, stratify: true}
train: {epochs: 20, batch_size: 32, seed: 1, optimizer: {type: adam, lr: 0.01}}
"""


def test_train_loss_flag_keras_binary(kiln_bin, tmp_path):
    """`kiln train --loss binary_crossentropy` on a network ending in a
    sigmoid: a binary classifier whose TorchScript returns probabilities;
    --loss bce_with_logits on the same network is refused with a hint."""
    make_fixture("datasets", tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(KERAS_SPEC)
    args = [str(kiln_bin), "train", "--spec", str(spec), "--data", str(tmp_path / "breast_cancer.csv"),
            "--target", "diagnosis", "-q"]
    run = subprocess.run(args + ["--out", str(tmp_path / "pkg"), "--loss", "binary_crossentropy"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["labels"] == ["benign", "malignant"]
    assert manifest["outputs"][0]["meaning"].startswith("probability")
    assert manifest["metrics"]["test"]["accuracy"] >= 0.93
    model = torch.jit.load(str(tmp_path / "pkg" / "model.pt"))
    cols = [c["name"] for c in manifest["inputs"][0]["columns"]]
    with open(tmp_path / "breast_cancer.csv") as f:
        rows = list(csv.DictReader(f))
    with torch.no_grad():
        p = model(torch.tensor(np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float32)))
    assert p.shape == (len(rows), 1) and float(p.min()) >= 0 and float(p.max()) <= 1

    run = subprocess.run(args + ["--out", str(tmp_path / "bad"), "--loss", "bce_with_logits"],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "applied twice" in run.stderr
