"""Shared fixtures for Kiln's cross-language tests."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# PYTHON is the interpreter with torch that fixture scripts run with:
# $KILN_PYTHON, else the one running the tests.
PYTHON = os.environ.get("KILN_PYTHON", sys.executable)


def make_fixture(name, out) -> pathlib.Path:
    """Writes fixture name of tests/fixtures/kiln_fixtures.py (serving-repo,
    flight-repo, torch-models, datasets, ...) into directory out, with
    PYTHON, and returns out as a Path."""
    subprocess.run([PYTHON, str(ROOT / "tests/fixtures/kiln_fixtures.py"), name, str(out)], check=True)
    return pathlib.Path(out)


@pytest.fixture(scope="session")
def testserver_bin(tmp_path_factory) -> pathlib.Path:
    """serving/internal/testserver (serving.Run behind flags, see its doc),
    built once per session into a temp dir."""
    path = tmp_path_factory.mktemp("testserver") / "kiln-testserver"
    subprocess.run(["go", "build", "-o", str(path), "./serving/internal/testserver"], cwd=ROOT, check=True)
    return path


def start_testserver(binary, log, *args) -> dict:
    """Starts the test server binary with args, its stderr into the file log,
    and returns the JSON line it prints once listening ("grpc", "ready",
    "flight" with -flight) with "proc" (the Popen) and "log" (a Path) added.
    Fails the test when the server exits before printing it."""
    log = pathlib.Path(log)
    with open(log, "w") as f:
        proc = subprocess.Popen([str(binary), *args], stdout=subprocess.PIPE, stderr=f, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        pytest.fail("test server did not start:\n" + log.read_text())
    info = json.loads(line)
    info.update(proc=proc, log=log)
    return info


def stop_testserver(info) -> int:
    """Stops a server start_testserver started: SIGTERM, then SIGKILL after
    60 s. Returns its exit status (0 after a clean shutdown)."""
    proc = info["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="session")
def kiln_bin() -> pathlib.Path:
    """The kiln CLI, built by `make build` (or built here when missing)."""
    path = ROOT / "bin" / "kiln"
    if not path.exists():
        subprocess.run(["go", "build", "-o", str(path), "./cmd/kiln"], cwd=ROOT, check=True)
    return path


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> pathlib.Path:
    """The demo's iris classifier, exported by Python torch into a temp dir."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [PYTHON, str(ROOT / "examples/demo/make_model.py"), str(out)],
        check=True,
    )
    return out
