"""Kiln's gRPC inference server against the stock tritonclient.grpc client.

The server is serving/internal/testserver, built into a temp dir, over the
repository the serving-repo fixture (tests/fixtures/kiln_fixtures.py) writes (models affine,
classifier, int_ops and corrupt).
"""
import queue
import signal

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402
from conftest import make_fixture, start_testserver  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, testserver_bin):
    tmp = tmp_path_factory.mktemp("serving")
    repo = make_fixture("serving-repo", tmp / "repo")
    info = start_testserver(testserver_bin, tmp / "server.log", "-repo", str(repo), "-grpc", "127.0.0.1:0")
    proc = info["proc"]
    yield {"url": info["grpc"], "proc": proc, "log": info["log"], "repo": repo}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(url=server["url"])
    yield c
    c.close()


def infer_affine(client, x, version=""):
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("affine", [inp], model_version=version)


def test_health_and_metadata(client):
    assert client.is_server_live()
    # corrupt failed to load, so the server is not ready until it is unloaded
    index = {(m["name"], m.get("version", "")): m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index[("corrupt", "1")]["state"] == "UNAVAILABLE"
    assert "zip archive" in index[("corrupt", "1")]["reason"]
    assert index[("affine", "2")]["state"] == "READY"
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "kiln"
    assert "classification" in meta["extensions"]
    mm = client.get_model_metadata("affine", as_json=True)
    assert mm["versions"] == ["1", "2"]
    assert mm["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert [o["name"] for o in mm["outputs"]] == ["y", "s"]
    cfg = client.get_model_config("affine", as_json=True)["config"]
    assert cfg["max_batch_size"] == 8
    assert cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"
    assert client.is_model_ready("affine", "1")
    assert not client.is_model_ready("affine", "3")


@pytest.mark.parametrize("rows", [1, 5])
def test_infer_fp32(client, rows):
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    res = infer_affine(client, x)
    np.testing.assert_allclose(res.as_numpy("y"), x * 3 + 1)
    np.testing.assert_allclose(res.as_numpy("s"), x.sum(axis=1))
    assert res.get_response().model_version == "2"
    res = infer_affine(client, x, version="1")
    np.testing.assert_allclose(res.as_numpy("y"), x * 2 + 1)


def test_infer_int64_without_batching(client):
    ids = np.array([3, -1, 7, 0], dtype=np.int64)
    inp = grpcclient.InferInput("ids", [4], "INT64")
    inp.set_data_from_numpy(ids)
    res = client.infer("int_ops", [inp], outputs=[grpcclient.InferRequestedOutput("halves"), grpcclient.InferRequestedOutput("doubled")])
    assert [o.name for o in res.get_response().outputs] == ["halves", "doubled"]
    np.testing.assert_array_equal(res.as_numpy("doubled"), ids * 2)
    assert res.as_numpy("doubled").dtype == np.int64
    np.testing.assert_allclose(res.as_numpy("halves"), ids.astype(np.float32) * 0.5)


def test_classification(client):
    x = np.array([[0.1, 0.9, 0.5, 7.0], [3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("classifier", [inp], outputs=[grpcclient.InferRequestedOutput("scores", class_count=2)])
    got = res.as_numpy("scores")
    assert got.shape == (2, 2)
    assert [[s.decode() for s in row] for row in got] == [
        ["0.900000:1:dog", "0.500000:2:bird"],
        ["3.000000:0:cat", "2.000000:1:dog"],
    ]


def expect_error(fn, status, *fragments):
    with pytest.raises(InferenceServerException) as e:
        fn()
    assert e.value.status() == status, e.value
    for f in fragments:
        assert f in e.value.message(), e.value.message()


def test_bad_inputs(client):
    x = np.ones((1, 4), dtype=np.int32)
    inp = grpcclient.InferInput("x", [1, 4], "INT32")
    inp.set_data_from_numpy(x)
    expect_error(lambda: client.infer("affine", [inp]), "StatusCode.INVALID_ARGUMENT",
                 'input "x"', "expected datatype FP32", '"INT32"')
    y = np.ones((2, 5), dtype=np.float32)
    inp = grpcclient.InferInput("x", [2, 5], "FP32")
    inp.set_data_from_numpy(y)
    expect_error(lambda: client.infer("affine", [inp]), "StatusCode.INVALID_ARGUMENT",
                 'input "x"', "expected shape [-1,4]", "received [2,5]")
    # raw bytes of the wrong length: shape says 2 rows, data holds 1
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    inp.set_shape([2, 4])
    expect_error(lambda: client.infer("affine", [inp]), "StatusCode.INVALID_ARGUMENT",
                 'input "x"', "holds 16 bytes", "needs 32")
    inp = grpcclient.InferInput("ids", [1], "INT64")
    inp.set_data_from_numpy(np.zeros(1, dtype=np.int64))
    inp.set_shape([-2])
    expect_error(lambda: client.infer("int_ops", [inp]), "StatusCode.INVALID_ARGUMENT",
                 'input "ids"', "negative")
    inp.set_shape([2**62])
    expect_error(lambda: client.infer("int_ops", [inp]), "StatusCode.INVALID_ARGUMENT",
                 'input "ids"', "too large")
    expect_error(lambda: infer_affine(client, np.ones((1, 4), np.float32), version="9"), "StatusCode.NOT_FOUND", "version 9")
    expect_error(lambda: client.infer("nope", [inp]), "StatusCode.NOT_FOUND", '"nope"')
    # the server still answers
    res = infer_affine(client, np.ones((1, 4), np.float32))
    np.testing.assert_allclose(res.as_numpy("y"), np.full((1, 4), 4.0))


def test_streaming(client):
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(6):
            x = np.full((1, 4), float(i), dtype=np.float32)
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer("affine", [inp], request_id=str(i), model_version="1")
        got = {}
        for _ in range(6):
            result, error = results.get(timeout=30)
            assert error is None, error
            got[result.get_response().id] = result.as_numpy("y")
    finally:
        client.stop_stream()
    assert sorted(got) == [str(i) for i in range(6)]
    for i, y in got.items():
        np.testing.assert_allclose(y, np.full((1, 4), 2 * float(i) + 1))


def test_load_unload_and_statistics(client):
    client.unload_model("classifier")
    assert not client.is_model_ready("classifier")
    client.load_model("classifier")
    assert client.is_model_ready("classifier")
    expect_error(lambda: client.load_model("corrupt"), "StatusCode.INTERNAL", "corrupt")
    client.unload_model("corrupt")
    assert client.is_server_ready()
    stats = client.get_inference_statistics("affine", "2", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) > 0
    assert int(stats["inference_stats"]["success"]["count"]) > 0


def test_sigterm_exits_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, server["log"].read_text()
