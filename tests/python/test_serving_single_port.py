"""`kiln serve --single-port`: the stock tritonclient gRPC and HTTP clients
against one port (HTTP/1.1 and h2c on one listener, gRPC's own port off),
as KServe's serverless mode needs."""
import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from test_serving_cli import demo_repo, host_port, start_serve  # noqa: E402,F401


@pytest.fixture(scope="module")
def single(kiln_bin, demo_repo, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("single") / "serve.log"
    proc, addrs = start_serve(kiln_bin, demo_repo, log, "--single-port", "--grpc-port", "-1")
    yield {"port": host_port(addrs["HTTP"]), "grpc_line": addrs.get("gRPC", ""), "log": log}
    proc.terminate()
    assert proc.wait(timeout=60) == 0, log.read_text()


def test_grpc_and_http_on_one_port(single, demo_repo):  # noqa: F811
    port = single["port"]
    assert single["grpc_line"].startswith(port), single["grpc_line"]
    images = np.load(demo_repo / "digits" / "sample_images.npy")
    truth = np.load(demo_repo / "digits" / "sample_labels.npy")

    g = grpcclient.InferenceServerClient(url=port)
    assert g.is_server_live() and g.is_server_ready()
    inp = grpcclient.InferInput("image", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    by_grpc = g.infer("digits", [inp]).as_numpy("logits")
    assert by_grpc.shape == (16, 10)
    assert (by_grpc.argmax(axis=1) == truth).sum() >= 14
    with pytest.raises(Exception, match="no_such_model|not found|NOT_FOUND"):
        g.infer("no_such_model", [inp])

    h = httpclient.InferenceServerClient(url=port)
    assert h.is_server_live() and h.is_server_ready()
    inp = httpclient.InferInput("image", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    by_http = h.infer("digits", [inp]).as_numpy("logits")
    np.testing.assert_allclose(by_http, by_grpc, rtol=1e-5, atol=1e-5)
    assert h.get_model_metadata("digits")["name"] == g.get_model_metadata("digits").name
