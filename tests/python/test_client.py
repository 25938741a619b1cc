"""kiln.Client against Kiln's gRPC server: the same answers as the stock
tritonclient.grpc client, and errors as Kiln exceptions."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

import kiln
from conftest import make_fixture, start_testserver  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory, testserver_bin):
    tmp = tmp_path_factory.mktemp("client")
    repo = make_fixture("serving-repo", tmp / "repo")
    info = start_testserver(testserver_bin, tmp / "server.log", "-repo", str(repo), "-grpc", "127.0.0.1:0")
    yield info["grpc"]
    info["proc"].kill()
    info["proc"].wait()


def test_infer_matches_tritonclient(url):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with kiln.Client(url) as c:
        assert c.is_live()
        got = c.infer("affine", {"x": x}, version="1")
    t = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("x", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    want = t.infer("affine", [inp], model_version="1")
    np.testing.assert_array_equal(got["y"], want.as_numpy("y"))
    np.testing.assert_array_equal(got["s"], want.as_numpy("s"))
    np.testing.assert_array_equal(got["y"], x * 2 + 1)
    t.close()


def test_int64_outputs_subset_and_metadata(url):
    c = kiln.Client(url)
    ids = np.array([1, -2, 7], dtype=np.int64)
    out = c.infer("int_ops", {"ids": ids}, outputs=["doubled"])
    assert list(out) == ["doubled"]
    assert out["doubled"].dtype == np.int64
    np.testing.assert_array_equal(out["doubled"], ids * 2)
    meta = c.model_metadata("affine")
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert c.server_metadata()["name"] == "kiln"
    states = {(m["name"], m["version"]): m["state"] for m in c.repository_index()}
    assert states[("affine", "2")] == "READY"
    assert c.is_model_ready("affine", "2")
    assert "kiln.Client" in repr(c)


def test_errors_are_kiln_exceptions(url):
    c = kiln.Client(url)
    with pytest.raises(kiln.InferenceError, match="x"):
        c.infer("affine", {"x": np.zeros((2, 5), np.float32)})
    with pytest.raises(ValueError):  # InferenceError is a ValueError
        c.infer("affine", {"x": np.zeros((2, 4), np.int64)})
    with pytest.raises(kiln.ServerError) as e:
        c.infer("nope", {"x": np.zeros((1, 4), np.float32)})
    assert e.value.code.name == "NOT_FOUND"
    # Each code is also the Kiln class of that code, as in-process.
    assert isinstance(e.value, kiln.NotFoundError) and isinstance(e.value, LookupError)
    with pytest.raises(kiln.InferenceError) as e:
        c.infer("affine", {"x": np.zeros((2, 5), np.float32)})
    assert isinstance(e.value, kiln.ServerError) and e.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(TypeError, match="complex"):
        c.infer("affine", {"x": np.zeros((1, 4), np.complex64)})
    # The server keeps serving.
    assert c.infer("affine", {"x": np.ones((1, 4), np.float32)}, version="2")["y"].tolist() == [[4.0] * 4]
