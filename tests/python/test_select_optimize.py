"""kiln.select_model, Model.prune and Model.quantize from Python over the
Go core (core/train.Select, core/optimize)."""
import signal

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import kiln
from kiln import layers as L


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.data.astype(np.float32), d.target


def test_select_model_ranks_and_returns_the_winner(digits):
    x, y = digits
    board, best = kiln.select_model(
        [[L.Linear(8), L.ReLU(), L.Linear()], [L.Linear(64), L.ReLU(), L.Linear()]],
        x, y, epochs=6, seed=1, concurrency=1, verbose=0)
    entries = board["entries"]
    assert [e["rank"] for e in entries] == [1, 2]
    assert board["metric"] == "accuracy"
    assert entries[0]["score"] >= entries[1]["score"]
    assert best.num_parameters == entries[0]["params"]
    assert best.classes_ == list(range(10))
    assert best.evaluate(x, y)["accuracy"] >= 0.8
    with pytest.raises(ValueError, match="candidate"):
        kiln.select_model([42], x, y, verbose=0)


def test_prune_and_quantize_report_and_keep_accuracy(digits, tmp_path):
    x, y = digits
    m = kiln.Sequential([L.Linear(128), L.ReLU(), L.Linear(64), L.ReLU(), L.Linear()])
    m.fit(x, y, epochs=20, seed=1, verbose=0)
    params = m.num_parameters

    rec = m.prune(0.5, x, y, structured=True, finetune_epochs=5)
    assert rec["after"]["params"] < params * 0.6
    assert rec["after"]["value"] >= rec["before"]["value"] - 0.02
    assert m.num_parameters == rec["after"]["params"]

    rec = m.quantize("int8", x, y)
    assert rec["after"]["file_bytes"] < rec["before"]["file_bytes"] / 2.5
    assert rec["after"]["value"] >= rec["before"]["value"] - 0.01
    # The quantized package is ordinary TorchScript for Python torch too.
    m.export_torchscript(tmp_path / "q.pt")
    with torch.no_grad():
        out = torch.jit.load(str(tmp_path / "q.pt"))(torch.from_numpy(x[:3]))
    assert out.shape == (3, 10)

    with pytest.raises(kiln.KilnError, match="already quantized"):
        m.prune(0.3, x, y)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        m.prune(1.0, x, y)
    with pytest.raises(ValueError, match="not one of the model's classes"):
        m.quantize("fp16", x[:2], np.array([3, 11]))


@pytest.fixture
def sigint_restored():
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_prune_and_keeps_the_model(digits, tmp_path, monkeypatch, sigint_restored):
    """prune/quantize run in a Go job that Python polls: the GIL is free
    meanwhile, and Ctrl-C (KeyboardInterrupt) cancels the job, leaves the
    model as it was and no half-written package behind."""
    import _thread
    import tempfile
    import threading
    import time

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # Ctrl-C is Python's SIGINT handler; a process started in the background
    # by a non-interactive shell inherits SIGINT ignored, and then Python
    # installs none (and interrupt_main does nothing): install it here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    x, y = digits
    m = kiln.Sequential([L.Linear(32), L.ReLU(), L.Linear()])
    m.fit(x, y, epochs=2, seed=1, verbose=0)
    params, before = m.num_parameters, m.predict(x[:5])
    ticks = []

    def interrupt_soon():
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:  # runs only while the GIL is free
            ticks.append(1)
            time.sleep(0.01)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_soon, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        m.prune(0.5, x, y, structured=True, finetune_epochs=100_000)
    assert time.monotonic() - t0 < 10
    assert len(ticks) > 20
    assert m.num_parameters == params
    np.testing.assert_array_equal(m.predict(x[:5]), before)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("kiln-optimized-")]


def test_ctrl_c_while_the_job_starts_still_cancels_it(digits, tmp_path, monkeypatch):
    """A Ctrl-C that lands during the start call is held until Python owns
    the job's handle, then cancels the job: it never runs on unowned."""
    import _thread
    import json
    import tempfile

    from kiln._native import bindings

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x, y = digits
    m = kiln.Sequential([L.Linear(32), L.ReLU(), L.Linear()])
    m.fit(x, y, epochs=2, seed=1, verbose=0)
    started, real = [], bindings.StartOptimize

    def start_then_interrupt(*args):
        _thread.interrupt_main()  # pending while the start runs
        started.append(real(*args))
        return started[-1]

    monkeypatch.setattr(bindings, "StartOptimize", start_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        m.prune(0.5, x, y, structured=True, finetune_epochs=100_000)
    assert len(started) == 1
    assert json.loads(started[0].Poll(0))["done"], "the job must be cancelled, not left running"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("kiln-optimized-")]
