"""`kiln evaluate` end to end: two `kiln train` packages of scikit-learn's
digits of different quality (20 epochs vs 1) scored on held-out rows. The
better one as candidate is promoted, the worse one rejected; the evidence's
metrics and McNemar's test agree with scikit-learn and statsmodels on
Python torch's own forward pass; a Parquet holdout gives the same evidence;
bad references and data fail before any work with clear errors."""
import csv
import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss
from statsmodels.stats.contingency_tables import mcnemar

from conftest import make_fixture

SPEC = """
model:
  layers: [{type: linear, out: 32}, {type: relu}, {type: linear}]
split: {val: 0.15, stratify: true}
train: {epochs: 20, batch_size: 64, seed: 1, optimizer: {type: adam, lr: 0.003}}
"""


@pytest.fixture(scope="module")
def digits_models(kiln_bin, tmp_path_factory):
    """(dir, good, poor, holdout): digits rows 0-1398 train both packages,
    rows 1399-1796 are the holdout CSV."""
    d = make_fixture("datasets", tmp_path_factory.mktemp("evaluate"))
    with open(d / "digits.csv") as f:
        rows = list(csv.reader(f))
    for name, part in (("train.csv", rows[1:1400]), ("holdout.csv", rows[1400:])):
        with open(d / name, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + part)
    (d / "spec.yaml").write_text(SPEC)
    for out, epochs, seed in (("good", "20", "1"), ("poor", "1", "2")):
        subprocess.run([str(kiln_bin), "train", "-q", "--spec", str(d / "spec.yaml"), "--data", str(d / "train.csv"),
                        "--target", "digit", "--out", str(d / out), "--epochs", epochs, "--seed", seed],
                       check=True, capture_output=True)
    return d, d / "good", d / "poor", d / "holdout.csv"


def evaluate(kiln_bin, *args):
    return subprocess.run([str(kiln_bin), "evaluate", "-q", *map(str, args)], capture_output=True, text=True)


def torch_scores(pkg, holdout):
    """Python torch's forward of the package on the holdout: (truth, pred,
    probabilities), classes in the manifest's label order."""
    man = json.loads((pkg / "manifest.json").read_text())
    cols = [c["name"] for c in man["inputs"][0]["columns"]]
    with open(holdout) as f:
        rows = list(csv.DictReader(f))
    x = torch.tensor(np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float32))
    model = torch.jit.load(str(pkg / "model.pt"))
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    truth = np.array([man["labels"].index(r["digit"]) for r in rows])
    return truth, logits.argmax(dim=1).numpy(), torch.softmax(logits, dim=1).numpy()


def test_better_is_promoted_worse_rejected(kiln_bin, digits_models):
    d, good, poor, holdout = digits_models
    run = evaluate(kiln_bin, "--candidate", good, "--baseline", poor, "--data", holdout, "--json", "--seed", "7")
    assert run.returncode == 0, run.stderr
    ev = json.loads(run.stdout)
    assert ev["verdict"] == "PROMOTE", ev["reason"]
    assert ev["data"]["rows"] == 398 and ev["metric"] == "accuracy" and ev["significant"]

    truth, pred_good, p_good = torch_scores(good, holdout)
    _, pred_poor, p_poor = torch_scores(poor, holdout)
    for side, pred, prob in (("candidate", pred_good, p_good), ("baseline", pred_poor, p_poor)):
        m = ev[side]["metrics"]
        assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred), abs=1e-12)
        assert m["f1_macro"] == pytest.approx(f1_score(truth, pred, average="macro"), abs=1e-9)
        assert m["log_loss"] == pytest.approx(log_loss(truth, prob, labels=list(range(10))), rel=1e-6)
    b = int(np.sum((pred_poor == truth) & (pred_good != truth)))
    c = int(np.sum((pred_good == truth) & (pred_poor != truth)))
    assert (ev["mcnemar"]["b"], ev["mcnemar"]["c"]) == (b, c)
    ref = mcnemar([[0, b], [c, 0]], exact=b + c < 25, correction=True)
    assert ev["mcnemar"]["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-11)
    assert ev["mcnemar"]["exact"] == (b + c < 25)

    run = evaluate(kiln_bin, "--candidate", poor, "--baseline", good, "--data", holdout, "--json")
    assert run.returncode == 0, run.stderr  # every verdict exits 0
    assert json.loads(run.stdout)["verdict"] == "REJECT"

    # A Parquet holdout is the same rows: the same evidence.
    with open(holdout) as f:
        rows = list(csv.DictReader(f))
    table = pa.table({k: [int(r[k]) for r in rows] for k in rows[0]})
    pq.write_table(table, d / "holdout.parquet")
    run = evaluate(kiln_bin, "--candidate", good, "--baseline", poor, "--data", d / "holdout.parquet", "--json", "--seed", "7")
    assert run.returncode == 0, run.stderr
    evp = json.loads(run.stdout)
    assert evp["verdict"] == "PROMOTE"
    assert evp["mcnemar"] == ev["mcnemar"] and evp["interval"] == ev["interval"]
    assert evp["candidate"]["metrics"] == pytest.approx(ev["candidate"]["metrics"], rel=1e-12)


def test_text_report(kiln_bin, digits_models):
    d, good, poor, holdout = digits_models
    run = evaluate(kiln_bin, "--candidate", good, "--baseline", poor, "--data", holdout, "--min-margin", "0.9",
                   "--report", d / "ev.json")
    assert run.returncode == 0, run.stderr
    assert "verdict    HOLD: significantly better but below the margin" in run.stdout
    assert json.loads((d / "ev.json").read_text())["verdict"] == "HOLD"


def test_bad_input_fails_before_work(kiln_bin, digits_models, tmp_path):
    d, good, poor, holdout = digits_models
    run = evaluate(kiln_bin, "--candidate", tmp_path / "nope", "--baseline", poor, "--data", holdout)
    assert run.returncode == 1
    assert "no such model package" in run.stderr

    with open(holdout) as f:
        rows = list(csv.reader(f))
    with open(tmp_path / "short.csv", "w", newline="") as f:
        csv.writer(f).writerows([r[:10] + r[-1:] for r in rows])  # p10..p63 dropped
    run = evaluate(kiln_bin, "--candidate", good, "--baseline", poor, "--data", tmp_path / "short.csv")
    assert run.returncode == 1
    assert "the data does not fit the models: the candidate (" in run.stderr
    assert "needs column(s) p10, p11" in run.stderr
    assert "latency" not in run.stdout  # nothing was scored
