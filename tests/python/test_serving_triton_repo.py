"""A Triton model repository (config.pbtxt, platform pytorch_libtorch,
INPUT__i/OUTPUT__i names, dynamic_batching {}) served by `kiln serve`
unchanged, against the stock tritonclient.grpc and tritonclient.http clients:
it answers exactly like the same TorchScript model under Kiln's own
config.yaml."""
import concurrent.futures
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")

from test_serving_http import start_serve  # noqa: E402

# Inputs listed out of order: Triton's PyTorch backend (and Kiln) map
# INPUT__<i> to forward's i-th argument whatever the order in the file.
PBTXT = """\
name: "triton_mix"
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  {
    name: "INPUT__1"
    data_type: TYPE_FP32
    dims: [ 3 ]
  },
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    dims: [ 3 ]
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 3 ]
  },
  {
    name: "OUTPUT__1"
    data_type: TYPE_FP32
    dims: [ 1 ]
  }
]
dynamic_batching { }
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { latest: { num_versions: 1 } }
"""

KILN_YAML = """\
name: kiln_mix
platform: pytorch_torchscript
max_batch_size: 8
inputs:
  - {name: INPUT__0, datatype: FP32, dims: [3]}
  - {name: INPUT__1, datatype: FP32, dims: [3]}
outputs:
  - {name: OUTPUT__0, datatype: FP32, dims: [3]}
  - {name: OUTPUT__1, datatype: FP32, dims: [1]}
dynamic_batching: {}
instance_count: 2
"""

MODELS = ["triton_mix", "kiln_mix"]


class Mix(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return a * 2.0 - b, (a * b).sum(dim=1, keepdim=True)


def expected(a, b):
    return a * 2 - b, (a * b).sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-repo") / "repo"
    module = torch.jit.script(Mix().eval())
    for name, file, text in [("triton_mix", "config.pbtxt", PBTXT), ("kiln_mix", "config.yaml", KILN_YAML)]:
        (root / name / "1").mkdir(parents=True)
        module.save(str(root / name / "1" / "model.pt"))
        (root / name / file).write_text(text)
    return root


@pytest.fixture(scope="module")
def server(kiln_bin, repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-triton") / "serve.log"
    proc, addrs = start_serve(kiln_bin, repo, log)
    yield addrs
    proc.terminate()
    assert proc.wait(timeout=60) == 0, pathlib.Path(log).read_text()


@pytest.fixture
def grpc(server):
    c = grpcclient.InferenceServerClient(url=server["gRPC"].split("://", 1)[-1])
    yield c
    c.close()


@pytest.fixture
def http(server):
    c = httpclient.InferenceServerClient(url=server["http"])
    yield c
    c.close()


def rows(n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3)).astype(np.float32), rng.standard_normal((n, 3)).astype(np.float32)


def grpc_infer(client, model, a, b):
    ins = []
    for name, x in [("INPUT__0", a), ("INPUT__1", b)]:
        i = grpcclient.InferInput(name, list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        ins.append(i)
    res = client.infer(model, ins)
    return res.as_numpy("OUTPUT__0"), res.as_numpy("OUTPUT__1")


def http_infer(client, model, a, b, binary):
    ins = []
    for name, x in [("INPUT__0", a), ("INPUT__1", b)]:
        i = httpclient.InferInput(name, list(x.shape), "FP32")
        i.set_data_from_numpy(x, binary_data=binary)
        ins.append(i)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT__0", "OUTPUT__1")]
    res = client.infer(model, ins, outputs=outs)
    return res.as_numpy("OUTPUT__0"), res.as_numpy("OUTPUT__1")


def test_metadata_and_config_match(grpc, http):
    for m in MODELS:
        assert grpc.is_model_ready(m)
    meta = {m: grpc.get_model_metadata(m, as_json=True) for m in MODELS}
    for m in MODELS:
        assert meta[m].pop("name") == m
    assert meta["triton_mix"] == meta["kiln_mix"]
    assert [i["name"] for i in meta["triton_mix"]["inputs"]] == ["INPUT__0", "INPUT__1"]
    assert meta["triton_mix"]["inputs"][0]["shape"] == ["-1", "3"]
    cfg = {m: grpc.get_model_config(m, as_json=True)["config"] for m in MODELS}
    for m in MODELS:
        c = cfg[m]
        assert c.pop("name") == m
        c["instance_group"][0].pop("name")
    assert cfg["triton_mix"] == cfg["kiln_mix"]
    assert "dynamic_batching" in cfg["triton_mix"]
    assert cfg["triton_mix"]["instance_group"][0]["count"] == 2
    assert http.get_model_metadata("triton_mix")["inputs"] == http.get_model_metadata("kiln_mix")["inputs"]


@pytest.mark.parametrize("n", [1, 5])
def test_grpc_same_answers(grpc, n):
    a, b = rows(n, n)
    want = expected(a, b)
    got = {m: grpc_infer(grpc, m, a, b) for m in MODELS}
    for m in MODELS:
        np.testing.assert_allclose(got[m][0], want[0], rtol=1e-6)
        np.testing.assert_allclose(got[m][1], want[1], rtol=1e-5)
    np.testing.assert_array_equal(got["triton_mix"][0], got["kiln_mix"][0])
    np.testing.assert_array_equal(got["triton_mix"][1], got["kiln_mix"][1])


@pytest.mark.parametrize("binary", [True, False])
def test_http_same_answers(http, binary):
    a, b = rows(4, 7)
    got = {m: http_infer(http, m, a, b, binary) for m in MODELS}
    np.testing.assert_allclose(got["triton_mix"][0], expected(a, b)[0], rtol=1e-6)
    for k in range(2):
        np.testing.assert_array_equal(got["triton_mix"][k], got["kiln_mix"][k])


def test_concurrent_requests_batch(grpc):
    """Requests of one row each, sent at once, pass through the dynamic
    batcher that dynamic_batching {} turned on; each gets its own rows."""
    inputs = [rows(1, 100 + i) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda ab: grpc_infer(grpc, "triton_mix", *ab), inputs))
    for (a, b), (y, s) in zip(inputs, results):
        np.testing.assert_allclose(y, expected(a, b)[0], rtol=1e-6)
        np.testing.assert_allclose(s, expected(a, b)[1], rtol=1e-5)
    stats = grpc.get_inference_statistics("triton_mix", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 16


def test_bad_request_same_error(grpc):
    """A wrong shape is refused alike by both models."""
    a = np.zeros((2, 4), dtype=np.float32)
    msgs = []
    for m in MODELS:
        with pytest.raises(Exception) as e:
            grpc_infer(grpc, m, a, a)
        msgs.append(str(e.value).replace(m, "MODEL"))
    assert msgs[0] == msgs[1]
