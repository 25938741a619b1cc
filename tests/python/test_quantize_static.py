"""Static int8 quantization with a calibration set: Model.quantize(...,
calibration=...) from Python and `kiln optimize --quantize int8 --calibrate`
on the CLI; the packages load in Python torch (with the engine their
manifest records) and give Kiln's outputs."""
import csv
import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.datasets import load_digits

import kiln
from kiln import layers as L
from conftest import make_fixture


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.data.astype(np.float32), d.target


@pytest.fixture(scope="module")
def float_package(digits, tmp_path_factory):
    """A trained float MLP's package, which each test loads afresh."""
    x, y = digits
    m = kiln.Sequential([L.Linear(128), L.ReLU(), L.Linear(64), L.ReLU(), L.Linear()])
    m.fit(x, y, epochs=15, seed=1, verbose=0)
    out = tmp_path_factory.mktemp("float") / "pkg"
    m.save(out)
    return out


def torch_outputs(package, x):
    engine = json.loads((package / "manifest.json").read_text())["optimization"]["engine"]
    torch.backends.quantized.engine = engine
    with torch.no_grad():
        return torch.jit.load(str(package / "model.pt"))(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("form", ["numpy", "pandas", "pyarrow"])
def test_quantize_static_with_calibration(digits, float_package, form, tmp_path):
    x, y = digits
    cal = x[:200]
    if form == "pandas":
        pd = pytest.importorskip("pandas")
        cal = pd.DataFrame(cal, columns=[f"px{i}" for i in range(64)])
    elif form == "pyarrow":
        cal = pa.table({f"px{i}": cal[:, i] for i in range(64)})
    m = kiln.load(float_package)
    rec = m.quantize("int8", x, y, calibration=cal)
    assert rec["method"] == "static"
    assert rec["engine"] in torch.backends.quantized.supported_engines
    assert rec["static"]["calibration_rows"] == 200
    assert rec["after"]["name"].startswith("int8 static")
    assert rec["after"]["value"] >= rec["before"]["value"] - 0.02
    assert rec["after"]["file_bytes"] < rec["before"]["file_bytes"] / 3
    assert m.manifest["optimization"]["method"] == "static"

    # Python torch loads the package and agrees with Kiln.
    m.save(tmp_path / "q")
    got = torch_outputs(tmp_path / "q", x[:100])
    np.testing.assert_allclose(got, m.predict(x[:100]), atol=1e-6)


def test_quantize_static_bad_calibration(digits, float_package):
    x, y = digits
    m = kiln.load(float_package)
    with pytest.raises(ValueError, match="has 10 columns per row, the model takes 64 input columns"):
        m.quantize("int8", x, y, calibration=x[:50, :10])
    with pytest.raises(ValueError, match="calibration data is empty"):
        m.quantize("int8", x, y, calibration=x[:0])
    with pytest.raises(ValueError, match="2-D"):
        m.quantize("int8", x, y, calibration=x[0])
    with pytest.raises(kiln.KilnError, match='quantized engine "no-such-engine" is not supported by this libtorch'):
        m.quantize("int8", x, y, engine="no-such-engine", calibration=x[:50])
    # The model is still the float one and quantizes afterwards.
    rec = m.quantize("int8", x, y, calibration=x[:50])
    assert rec["static"]["calibration_rows"] == 50


SPEC = """
model:
  layers:
    - {type: linear, out: 128}
    - {type: relu}
    - {type: linear, out: 64}
    - {type: relu}
    - {type: linear}
split: {val: 0.15, test: 0.2, stratify: true}
train:
  epochs: 15
  batch_size: 32
  seed: 1
  optimizer: {type: adam, lr: 0.002}
"""


def test_cli_prune_then_static_int8(kiln_bin, tmp_path):
    make_fixture("datasets", tmp_path)
    data = tmp_path / "digits.csv"
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    pkg = tmp_path / "pkg"
    run = subprocess.run([str(kiln_bin), "train", "--spec", str(spec), "--data", str(data), "--target", "digit",
                          "--out", str(pkg)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr

    # Calibration rows: the pixel columns only, as Parquet.
    with open(data) as f:
        rows = list(csv.DictReader(f))[:300]
    cols = [f"p{i}" for i in range(64)]
    pq.write_table(pa.table({c: [float(r[c]) for r in rows] for c in cols}), tmp_path / "cal.parquet")

    out = tmp_path / "q"
    run = subprocess.run(
        [str(kiln_bin), "optimize", "--model", str(pkg), "--data", str(data), "--prune", "0.5", "--structured",
         "--finetune-epochs", "3", "--quantize", "int8", "--calibrate", str(tmp_path / "cal.parquet"),
         "--weights", "per-channel", "--out", str(out), "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    names = [v["name"] for v in report["variants"]]
    assert names[0] == "fp32" and names[1] == "pruned 50% structured"
    assert names[2].startswith("pruned 50% structured + int8 static (")
    fp32, static = report["variants"][0], report["variants"][2]
    assert static["value"] >= fp32["value"] - 0.02
    manifest = json.loads((out / "manifest.json").read_text())
    opt = manifest["optimization"]
    assert opt["method"] == "static" and opt["static"]["calibration_rows"] == 300
    assert opt["static"]["weights"] == "qint8 symmetric per-channel"
    assert opt["engine"] in torch.backends.quantized.supported_engines
    assert manifest["spec"]["layers"][0]["out"] == 64

    # Python torch, with the recorded engine, predicts the rows.
    x = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float32)
    truth = np.array([int(r["digit"]) for r in rows])
    assert (torch_outputs(out, x).argmax(1) == truth).mean() >= 0.9

    # Calibration data without the model's columns; --calibrate without int8.
    (tmp_path / "bad.csv").write_text("p0,p1\n1,2\n")
    run = subprocess.run(
        [str(kiln_bin), "optimize", "--model", str(pkg), "--data", str(data), "--quantize", "int8",
         "--calibrate", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode == 1
    assert 'calibration data: kiln: column "p2" not found; the data has columns p0, p1' in run.stderr
    run = subprocess.run(
        [str(kiln_bin), "optimize", "--model", str(pkg), "--data", str(data), "--quantize", "fp16",
         "--calibrate", str(tmp_path / "cal.parquet"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode == 1
    assert "--calibrate is for static int8: add --quantize int8" in run.stderr
