"""Raw records at serving: a model trained through Flight on a table with a
string category column and nulls takes one input per column when served,
category strings as KServe v2 BYTES (gRPC raw and typed, REST JSON and
binary) and Arrow string/dictionary columns over Flight, numbers as FP32;
the server applies the stored vocabulary and null handling, the package's
forward the imputation, scaling and one-hot encoding. Predictions equal
Python applying the same encoding to the same rows and running the
TorchScript package."""
import json
import math

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
fl = pytest.importorskip("pyarrow.flight")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import start_testserver, stop_testserver  # noqa: E402
from test_flight_train import action, poll, put  # noqa: E402

SPEC = """
model: {layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]}
data: {impute: mean}
split: {val: 0.2, test: 0, stratify: true}
train: {optimizer: {type: adam, lr: 0.01}}
"""
COLOURS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, testserver_bin):
    tmp = tmp_path_factory.mktemp("raw-records")
    repo = tmp / "repo"
    repo.mkdir()
    info = start_testserver(testserver_bin, tmp / "server.log", "-repo", str(repo), "-http",
                            "-flight", "127.0.0.1:0", "-data", str(tmp / "data"), "-trainer", "kiln")
    info["repo"] = repo
    yield info
    assert stop_testserver(info) == 0, info["log"].read_text()


def table(n=400, seed=0):
    rng = np.random.default_rng(seed)
    size = rng.normal(50, 10, n)
    weight = rng.normal(0, 3, n)
    colour = rng.integers(0, 3, n)
    kind = np.where((size - 50) / 10 + weight / 3 + (colour == 2) * 1.5 > 0.5, "large", "small")
    size_col = [None if i % 13 == 3 else float(v) for i, v in enumerate(size)]
    colour_col = [None if i % 11 == 5 else COLOURS[c] for i, c in enumerate(colour)]
    return pa.table({"size": pa.array(size_col, pa.float32()), "weight": pa.array(weight, pa.float64()),
                     "colour": pa.array(colour_col, pa.string()), "kind": pa.array(kind)})


@pytest.fixture(scope="module")
def trained(server):
    c = fl.FlightClient("grpc://" + server["flight"])
    put(c, "mixed", table())
    res = action(c, "train", {"dataset": "mixed", "model": "rec", "target": "kind", "spec": SPEC,
                              "epochs": 15, "batch_size": 32, "seed": 1})
    st, _ = poll(c, res["job_id"])
    c.close()
    assert st["state"] == "SUCCEEDED", st
    version = server["repo"] / "rec" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    model = torch.jit.load(str(version / "model.pt"))
    model.eval()
    return manifest, model


# Rows as a client has them: an unknown category, a null category, a null number.
ROWS = {"size": [55.0, float("nan"), 42.0, 61.5], "weight": [1.0, -2.0, 0.5, 3.0],
        "colour": [b"blue", b"purple", b"", b"red"]}


def python_reference(manifest, model, rows):
    """The stored preprocessing's raw encoding applied in Python (category
    index, NaN for unknown or null), then the package's forward."""
    cols = manifest["inputs"][0]["columns"]
    x = np.zeros((len(rows["size"]), len(cols)), dtype=np.float32)
    for j, c in enumerate(cols):
        for i, v in enumerate(rows[c["name"]]):
            if c.get("categorical"):
                s = v.decode()
                x[i, j] = c["categories"].index(s) if s in c["categories"] else math.nan
            else:
                x[i, j] = v
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def grpc_inputs(rows, colour_type="BYTES"):
    n = len(rows["size"])
    out = []
    for name in ("size", "weight", "colour"):
        if name == "colour":
            arr = np.array(rows[name], dtype=np.object_).reshape(n, 1)
            if colour_type != "BYTES":
                arr = np.zeros((n, 1), dtype=np.float32)
            i = grpcclient.InferInput(name, [n, 1], colour_type)
        else:
            arr = np.array(rows[name], dtype=np.float32).reshape(n, 1)
            i = grpcclient.InferInput(name, [n, 1], "FP32")
        i.set_data_from_numpy(arr)
        out.append(i)
    return out


def test_metadata_lists_columns(server, trained):
    c = grpcclient.InferenceServerClient(server["grpc"])
    meta = c.get_model_metadata("rec", as_json=True)
    got = {i["name"]: (i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]}
    assert got == {"size": ("FP32", [-1, 1]), "weight": ("FP32", [-1, 1]), "colour": ("BYTES", [-1, 1])}
    h = httpclient.InferenceServerClient(server["http"])
    assert {i["name"]: i["datatype"] for i in h.get_model_metadata("rec")["inputs"]} == \
        {"size": "FP32", "weight": "FP32", "colour": "BYTES"}


def test_grpc_raw_rows_match_python(server, trained):
    manifest, model = trained
    want = python_reference(manifest, model, ROWS)
    assert np.isfinite(want).all(), "the null number is imputed, the unknown and null categories encoded"
    c = grpcclient.InferenceServerClient(server["grpc"])
    got = c.infer("rec", grpc_inputs(ROWS)).as_numpy("y")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InferenceServerException) as e:
        c.infer("rec", grpc_inputs(ROWS, colour_type="FP32"))
    assert "INVALID_ARGUMENT" in str(e.value.status()) and "BYTES" in e.value.message()


@pytest.mark.parametrize("binary", [True, False])
def test_http_raw_rows_match_python(server, trained, binary):
    manifest, model = trained
    want = python_reference(manifest, model, ROWS)
    c = httpclient.InferenceServerClient(server["http"])
    n = len(ROWS["size"])
    ins = []
    for name in ("size", "weight"):
        i = httpclient.InferInput(name, [n, 1], "FP32")
        i.set_data_from_numpy(np.array(ROWS[name], dtype=np.float32).reshape(n, 1), binary_data=True)
        ins.append(i)
    i = httpclient.InferInput("colour", [n, 1], "BYTES")
    i.set_data_from_numpy(np.array(ROWS["colour"], dtype=np.object_).reshape(n, 1), binary_data=binary)
    ins.append(i)
    got = c.infer("rec", ins).as_numpy("y")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    bad = httpclient.InferInput("colour", [n, 2], "BYTES")
    bad.set_data_from_numpy(np.array(ROWS["colour"] * 2, dtype=np.object_).reshape(n, 2), binary_data=binary)
    with pytest.raises(InferenceServerException) as e:
        c.infer("rec", ins[:2] + [bad])
    assert e.value.status() == "400"


def test_flight_exchange_string_columns(server, trained):
    manifest, model = trained
    want = python_reference(manifest, model, ROWS)
    colour = pa.array([s.decode() or None for s in ROWS["colour"]], pa.string())
    size = pa.array([None if math.isnan(v) else v for v in ROWS["size"]], pa.float64())
    for col in (colour, colour.dictionary_encode()):
        t = pa.table({"size": size, "weight": pa.array(ROWS["weight"], pa.float32()), "colour": col})
        c = fl.FlightClient("grpc://" + server["flight"])
        writer, reader = c.do_exchange(fl.FlightDescriptor.for_path("models", "rec"))
        writer.begin(t.schema)
        writer.write_table(t)
        writer.done_writing()
        out = reader.read_all()
        writer.close()
        c.close()
        y = out.column("y").combine_chunks()
        if isinstance(y, pa.ExtensionArray):
            y = y.storage
        got = y.flatten().to_numpy(zero_copy_only=False).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
