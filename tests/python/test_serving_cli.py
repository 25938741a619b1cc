"""`kiln serve` (what `make run` starts) on the demo repository that
examples/repository/make_repo.py builds, queried with the stock tritonclient
HTTP and gRPC clients, and stopped with SIGTERM."""
import csv
import pathlib
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from conftest import PYTHON  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-repo")
    subprocess.run([PYTHON, str(ROOT / "examples/repository/make_repo.py"), str(out)], check=True)
    return out


def start_serve(kiln_bin, repo, log_path, *extra):
    """Starts kiln serve on free loopback ports; returns (proc, addresses)."""
    data_dir = pathlib.Path(log_path).parent / "kiln-data"
    proc = subprocess.Popen(
        [str(kiln_bin), "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
         "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
         "--flight-port", "0", "--data-dir", str(data_dir), *extra],
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
            return proc, addrs
    proc.kill()
    pytest.fail("kiln serve did not start:\n" + pathlib.Path(log_path).read_text())


def host_port(url):
    return url.split("://", 1)[-1].split("/", 1)[0]


@pytest.fixture(scope="module")
def served(kiln_bin, demo_repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, addrs = start_serve(kiln_bin, demo_repo, log)
    yield {"proc": proc, "http": host_port(addrs["HTTP"]), "grpc": addrs["gRPC"], "metrics": addrs["metrics"],
           "flight": addrs["Flight"], "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_prints_where_it_listens_and_is_ready(served):
    assert served["grpc"].startswith("127.0.0.1:")
    assert served["metrics"].endswith("/metrics")
    client = httpclient.InferenceServerClient(url=served["http"])
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris") and client.is_model_ready("digits")


def test_iris_over_http_with_labels(served, demo_repo):
    rows, truth = [], []
    with open(demo_repo / "iris" / "iris_test.csv") as f:
        r = csv.reader(f)
        next(r)
        for rec in r:
            rows.append([float(v) for v in rec[:4]])
            truth.append(int(rec[4]))
    x = np.array(rows, dtype=np.float32)
    client = httpclient.InferenceServerClient(url=served["http"])
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("iris", [inp])
    probs = res.as_numpy("probabilities")
    assert probs.shape == (len(rows), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)  # softmax from config.yaml
    assert (probs.argmax(axis=1) == np.array(truth)).mean() > 0.9
    res = client.infer("iris", [inp], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=1)])
    labels = [row[0].decode().split(":")[2] for row in res.as_numpy("probabilities")]
    names = ["setosa", "versicolor", "virginica"]
    assert np.mean([names[t] == l for t, l in zip(truth, labels)]) > 0.9


def test_digits_cnn_over_grpc(served, demo_repo):
    images = np.load(demo_repo / "digits" / "sample_images.npy")
    truth = np.load(demo_repo / "digits" / "sample_labels.npy")
    client = grpcclient.InferenceServerClient(url=served["grpc"])
    inp = grpcclient.InferInput("image", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    logits = client.infer("digits", [inp]).as_numpy("logits")
    assert logits.shape == (16, 10)
    assert (logits.argmax(axis=1) == truth).sum() >= 14


def test_sigterm_finishes_in_flight_and_exits_zero(kiln_bin, demo_repo, tmp_path):
    proc, addrs = start_serve(kiln_bin, demo_repo, tmp_path / "serve.log", "--log-format", "json")
    url = addrs["gRPC"]
    images = np.load(demo_repo / "digits" / "sample_images.npy")
    stop = threading.Event()
    outcomes = []

    def worker():
        client = grpcclient.InferenceServerClient(url=url)
        inp = grpcclient.InferInput("image", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        while not stop.is_set():
            try:
                logits = client.infer("digits", [inp], client_timeout=60).as_numpy("logits")
                outcomes.append("ok" if logits.shape == (16, 10) else "bad shape")
            except Exception as e:  # after shutdown: connection refused / unavailable
                outcomes.append("gone" if "UNAVAILABLE" in str(e) or "refused" in str(e).lower() else repr(e))
                break
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while outcomes.count("ok") < 40 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    log = (tmp_path / "serve.log").read_text()
    assert rc == 0, log
    assert outcomes.count("ok") >= 40
    assert set(outcomes) <= {"ok", "gone"}, [o for o in outcomes if o not in ("ok", "gone")]
    assert '"msg":"server stopped"' in log  # structured (JSON) logs


def test_bad_flags(kiln_bin, tmp_path):
    r = subprocess.run([str(kiln_bin), "serve", "--model-repository", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "missing" in r.stderr
    r = subprocess.run([str(kiln_bin), "serve", "--model-repository", str(tmp_path), "--model-control-mode", "sometimes"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "sometimes" in r.stderr


def test_flight_is_served_over_the_same_models(served):
    """kiln serve mounts Arrow Flight: a dataset uploaded with DoPut lists
    and reads back, and DoExchange predicts what gRPC predicts."""
    import pyarrow as pa
    import pyarrow.flight as fl

    loc = served["flight"].removeprefix("grpc://").split(" ")[0]
    client = fl.connect(f"grpc://{loc}")
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]], dtype=np.float32)
    table = pa.table({"features": pa.FixedShapeTensorArray.from_numpy_ndarray(x)})
    writer, _ = client.do_put(fl.FlightDescriptor.for_path("datasets", "iris_rows"), table.schema)
    writer.write_table(table)
    writer.close()
    names = [f.descriptor.path for f in client.list_flights()]
    assert [b"datasets", b"iris_rows"] in names
    info = client.get_flight_info(fl.FlightDescriptor.for_path("datasets", "iris_rows"))
    assert client.do_get(info.endpoints[0].ticket).read_all().equals(table)

    writer, reader = client.do_exchange(fl.FlightDescriptor.for_path("models", "iris"))
    writer.begin(table.schema)
    writer.write_table(table)
    writer.done_writing()
    out = reader.read_all()
    writer.close()
    probs = np.stack(out.column(0).combine_chunks().to_numpy_ndarray()) if isinstance(
        out.column(0).type, pa.FixedShapeTensorType) else np.asarray(out.column(0).to_pylist(), dtype=np.float32)

    c = grpcclient.InferenceServerClient(url=served["grpc"])
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    want = c.infer("iris", [inp]).as_numpy("probabilities")
    np.testing.assert_allclose(probs.reshape(want.shape), want, atol=1e-6)
