"""Kiln's exceptions are chosen by the Go error's code, not by its text:
every error the bindings return starts with "[KILN_<CODE>] ", which
kiln._errors reads at position 0 only."""
import json

import numpy as np
import pytest
import torch

import kiln
from kiln import _errors
from kiln._native import bindings as _b
from kiln._train import _run_job

CLASSES = {
    "INTERNAL": kiln.InternalError,
    "NOT_FOUND": kiln.NotFoundError,
    "INVALID_ARGUMENT": kiln.InvalidArgumentError,
    "UNAVAILABLE": kiln.UnavailableError,
    "UNSUPPORTED": kiln.UnsupportedError,
    "ALREADY_EXISTS": kiln.AlreadyExistsError,
    "CANCELLED": kiln.CancelledError,
    "OUT_OF_MEMORY": kiln.OutOfMemoryError,
    "FAILED_PRECONDITION": kiln.FailedPreconditionError,
    "RESOURCE_EXHAUSTED": kiln.ResourceExhaustedError,
    "DEADLINE_EXCEEDED": kiln.DeadlineExceededError,
}
# Every other kind's keywords, in one message.
KEYWORDS = "not found: out of memory, invalid argument, cancelled, unsupported, unavailable, internal"


@pytest.mark.parametrize("code", sorted(CLASSES))
def test_each_code_picks_its_class(code):
    e = _errors.translate(RuntimeError(f"[KILN_{code}] {KEYWORDS}"))
    assert type(e) is CLASSES[code]
    assert isinstance(e, kiln.KilnError) and isinstance(e, RuntimeError)
    assert e.code == code
    assert str(e) == KEYWORDS  # the tag is not part of the message


def test_python_bases():
    assert issubclass(kiln.InvalidArgumentError, ValueError)
    assert issubclass(kiln.NotFoundError, LookupError)
    assert issubclass(kiln.OutOfMemoryError, MemoryError)
    assert issubclass(kiln.UnsupportedError, NotImplementedError)
    assert issubclass(kiln.DeadlineExceededError, TimeoutError)
    assert issubclass(kiln.ModelNotFoundError, FileNotFoundError)
    assert issubclass(kiln.ModelNotFoundError, kiln.ModelLoadError)
    assert issubclass(kiln.InferenceError, kiln.InvalidArgumentError)


def test_only_a_leading_tag_counts():
    # No tag, or a tag anywhere but at position 0: no code.
    for msg in ["not found", f"model x: [KILN_NOT_FOUND] {KEYWORDS}", " [KILN_NOT_FOUND] x", "[KILN_NOT_FOUND]x"]:
        e = _errors.translate(RuntimeError(msg))
        assert type(e) is kiln.KilnError and e.code == "UNKNOWN" and str(e) == msg
    # An unknown code or UNKNOWN: the context's class, message without the tag.
    e = _errors.translate(RuntimeError("[KILN_UNKNOWN] x"), kiln.ModelLoadError)
    assert type(e) is kiln.ModelLoadError and str(e) == "x"


def test_context_and_code_combine():
    e = _errors.translate(RuntimeError("[KILN_OUT_OF_MEMORY] x"), kiln.InferenceError)
    assert isinstance(e, kiln.InferenceError) and isinstance(e, MemoryError) and e.code == "OUT_OF_MEMORY"
    e = _errors.translate(RuntimeError("[KILN_INTERNAL] x"), kiln.ModelLoadError)
    assert isinstance(e, kiln.ModelLoadError) and isinstance(e, kiln.InternalError)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("error-models")

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    class Picky(torch.nn.Module):
        """Rejects negative inputs with a message full of other kinds' words."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x < 0).any()):
                raise ValueError("weights not found: out of memory, unsupported, cancelled")
            return x

    class Greedy(torch.nn.Module):
        """Allocates 2^42 floats (16 TiB) when asked to."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x > 0).any()):
                return torch.zeros([1 << 42])
            return x

    for name, m in [("linear", Linear()), ("picky", Picky()), ("greedy", Greedy())]:
        torch.jit.script(m).save(str(out / f"{name}.pt"))
    return out


def test_invalid_argument_from_forward(models):
    m = kiln.load(models / "linear.pt")
    with pytest.raises(kiln.InferenceError) as e:
        m.predict(np.zeros((3, 5), dtype=np.float32))
    assert e.value.code == "INVALID_ARGUMENT"
    assert not str(e.value).startswith("[")
    assert "3x5" in str(e.value)
    # What caught it before still does.
    for cls in (ValueError, kiln.KilnError, kiln.InvalidArgumentError, RuntimeError):
        with pytest.raises(cls):
            m.predict(np.zeros((3, 5), dtype=np.float32))


