"""Training through Kiln's Arrow Flight service, with the real pyarrow.flight client.

The server is serving/internal/testserver with `-flight ... -trainer kiln`:
flight.ModelTrainer, Kiln's training engine (core/train over libtorch),
writing each trained model as the next version of a model repository that
the same process serves (gRPC and Flight DoExchange), and loading it there.

Data: scikit-learn's bundled breast-cancer data set (binary) and iris
(3 classes, with the species as a dictionary-encoded string column, so the
target is categorical).
"""
import json
import os
import sys
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
fl = pytest.importorskip("pyarrow.flight")
datasets = pytest.importorskip("sklearn.datasets")

from conftest import start_testserver, stop_testserver  # noqa: E402

SPEC_YAML = """
model:
  layers: [{type: linear, out: 32}, {type: relu}, {type: linear}]
data: {scale: standard}
split: {val: 0.15, test: 0.2, stratify: true}
train: {optimizer: {type: adam}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, testserver_bin):
    tmp = tmp_path_factory.mktemp("flight-train")
    repo = tmp / "repo"
    repo.mkdir()
    info = start_testserver(testserver_bin, tmp / "server.log", "-repo", str(repo),
                            "-flight", "127.0.0.1:0", "-data", str(tmp / "data"), "-trainer", "kiln")
    info["repo"] = repo
    yield info
    assert stop_testserver(info) == 0, info["log"].read_text()


@pytest.fixture
def client(server):
    c = fl.FlightClient("grpc://" + server["flight"])
    yield c
    c.close()


def put(client, name, table):
    writer, reader = client.do_put(fl.FlightDescriptor.for_path("datasets", name), table.schema)
    writer.write_table(table, max_chunksize=128)
    writer.done_writing()
    last = None
    while True:
        buf = reader.read()
        if buf is None:
            break
        last = json.loads(buf.to_pybytes())
    writer.close()
    assert last["committed"], last
    return last


def action(client, typ, body):
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    [res] = client.do_action(fl.Action(typ, body))
    return json.loads(res.body.to_pybytes())


def poll(client, job, timeout=240):
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = action(client, "job-status", job)
        seen.append(st)
        if st["state"] != "RUNNING":
            return st, seen
        time.sleep(0.05)
    pytest.fail("job %s did not finish: %s" % (job, seen[-1]))


def breast_cancer_table():
    bc = datasets.load_breast_cancer()
    cols = {"f%02d" % i: bc.data[:, i].astype(np.float32) for i in range(bc.data.shape[1])}
    cols["diagnosis"] = pa.array(np.asarray(bc.target_names)[bc.target])  # "malignant" / "benign"
    return pa.table(cols), bc


def iris_table():
    iris = datasets.load_iris()
    cols = {name.replace(" (cm)", "").replace(" ", "_"): iris.data[:, i] for i, name in enumerate(iris.feature_names)}
    cols["species"] = pa.array(np.asarray(iris.target_names)[iris.target]).dictionary_encode()
    return pa.table(cols), iris


def test_train_breast_cancer_poll_and_serve(client, server):
    table, bc = breast_cancer_table()
    put(client, "breast_cancer", table)
    res = action(client, "train", {
        "dataset": "breast_cancer", "model": "bc", "target": "diagnosis",
        "spec": SPEC_YAML, "epochs": 40, "batch_size": 32, "lr": 0.001, "seed": 1,
    })
    job = res["job_id"]
    st, seen = poll(client, job)
    assert st["state"] == "SUCCEEDED", st
    assert st["fraction"] == 1
    running = [s for s in seen if s["state"] == "RUNNING"]
    for s in running:
        assert s["progress"].get("total", 40) == 40  # none before the trainer's first report
        assert 0 <= s["progress"]["step"] <= 40
    result = st["result"]
    assert result["model"] == "bc" and result["version"] == 1 and result["config_created"]
    assert result["loaded"], result
    assert result["task"] == "classification"
    assert sorted(result["labels"]) == ["benign", "malignant"]
    assert result["epochs"] == 40
    assert result["test"]["accuracy"] >= 0.93, result["test"]
    assert result["val"]["accuracy"] >= 0.9, result["val"]
    assert st["progress"]["metrics"]["test_accuracy"] == result["test"]["accuracy"]

    version = server["repo"] / "bc" / "1"
    assert (version / "model.pt").is_file() and (version / "manifest.json").is_file()
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["labels"] == result["labels"]
    assert "config.yaml" in os.listdir(server["repo"] / "bc")

    # The server serves the new version: DoExchange on the raw features.
    features = table.drop(["diagnosis"]).slice(0, 200)
    writer, reader = client.do_exchange(fl.FlightDescriptor.for_path("models", "bc"))
    writer.begin(features.schema)
    writer.write_table(features)
    writer.done_writing()
    out = reader.read_all()
    writer.close()
    col = out.column("y").combine_chunks()
    if isinstance(col, pa.ExtensionArray):  # fixed_shape_tensor [1]
        col = col.storage
    if pa.types.is_fixed_size_list(col.type):
        col = col.flatten()
    logits = col.to_numpy(zero_copy_only=False)
    # Classification trains with cross-entropy by default: one logit per
    # class, in labels order.
    logits = logits.reshape(200, 2)
    predicted = np.asarray(result["labels"])[logits.argmax(axis=1)]
    truth = np.asarray(bc.target_names)[bc.target][:200]
    assert (predicted == truth).mean() >= 0.9
    assert (server["repo"] / "bc" / "labels.txt").read_text().split() == result["labels"]


def test_train_iris_categorical_target(client, server):
    table, iris = iris_table()
    put(client, "iris", table)
    job = action(client, "train", {
        "dataset": "iris", "model": "iris", "target": "species",
        "spec": {"model": {"layers": [{"type": "linear", "out": 16}, {"type": "relu"}, {"type": "linear"}]},
                 "split": {"val": 0.2, "test": 0.2, "stratify": True}},
        "epochs": 60, "batch_size": 16, "optimizer": "adam", "lr": 0.01, "seed": 2,
    })["job_id"]
    st, _ = poll(client, job)
    assert st["state"] == "SUCCEEDED", st
    result = st["result"]
    assert result["labels"] == ["setosa", "versicolor", "virginica"]
    assert result["test"]["accuracy"] >= 0.85, result["test"]
    labels = (server["repo"] / "iris" / "labels.txt").read_text().split()
    assert labels == result["labels"]


def test_cancel_long_job(client, server):
    table, _ = breast_cancer_table()
    put(client, "bc_long", table)
    job = action(client, "train", {
        "dataset": "bc_long", "model": "bc_long", "target": "diagnosis",
        "spec": SPEC_YAML, "epochs": 1000000, "batch_size": 8,
    })["job_id"]
    deadline = time.time() + 120
    while True:
        st = action(client, "job-status", job)
        assert st["state"] == "RUNNING", st
        if st["progress"].get("metrics", {}).get("loss", 0) > 0:
            break
        assert time.time() < deadline, st
        time.sleep(0.05)
    action(client, "cancel", {"job_id": job})
    st, _ = poll(client, job, timeout=60)
    assert st["state"] == "CANCELLED", st
    assert "result" not in st
    # A cancelled job leaves nothing in the repository: no model directory,
    # no staging directory.
    assert not (server["repo"] / "bc_long").exists()
    assert not [p for p in os.listdir(server["repo"]) if p.startswith(".")]


def test_bad_target_fails_clearly(client, server):
    table, _ = iris_table()
    put(client, "iris_bad", table)
    # Checked before a job starts: the action itself fails (INVALID_ARGUMENT).
    with pytest.raises(pa.ArrowInvalid, match='target column "colour" not found'):
        action(client, "train", {"dataset": "iris_bad", "target": "colour", "spec": SPEC_YAML})
    with pytest.raises(pa.ArrowInvalid, match="model name"):
        action(client, "train", {"dataset": "iris_bad", "target": "species", "spec": SPEC_YAML, "model": "../up"})
    # Layers and hyper-parameters are checked before a job starts too.
    with pytest.raises(pa.ArrowInvalid, match="linearr"):
        action(client, "train", {"dataset": "iris_bad", "target": "species", "model": "bc_doomed",
                                 "spec": "model: {layers: [{type: linearr}]}"})
    # A job that fails later (a layer whose "in" does not fit the data's
    # width) leaves no model directory behind.
    job = action(client, "train", {"dataset": "iris_bad", "target": "species", "model": "bc_doomed",
                                   "spec": "model: {layers: [{type: linear, in: 999}]}"})["job_id"]
    st, _ = poll(client, job)
    assert st["state"] == "FAILED"
    assert "in=999" in st["error"]
    assert not (server["repo"] / "bc_doomed").exists()
    with pytest.raises(KeyError, match='dataset "nope" does not exist'):  # NOT_FOUND
        action(client, "train", {"dataset": "nope", "target": "x", "spec": SPEC_YAML})
