"""Training from Python: kiln.Sequential / Model.from_spec, fit in the Go
core, evaluate, predict, save, kiln.load and export to TorchScript that
Python torch loads."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.model_selection import train_test_split

import kiln
from kiln import layers


@pytest.fixture(scope="module")
def cancer():
    d = load_breast_cancer()
    y = np.array(d.target_names)[d.target]  # string labels
    return train_test_split(d.data, y, test_size=0.2, random_state=0, stratify=d.target)


def test_fit_evaluate_save_load(cancer, tmp_path):
    xtr, xte, ytr, yte = cancer
    m = kiln.Sequential([layers.Linear(32), layers.ReLU(), layers.Linear()])
    assert "untrained" in repr(m)
    with pytest.raises(kiln.KilnError, match="fit first"):
        m.predict(xte.astype(np.float32))
    seen = []
    hist = m.fit(xtr, ytr, epochs=30, seed=1, verbose=0, callbacks=[seen.append])
    assert len(hist["loss"]) == len(seen) == 30
    assert hist["loss"][-1] < hist["loss"][0]
    assert "val_accuracy" in hist
    assert m.classes_ == ["benign", "malignant"]
    acc = m.evaluate(xte, yte)["accuracy"]
    assert acc >= 0.93

    m.save(tmp_path / "pkg")
    again = kiln.load(tmp_path / "pkg")
    assert again.classes_ == ["benign", "malignant"]
    assert again.evaluate(xte, yte)["accuracy"] == acc

    m.export_torchscript(tmp_path / "model.pt")
    ts = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.no_grad():
        want = ts(torch.from_numpy(xte.astype(np.float32))).numpy()
    np.testing.assert_allclose(m.predict(xte.astype(np.float32)), want, atol=1e-5)


def test_fit_is_reproducible(cancer):
    xtr, _, ytr, _ = cancer
    spec = {"layers": [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear"}]}
    a = kiln.Model.from_spec(spec).fit(xtr, ytr, epochs=3, seed=7, verbose=0)
    b = kiln.Model.from_spec(spec).fit(xtr, ytr, epochs=3, seed=7, verbose=0)
    assert a["loss"] == b["loss"]


def test_regression_from_yaml():
    d = load_diabetes()
    m = kiln.Model.from_spec("layers:\n  - {type: linear, out: 16}\n  - {type: relu}\n  - {type: linear, out: 1}\n")
    m.fit(d.data, d.target.astype(np.float32), epochs=40, lr=0.01, loss="mse", seed=1, verbose=0)
    r = m.evaluate(d.data, d.target)
    assert set(r) == {"mse", "mae", "r2"} and r["r2"] > 0.3


def test_fit_bad_input(cancer):
    xtr, _, ytr, _ = cancer
    m = kiln.Sequential([layers.Linear(4), layers.Linear()])
    with pytest.raises(ValueError, match="rows"):
        m.fit(xtr, ytr[:-1], verbose=0)
    with pytest.raises(ValueError, match="2-D"):
        m.fit(xtr.reshape(-1), ytr, verbose=0)
    with pytest.raises(ValueError, match="validation_split"):
        m.fit(xtr, ytr, validation_split=1.5, verbose=0)
    bad = kiln.Model.from_spec({"layers": [{"type": "convolution5d"}]})
    with pytest.raises(kiln.KilnError, match="convolution5d"):
        bad.fit(xtr, ytr, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="layers"):
        kiln.Model.from_spec({"nope": 1})
