"""Kiln's HTTP/REST (KServe v2) endpoints and metrics against the stock
tritonclient.http client: binary data extension (the client's default) and
plain JSON, on `kiln serve` over the serving test repository
(serving/internal/testmodels/make_repo.py)."""
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
fl = pytest.importorskip("pyarrow.flight")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def start_serve(kiln_bin, repo, log_path, *extra):
    host = ["--host", "127.0.0.1"] if "--host" not in extra else []
    flight = ["--flight-port", "-1"] if "--flight-port" not in extra else []
    proc = subprocess.Popen(
        [str(kiln_bin), "serve", "--model-repository", str(repo), *host,
         "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", *flight, *extra],
        stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True)
    addrs = {}
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        key, _, rest = line.removeprefix("kiln serve: ").partition(" ")
        addrs[key] = rest.strip()
        if "SIGTERM" in line:
            addrs["http"] = addrs["HTTP"].split("://", 1)[1].split("/", 1)[0]
            return proc, addrs
    proc.kill()
    pytest.fail("kiln serve did not start:\n" + pathlib.Path(log_path).read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving-http") / "repo"
    subprocess.run([os.environ.get("KILN_PYTHON", sys.executable), str(ROOT / "serving/internal/testmodels/make_repo.py"), str(out)],
                   check=True)
    return out


@pytest.fixture(scope="module")
def server(kiln_bin, repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-http") / "serve.log"
    proc, addrs = start_serve(kiln_bin, repo, log)
    yield addrs
    proc.terminate()
    assert proc.wait(timeout=60) == 0, log.read_text()


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(url=server["http"])
    yield c
    c.close()


def expect_error(fn, status, *fragments):
    with pytest.raises(InferenceServerException) as e:
        fn()
    assert e.value.status() == status, e.value
    for f in fragments:
        assert f in e.value.message(), e.value.message()


def expect_grpc_error(fn, code):
    with pytest.raises(InferenceServerException) as e:
        fn()
    assert e.value.status() == "StatusCode." + code, e.value


def affine_input(x, binary=True):
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_health_metadata_config(client):
    assert client.is_server_live()
    assert not client.is_server_ready()  # "corrupt" failed to load
    index = {(m["name"], m.get("version", "")): m for m in client.get_model_repository_index()}
    assert index[("corrupt", "1")]["state"] == "UNAVAILABLE"
    assert index[("affine", "1")]["state"] == "READY"
    meta = client.get_server_metadata()
    assert meta["name"] == "kiln" and "binary_tensor_data" in meta["extensions"]
    mm = client.get_model_metadata("affine")
    assert mm["versions"] == ["1", "2"]
    assert mm["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.get_model_metadata("affine", model_version="1")["name"] == "affine"
    cfg = client.get_model_config("affine")
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert client.is_model_ready("affine", "2") and not client.is_model_ready("affine", "3")


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("binary", [True, False])
def test_infer_fp32(client, rows, binary):
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 3
    outputs = [httpclient.InferRequestedOutput("y", binary_data=binary), httpclient.InferRequestedOutput("s", binary_data=binary)]
    res = client.infer("affine", [affine_input(x, binary)], outputs=outputs)
    np.testing.assert_allclose(res.as_numpy("y"), x * 3 + 1, rtol=1e-6)
    np.testing.assert_allclose(res.as_numpy("s"), x.sum(axis=1), rtol=1e-6)
    assert res.get_response()["model_version"] == "2"
    # No outputs listed: the client asks for binary_data_output.
    res = client.infer("affine", [affine_input(x, binary)], model_version="1", request_id="abc")
    np.testing.assert_allclose(res.as_numpy("y"), x * 2 + 1, rtol=1e-6)
    assert res.get_response()["id"] == "abc"


@pytest.mark.parametrize("binary", [True, False])
def test_infer_int64_without_batching(client, binary):
    ids = np.array([3, -1, 7, 2**40], dtype=np.int64)
    inp = httpclient.InferInput("ids", [4], "INT64")
    inp.set_data_from_numpy(ids, binary_data=binary)
    res = client.infer("int_ops", [inp], outputs=[httpclient.InferRequestedOutput("doubled", binary_data=binary),
                                                   httpclient.InferRequestedOutput("halves", binary_data=binary)])
    assert res.as_numpy("doubled").dtype == np.int64
    np.testing.assert_array_equal(res.as_numpy("doubled"), ids * 2)
    np.testing.assert_allclose(res.as_numpy("halves"), ids.astype(np.float32) * 0.5)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_and_softmax(client, binary):
    x = np.array([[0.1, 0.9, 0.5, 7.0], [3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    res = client.infer("classifier", [affine_input(x)],
                       outputs=[httpclient.InferRequestedOutput("scores", binary_data=binary, class_count=2)])
    got = [[s.decode() if isinstance(s, bytes) else s for s in row] for row in res.as_numpy("scores")]
    assert got == [["0.900000:1:dog", "0.500000:2:bird"], ["3.000000:0:cat", "2.000000:1:dog"]]
    p = client.infer("probs", [affine_input(x)]).as_numpy("p")
    e = np.exp(x[:, :3] - x[:, :3].max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-5)


def test_compressed_request(client):
    x = np.ones((3, 4), dtype=np.float32)
    for algo in ("gzip", "deflate"):
        res = client.infer("affine", [affine_input(x)], request_compression_algorithm=algo)
        np.testing.assert_allclose(res.as_numpy("y"), np.full((3, 4), 4.0))


def test_bad_requests(client):
    inp = httpclient.InferInput("x", [1, 4], "INT32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.int32))
    expect_error(lambda: client.infer("affine", [inp]), "400", 'input "x"', "expected datatype FP32", '"INT32"')
    expect_error(lambda: client.infer("affine", [affine_input(np.ones((2, 5), np.float32))]), "400",
                 "expected shape [-1,4], received [2,5]")
    inp = affine_input(np.ones((1, 4), np.float32))
    inp.set_shape([2, 4])
    expect_error(lambda: client.infer("affine", [inp]), "400", 'input "x"', "holds 16 bytes", "needs 32")
    expect_error(lambda: client.infer("affine", [affine_input(np.ones((9, 4), np.float32))]), "400", "exceeds max_batch_size 8")
    expect_error(lambda: client.infer("nope", [affine_input(np.ones((1, 4), np.float32))]), "404", '"nope"')
    expect_error(lambda: client.infer("affine", [affine_input(np.ones((1, 4), np.float32))], model_version="9"), "404", "version 9")
    expect_error(lambda: client.get_model_metadata("nope"), "404", "nope")
    res = client.infer("affine", [affine_input(np.ones((1, 4), np.float32))])
    np.testing.assert_allclose(res.as_numpy("y"), np.full((1, 4), 4.0))


def test_load_unload_stats_and_metrics(client, server):
    client.unload_model("classifier")
    assert not client.is_model_ready("classifier")
    client.load_model("classifier")
    assert client.is_model_ready("classifier")
    expect_error(lambda: client.load_model("corrupt"), "500", "corrupt")
    client.unload_model("corrupt")
    assert client.is_server_ready()
    stats = client.get_inference_statistics("affine", "2")["model_stats"][0]
    assert int(stats["inference_count"]) > 0
    assert int(stats["inference_stats"]["success"]["count"]) > 0
    assert len(client.get_inference_statistics()["model_stats"]) >= 4

    def count():
        text = urllib.request.urlopen(server["metrics"], timeout=30).read().decode()
        for line in text.splitlines():
            if line.startswith('nv_inference_count{model="affine",version="2"}'):
                return float(line.split()[-1])
        return 0.0
    before = count()
    client.infer("affine", [affine_input(np.ones((3, 4), np.float32))])
    assert count() == before + 3


TOKEN = "s3cret-token-for-tests-0123"


def test_auth_token(kiln_bin, repo, tmp_path):
    """One policy: the repository API needs the token on HTTP and gRPC, so
    do Flight's datasets; inference, health and metadata need none."""
    proc, addrs = start_serve(kiln_bin, repo, tmp_path / "serve.log", "--auth-token", TOKEN,
                              "--flight-port", "0", "--data-dir", str(tmp_path / "data"))
    try:
        c = httpclient.InferenceServerClient(url=addrs["http"])
        expect_error(lambda: c.get_model_repository_index(), "401", "bearer token")
        expect_error(lambda: c.unload_model("affine"), "401")
        assert c.get_model_repository_index(headers={"Authorization": "Bearer " + TOKEN})
        c.unload_model("corrupt", headers={"Authorization": "Bearer " + TOKEN})
        res = c.infer("affine", [affine_input(np.ones((1, 4), np.float32))])  # inference needs no token
        np.testing.assert_allclose(res.as_numpy("y"), np.full((1, 4), 4.0))
        assert c.is_server_live()
        g = grpcclient.InferenceServerClient(url=addrs["gRPC"])
        expect_grpc_error(lambda: g.get_model_repository_index(), "UNAUTHENTICATED")
        assert g.get_model_repository_index(headers={"authorization": "Bearer " + TOKEN})
        flight = addrs["Flight"].split("://", 1)[1].split(" ", 1)[0]
        f = fl.FlightClient("grpc://" + flight)
        with pytest.raises(fl.FlightUnauthenticatedError):
            list(f.list_flights())
        opts = fl.FlightCallOptions(headers=[(b"authorization", b"Bearer " + TOKEN.encode())])
        assert list(f.list_flights(options=opts)) == []
        f.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_auth_inference_token_file_ipv6(kiln_bin, repo, tmp_path):
    """--auth-inference protects inference too; the token comes from a
    file; the server listens on IPv6 loopback."""
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    proc, addrs = start_serve(kiln_bin, repo, tmp_path / "serve.log", "--auth-token-file", str(tok),
                              "--auth-inference", "--host", "::1")
    try:
        assert addrs["gRPC"].startswith("[::1]:")
        c = httpclient.InferenceServerClient(url=addrs["http"])
        expect_error(lambda: c.infer("affine", [affine_input(np.ones((1, 4), np.float32))]), "401")
        res = c.infer("affine", [affine_input(np.ones((1, 4), np.float32))], headers={"Authorization": "Bearer " + TOKEN})
        np.testing.assert_allclose(res.as_numpy("y"), np.full((1, 4), 4.0))
        assert c.is_server_live()  # health stays open (the repository has a corrupt model: not ready)
        assert c.is_server_ready() is False
        g = grpcclient.InferenceServerClient(url=addrs["gRPC"])
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        expect_grpc_error(lambda: g.infer("affine", [x]), "UNAUTHENTICATED")
        assert g.infer("affine", [x], headers={"authorization": "Bearer " + TOKEN}).as_numpy("y").shape == (1, 4)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_short_token_refused_everywhere(kiln_bin, repo, tmp_path):
    for flight in ("-1", "0"):
        r = subprocess.run([str(kiln_bin), "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                            "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", "--flight-port", flight,
                            "--data-dir", str(tmp_path / "data"), "--auth-token", "short"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert "at least 16" in r.stderr
