"""`kiln pipeline run` end to end on scikit-learn's digits, with `kiln serve
--registry` following production under a client load that never fails:
a first pipeline selects between two candidates, quantizes and is promoted
(no production yet); a worse one is rejected and production stays; a better
one is promoted and the server answers from it. Then continuous training:
`kiln serve --pipeline --watch-dataset` runs the pipeline once per burst of
DoPut commits, and the Flight action pipeline_run and kiln.pipeline_run
start runs too."""
import csv
import json
import signal
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from conftest import make_fixture
from test_serving_cli import host_port, start_serve

httpclient = pytest.importorskip("tritonclient.http")
flight = pytest.importorskip("pyarrow.flight")
pa_csv = pytest.importorskip("pyarrow.csv")


def spec(data, epochs, lr, cands, source="path"):
    layers = "\n".join(
        f"    - {{name: {n}, layers: [{{type: linear, out: {w}}}, {{type: relu}}, {{type: linear}}]}}" for n, w in cands)
    return f"""name: digits
data: {{{source}: {data}, target: digit, holdout: 0.25, stratify: true, seed: 7}}
train: {{epochs: {epochs}, batch_size: 32, seed: 1, optimizer: {{type: adam, lr: {lr}}}}}
select:
  candidates:
{layers}
optimize: {{variants: [{{quantize: int8}}], max_accuracy_drop: 0.03}}
evaluate: {{min_margin: 0.01, bootstrap: 200}}
"""


def kiln(kiln_bin, *args, check=True):
    run = subprocess.run([str(kiln_bin), *args], capture_output=True, text=True)
    if check:
        assert run.returncode == 0, run.stderr
    return run


def pipeline(kiln_bin, tmp_path, name, text, reg):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    out = kiln(kiln_bin, "pipeline", "run", str(path), "--json", "--registry", reg,
               "--runs-dir", str(tmp_path / "runs")).stdout
    return json.loads(out)


def digits_rows(path, n):
    with open(path) as f:
        rows = list(csv.reader(f))[1:n + 1]
    return np.array([[float(v) for v in r[:64]] for r in rows], dtype=np.float32)


# A defect seen on 2026-11-30 and not yet diagnosed: after every check of
# the lifecycle test passes, kiln serve sometimes does not stop on SIGTERM
# (a batcher instance stuck in kiln_module_forward, with int8 dynamic-
# quantized versions loaded). Only that ending is marked xfail; any check
# of the lifecycle failing fails the test.
KNOWN_SHUTDOWN_HANG = ("kiln serve did not stop on SIGTERM after the lifecycle checks passed "
                       "(known, not yet diagnosed: a forward stuck in libtorch)")


def test_lifecycle_under_load(kiln_bin, tmp_path):
    make_fixture("datasets", tmp_path)
    data = tmp_path / "digits.csv"
    reg = str(tmp_path / "registry.db")
    first = pipeline(kiln_bin, tmp_path, "first", spec(data, 1, 0.003, [("small", 32), ("wide", 128)]), reg)
    assert first["verdict"] == "PROMOTE" and first["first"] and first["promoted"]
    assert first["candidate"]["version"] == 2 and first["trained"]["version"] == 1  # the int8 variant, parent 1

    repo = tmp_path / "repo"
    repo.mkdir()
    proc, addrs = start_serve(kiln_bin, repo, tmp_path / "serve.log", "--registry", reg,
                              "--registry-poll-interval", "100ms", "--rollback-grace", "1h")
    checked = False
    try:
        client = httpclient.InferenceServerClient(url=host_port(addrs["HTTP"]))
        x = digits_rows(data, 8)

        def infer(c=client):
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return c.infer("digits", [inp]).get_response()["model_version"]

        assert infer() == "2"
        failures, seen, stop = [], {}, threading.Event()

        def load():
            c = httpclient.InferenceServerClient(url=host_port(addrs["HTTP"]))
            while not stop.is_set():
                try:
                    v = infer(c)
                    seen[v] = seen.get(v, 0) + 1
                except Exception as e:  # noqa: BLE001 - any failure counts
                    failures.append(repr(e))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            worse = pipeline(kiln_bin, tmp_path, "worse", spec(data, 1, 1e-5, [("tiny", 2)]), reg)
            assert worse["verdict"] in ("REJECT", "HOLD"), worse
            assert not worse["promoted"] and worse["serving"] == 2
            better = pipeline(kiln_bin, tmp_path, "better", spec(data, 12, 0.01, [("wide", 128)]), reg)
            assert better["verdict"] == "PROMOTE", better["reason"]
            want = str(better["candidate"]["version"])
            deadline = time.time() + 60
            while time.time() < deadline and infer() != want:
                time.sleep(0.05)
            assert infer() == want
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures[:3]
        assert seen.get("2") and seen.get(want), seen
        history = kiln(kiln_bin, "registry", "history", "digits", "production", "--registry", reg).stdout
        assert better["run_id"] in history
        status = kiln(kiln_bin, "pipeline", "status", better["run_id"], "--runs-dir", str(tmp_path / "runs")).stdout
        assert "FINISHED" in status and "7/7 promote" in status
        checked = True
    finally:
        stop_serve(proc, tmp_path / "serve.log", known_hang=checked)


