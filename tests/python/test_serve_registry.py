"""`kiln serve --registry` serves what a registry alias names: `kiln train
--register` records two versions, `kiln registry alias set` moves
production, and the server follows (the new version loads before it
switches; moving back is immediate), with clients running throughout and
no failed request."""
import csv
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import make_fixture
from test_serving_cli import host_port, start_serve

httpclient = pytest.importorskip("tritonclient.http")

SPEC = """
model:
  layers:
    - {{type: linear, out: 8}}
    - {{type: relu}}
    - {{type: linear}}
split: {{val: 0.15, test: 0.2, stratify: true}}
train: {{epochs: {epochs}, batch_size: 32, seed: 1, optimizer: {{type: adam, lr: 0.001}}}}
"""


def kiln(kiln_bin, *args):
    run = subprocess.run([str(kiln_bin), *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_serve_follows_the_alias(kiln_bin, tmp_path):
    make_fixture("datasets", tmp_path)
    data = tmp_path / "breast_cancer.csv"
    reg = str(tmp_path / "registry.db")
    for epochs in (1, 5):
        spec = tmp_path / f"spec{epochs}.yaml"
        spec.write_text(SPEC.format(epochs=epochs))
        kiln(kiln_bin, "train", "--spec", str(spec), "--data", str(data), "--target", "diagnosis",
             "--out", str(tmp_path / f"pkg{epochs}"), "--registry", reg, "--register", "bc")
    kiln(kiln_bin, "registry", "alias", "set", "bc", "production", "1", "--expect", "none", "--registry", reg)

    repo = tmp_path / "repo"
    repo.mkdir()
    proc, addrs = start_serve(kiln_bin, repo, tmp_path / "serve.log", "--registry", reg,
                              "--registry-poll-interval", "100ms", "--rollback-grace", "1h")
    try:
        client = httpclient.InferenceServerClient(url=host_port(addrs["HTTP"]))
        assert client.is_server_ready()
        meta = client.get_model_metadata("bc")
        name, (batch, width) = meta["inputs"][0]["name"], meta["inputs"][0]["shape"]
        with open(data) as f:
            rows = list(csv.DictReader(f))
        cols = [c for c in rows[0] if c != "diagnosis"]
        x = np.array([[float(r[c]) for c in cols] for r in rows[:8]], dtype=np.float32)
        assert x.shape[1] == width

        def infer():
            inp = httpclient.InferInput(name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer("bc", [inp]).get_response()["model_version"]

        assert infer() == "1"
        failures, seen, stop = [], {}, threading.Event()

        def load():
            c = httpclient.InferenceServerClient(url=host_port(addrs["HTTP"]))
            while not stop.is_set():
                try:
                    inp = httpclient.InferInput(name, list(x.shape), "FP32")
                    inp.set_data_from_numpy(x)
                    v = c.infer("bc", [inp]).get_response()["model_version"]
                    seen[v] = seen.get(v, 0) + 1
                except Exception as e:  # noqa: BLE001 - any failure counts
                    failures.append(repr(e))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()

        def wait_for(version):
            deadline = time.time() + 60
            while time.time() < deadline:
                if infer() == version:
                    return
                time.sleep(0.05)
            pytest.fail(f"the server never served version {version}")

        kiln(kiln_bin, "registry", "alias", "set", "bc", "production", "2", "--expect", "1", "--registry", reg)
        wait_for("2")
        assert (repo / "bc" / "2" / "registry.json").exists()
        kiln(kiln_bin, "registry", "alias", "set", "bc", "production", "1", "--expect", "2", "--registry", reg,
             "--reason", "roll back")
        wait_for("1")
        stop.set()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        assert seen.get("1") and seen.get("2"), seen
        history = kiln(kiln_bin, "registry", "history", "bc", "production", "--registry", reg)
        assert "roll back" in history
    finally:
        proc.terminate()
        proc.wait(timeout=60)