def test_go_error_whose_text_names_other_kinds(models, tmp_path):
    # The model's own message says "not found" and "out of memory": it is
    # still an input error.
    m = kiln.load(models / "picky.pt")
    with pytest.raises(kiln.InferenceError, match="not found: out of memory") as e:
        m.predict(-np.ones((2, 2), dtype=np.float32))
    assert e.value.code == "INVALID_ARGUMENT"
    assert not isinstance(e.value, (LookupError, MemoryError, NotImplementedError, kiln.CancelledError))

    # A corrupt model file whose name says "not found out of memory" (and
    # even looks like a tag) fails as what it is: not a TorchScript archive.
    bad = tmp_path / "[KILN_NOT_FOUND] not found out of memory.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(kiln.InvalidModelError) as e:
        kiln.load(bad)
    assert e.value.code == "INVALID_ARGUMENT"
    assert isinstance(e.value, kiln.ModelLoadError) and isinstance(e.value, OSError)
    assert isinstance(e.value, ValueError)
    assert not isinstance(e.value, (LookupError, MemoryError))
    assert "not found out of memory.pt" in str(e.value)


def test_not_found(tmp_path):
    # Missing in Python's own check...
    with pytest.raises(kiln.ModelNotFoundError):
        kiln.load(tmp_path / "missing.pt")
    # ...and in Go's: a valid package manifest whose model.pt is not there.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    tensor = {"name": "x", "dtype": "float32", "shape": [-1, 4]}
    (pkg / "manifest.json").write_text(json.dumps(
        {"format": "kiln-model/1", "model": "model.pt", "inputs": [tensor], "outputs": [dict(tensor, name="y")]}))
    with pytest.raises(kiln.ModelNotFoundError) as e:
        kiln.load(pkg)
    assert e.value.code == "NOT_FOUND"
    for cls in (FileNotFoundError, OSError, LookupError, kiln.NotFoundError, kiln.ModelLoadError, kiln.KilnError):
        assert isinstance(e.value, cls)
    # A manifest Kiln cannot read is an invalid model, not a missing one.
    (pkg / "manifest.json").write_text(json.dumps({"model": "gone.pt"}))
    with pytest.raises(kiln.InvalidModelError) as e:
        kiln.load(pkg)
    assert e.value.code == "INVALID_ARGUMENT"


def overcommits_without_limit():
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "1"
    except OSError:
        return True


@pytest.mark.skipif(overcommits_without_limit(), reason="a huge allocation would succeed and be OOM-killed")
def test_out_of_memory(models):
    m = kiln.load(models / "greedy.pt")
    with pytest.raises(kiln.OutOfMemoryError) as e:
        m.predict(np.ones((1,), dtype=np.float32))
    assert e.value.code == "OUT_OF_MEMORY"
    assert isinstance(e.value, MemoryError)
    # The model keeps working.
    assert m.predict(np.zeros((1,), dtype=np.float32)).shape == (1,)


def digits_like(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def test_unsupported():
    x, y = digits_like()
    m = kiln.Sequential([kiln.layers.Linear(2)])
    m.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(kiln.UnsupportedError, match='quantized engine "no-such-engine"') as e:
        m.quantize("int8", x, y, engine="no-such-engine")
    assert e.value.code == "UNSUPPORTED"
    assert isinstance(e.value, NotImplementedError) and isinstance(e.value, kiln.KilnError)


def test_cancelled(tmp_path):
    x, y = digits_like()
    y = np.ascontiguousarray(y, dtype=np.float32)
    job = {
        "model": kiln.Sequential([kiln.layers.Linear(2)]).spec,
        "data": {"target": "target", "task": "classification"},
        "split": {"val": 0, "test": 0},
        "train": {"epochs": 100000, "batch_size": 8, "seed": 1},
    }
    def start():
        h = _b.StartTraining(json.dumps(job), x.ctypes.data, x.shape[0], x.shape[1], y.ctypes.data, str(tmp_path), "")
        h.Cancel()
        return h

    with pytest.raises(kiln.CancelledError) as e:
        _run_job(start, None, lambda e, bar: None)
    assert e.value.code == "CANCELLED"
    assert "canceled" in str(e.value)


def test_invalid_argument_is_still_a_value_error():
    x, y = digits_like()
    m = kiln.Sequential([kiln.layers.Linear(2)])
    m.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="calibration data is empty") as e:
        m.quantize("int8", x, y, calibration=x[:0])
    assert isinstance(e.value, kiln.InvalidArgumentError) and e.value.code == "INVALID_ARGUMENT"