def test_bad_pipeline_file(kiln_bin, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: digits\ndata: {path: x.csv, target: digit}\nselect: {candidates: []}\ndeploy: {}\n")
    run = kiln(kiln_bin, "pipeline", "run", str(path), "--registry", str(tmp_path / "r.db"),
               "--runs-dir", str(tmp_path / "runs"), check=False)
    assert run.returncode != 0
    assert 'line 4: unknown stage "deploy"' in run.stderr


def stop_serve(proc, log, known_hang=False):
    """SIGTERM, as a user's Ctrl-C; a server that does not stop dumps its
    goroutines (SIGQUIT) into its log, which the failure shows."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=30)
        dump = log.read_text()[-20000:]
        if known_hang:
            pytest.xfail(KNOWN_SHUTDOWN_HANG + ":\n" + dump[-4000:])
        pytest.fail("kiln serve did not stop on SIGTERM:\n" + dump)


def put_digits(client, data, name="digits"):
    table = pa_csv.read_csv(str(data))
    writer, reader = client.do_put(flight.FlightDescriptor.for_path("datasets", name), table.schema)
    writer.write_table(table)
    writer.done_writing()
    while reader.read() is not None:
        pass
    writer.close()


def pipeline_runs(kiln_bin, reg):
    out = kiln(kiln_bin, "registry", "runs", "--model", "digits", "--json", "--registry", reg).stdout
    return [r for r in json.loads(out) if r["kind"] == "pipeline"]


def test_continuous_training_and_flight_action(kiln_bin, tmp_path, monkeypatch):
    make_fixture("datasets", tmp_path)
    data = tmp_path / "digits.csv"
    reg = str(tmp_path / "registry.db")
    pfile = tmp_path / "watch.yaml"
    pfile.write_text(spec("digits", 2, 0.01, [("small", 32)], source="dataset"))
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))  # the server's pipeline runs go there
    proc, addrs = start_serve(kiln_bin, repo, tmp_path / "serve.log", "--registry", reg,
                              "--registry-poll-interval", "100ms", "--pipeline", str(pfile),
                              "--pipeline-debounce", "1s")
    try:
        client = flight.FlightClient(addrs["Flight"].split()[0])
        # A burst of three commits: one run.
        for _ in range(3):
            put_digits(client, data)
        deadline = time.time() + 120
        while time.time() < deadline:
            runs = pipeline_runs(kiln_bin, reg)
            if runs and all(r["status"] != "RUNNING" for r in runs):
                break
            time.sleep(0.2)
        time.sleep(1.5)  # past another debounce: no second run
        runs = pipeline_runs(kiln_bin, reg)
        assert len(runs) == 1, runs
        assert runs[0]["status"] == "FINISHED", runs[0]
        http = httpclient.InferenceServerClient(url=host_port(addrs["HTTP"]))
        deadline = time.time() + 30
        while time.time() < deadline and not http.is_model_ready("digits"):
            time.sleep(0.1)
        assert http.is_model_ready("digits")

        # The Flight action: a bad file fails before any job, a good one
        # runs as a job.
        with pytest.raises(pa.ArrowInvalid, match='line 2: unknown stage "foo"'):  # INVALID_ARGUMENT
            list(client.do_action(flight.Action("pipeline_run", b"name: x\nfoo: 1\n")))
        body = spec("digits", 1, 0.01, [("small", 16)], source="dataset").encode()
        res = json.loads(list(client.do_action(flight.Action("pipeline_run", body)))[0].body.to_pybytes())
        assert len(res["run_id"]) == 32
        deadline = time.time() + 120
        while time.time() < deadline:
            st = json.loads(list(client.do_action(flight.Action("job-status", res["job_id"].encode())))[0].body.to_pybytes())
            if st["state"] != "RUNNING":
                break
            time.sleep(0.2)
        assert st["state"] == "SUCCEEDED", st
        assert st["run_id"] == res["run_id"]
        assert st["result"]["verdict"] in ("PROMOTE", "HOLD", "REJECT")
    finally:
        stop_serve(proc, tmp_path / "serve.log")
    log = (tmp_path / "serve.log").read_text()
    assert "pipeline: continuous training run" in log


def test_pipeline_run_from_python(tmp_path):
    kiln = pytest.importorskip("kiln")
    make_fixture("datasets", tmp_path)
    path = tmp_path / "p.yaml"
    path.write_text(spec(tmp_path / "digits.csv", 1, 0.01, [("small", 16)]))
    events = []
    res = kiln.pipeline_run(path, registry=tmp_path / "r.db", runs_dir=tmp_path / "runs", progress=events.append)
    assert res["verdict"] == "PROMOTE" and res["first"]
    assert {e["stage"] for e in events} >= {"data", "train", "promote"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec(tmp_path / "digits.csv", 1, 0.01, [("small", 16)]).replace("target: digit", "target: label"))
    with pytest.raises(kiln.InvalidArgumentError, match='data.target: column "label" is not in the data'):
        kiln.pipeline_run(bad, registry=tmp_path / "r.db", runs_dir=tmp_path / "runs")
