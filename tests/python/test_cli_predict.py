"""The `kiln predict` CLI gives the same predictions as Python torch for the
same TorchScript model, whatever the batch size, and fails cleanly on bad
input."""
import csv
import json
import subprocess

import numpy as np
import pytest
import torch


def run_kiln(kiln_bin, *args, check=True):
    return subprocess.run([str(kiln_bin), *args], capture_output=True, text=True, check=check)


def torch_probs(model_dir):
    with open(model_dir / "iris_test.csv") as f:
        rows = list(csv.reader(f))[1:]
    x = torch.tensor([[float(v) for v in r[:4]] for r in rows])
    m = torch.jit.load(str(model_dir / "iris.pt"))
    with torch.no_grad():
        return torch.softmax(m(x), dim=1).numpy(), [int(r[4]) for r in rows]


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_predict_matches_torch(kiln_bin, demo_model, batch_size):
    probs, truth = torch_probs(demo_model)
    out = run_kiln(
        kiln_bin, "predict", "--model", str(demo_model / "iris.pt"),
        "--data", str(demo_model / "iris_test.csv"), "--labels", str(demo_model / "labels.txt"),
        "--target", "species", "--batch-size", str(batch_size), "--top-k", "3", "--json",
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(truth)
    labels = (demo_model / "labels.txt").read_text().split()
    for r in rows:
        i = r["row"]
        assert r["truth"] == truth[i]
        assert r["classes"][0] == int(np.argmax(probs[i]))
        assert r["labels"] == [labels[c] for c in r["classes"]]
        for c, s in zip(r["classes"], r["scores"]):
            assert abs(s - probs[i][c]) < 1e-6


def test_predict_reports_accuracy(kiln_bin, demo_model):
    out = run_kiln(
        kiln_bin, "predict", "--model", str(demo_model / "iris.pt"),
        "--data", str(demo_model / "iris_test.csv"), "--target", "species",
    ).stdout
    assert "accuracy" in out
    acc = float(out.split("accuracy ")[1].split("%")[0])
    assert acc >= 90.0


def test_info_lists_inputs(kiln_bin, demo_model):
    out = run_kiln(kiln_bin, "info", str(demo_model / "iris.pt")).stdout
    assert "input 0    x: Tensor" in out
    assert "output     Tensor" in out


def test_bad_inputs_are_clear_errors(kiln_bin, demo_model, tmp_path):
    missing = run_kiln(kiln_bin, "predict", "--model", str(tmp_path / "nope.pt"),
                       "--data", str(demo_model / "iris_test.csv"), check=False)
    assert missing.returncode == 1
    assert "nope.pt" in missing.stderr and "no such file" in missing.stderr

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a model")
    bad = run_kiln(kiln_bin, "info", str(corrupt), check=False)
    assert bad.returncode == 1 and "corrupt.pt" in bad.stderr

    # Five features for a four-feature model: libtorch's shape message.
    wide = tmp_path / "wide.csv"
    wide.write_text("1,2,3,4,5\n6,7,8,9,10\n")
    res = run_kiln(kiln_bin, "predict", "--model", str(demo_model / "iris.pt"), "--data", str(wide), check=False)
    assert res.returncode == 1
    assert "float32[2 5]" in res.stderr and "size of tensor" in res.stderr, res.stderr

    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2,3,4\n1,2,3\n")
    res = run_kiln(kiln_bin, "predict", "--model", str(demo_model / "iris.pt"), "--data", str(ragged), check=False)
    assert res.returncode == 1 and "line 2" in res.stderr

    res = run_kiln(kiln_bin, "predict", "--model", str(demo_model / "iris.pt"),
                   "--data", str(demo_model / "iris_test.csv"), "--target", "colour", check=False)
    assert res.returncode == 1 and "colour" in res.stderr
