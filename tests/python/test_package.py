"""The kiln Python package over the Go core: load and predict TorchScript
models with numpy arrays passed by address, next to Python torch in the
same process."""
import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln
from conftest import make_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixtures")
    make_fixture("torch-models", out)

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.jit.script(Identity()).save(str(out / "identity.pt"))

    class Positive(torch.nn.Module):
        """Output shape depends on the values, not just the input shape."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.isnan().any()):
                raise ValueError("NaN in the input")
            return x[x > 0]

    torch.jit.script(Positive()).save(str(out / "positive.pt"))
    return out


def raw(fixtures, name, kind, i, dtype, shape):
    return np.fromfile(fixtures / f"{name}.{kind}{i}.bin", dtype=dtype).reshape(shape)


def test_imported_outside_source_tree():
    assert not kiln.__file__.startswith(os.path.join(ROOT, "python")), kiln.__file__
    assert kiln.__version__ == "0.1.0"
    assert kiln.torch_version().split(".")[:2] == torch.__version__.split(".")[:2]


def test_predict_matches_torch_in_same_process(fixtures):
    m = kiln.load(fixtures / "mlp.pt")
    x = raw(fixtures, "mlp", "in", 0, np.float32, (5, 8))
    ref = torch.jit.load(str(fixtures / "mlp.pt"))
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = m.predict(x)
    assert got.shape == (5, 3) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6
    assert m.inputs == [("x", "Tensor")]
    assert "mlp.pt" in repr(m) and "x: Tensor" in repr(m)


def test_multiple_inputs_and_tuple_outputs(fixtures):
    m = kiln.load(fixtures / "two_inputs.pt")
    a = raw(fixtures, "two_inputs", "in", 0, np.float32, (3, 4))
    b = raw(fixtures, "two_inputs", "in", 1, np.float32, (1,))
    y, s, mean = m.predict(a, b)
    np.testing.assert_allclose(y, raw(fixtures, "two_inputs", "out", 0, np.float32, (3, 2)), atol=1e-6)
    np.testing.assert_allclose(s, raw(fixtures, "two_inputs", "out", 1, np.float32, (3,)), atol=1e-6)
    np.testing.assert_allclose(mean, raw(fixtures, "two_inputs", "out", 2, np.float32, (3, 1)), atol=1e-6)

    ints = kiln.load(fixtures / "int_ops.pt")
    ids = np.array([[1, 2, 3], [9, 0, 4]], dtype=np.int64)
    emb, doubled = ints.predict(ids)
    assert doubled.dtype == np.int64
    np.testing.assert_array_equal(doubled, ids * 2)
    np.testing.assert_allclose(emb, raw(fixtures, "int_ops", "out", 0, np.float32, (2, 3, 3)), atol=1e-6)


def test_zero_copy_both_ways(fixtures):
    """An identity model returns the very buffer it was given: libtorch saw
    numpy's memory, and numpy sees libtorch's output without a copy."""
    m = kiln.load(fixtures / "identity.pt")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = m.predict(x)
    assert y.ctypes.data == x.ctypes.data
    np.testing.assert_array_equal(y, x)
    # Non-contiguous input is made contiguous once, then passed by address.
    z = m.predict(x[:, ::2])
    np.testing.assert_array_equal(z, x[:, ::2])


def test_outputs_outlive_model_and_inputs(fixtures):
    m = kiln.load(fixtures / "mlp.pt")
    x = np.ones((2, 8), dtype=np.float32)
    y = m.predict(x)
    first = y.copy()
    del x
    m.close()
    gc.collect()
    np.testing.assert_array_equal(y, first)
    view = y[1]
    del y
    gc.collect()
    np.testing.assert_array_equal(view, first[1])


def test_bad_input_raises_and_model_keeps_working(fixtures):
    m = kiln.load(fixtures / "mlp.pt")
    good = np.zeros((2, 8), dtype=np.float32)
    with pytest.raises(kiln.InferenceError, match=r"5x7 and 8x16"):
        m.predict(np.zeros((5, 7), dtype=np.float32))
    with pytest.raises(ValueError):  # InferenceError is a ValueError too
        m.predict(np.zeros((2, 8), dtype=np.int64))
    with pytest.raises(kiln.InferenceError, match="argument"):
        m.predict(good, good)
    with pytest.raises(TypeError, match="complex64"):
        m.predict(np.zeros((2, 8), dtype=np.complex64))
    assert m.predict(good).shape == (2, 3)
    m.close()
    with pytest.raises(kiln.KilnError, match="closed"):
        m.predict(good)


def test_bad_model_files(tmp_path, fixtures):
    with pytest.raises(kiln.ModelLoadError, match="no model"):
        kiln.load(tmp_path / "missing.pt")
    with pytest.raises(OSError):
        kiln.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(kiln.ModelLoadError, match="bad.pt"):
        kiln.load(bad)
    assert kiln.load(fixtures / "mlp.pt").num_parameters == 8 * 16 + 16 + 16 * 3 + 3


def test_threads():
    kiln.set_num_threads(2)
    assert kiln.get_num_threads() == 2
    with pytest.raises(ValueError):
        kiln.set_num_threads(0)
    with pytest.raises(TypeError):
        kiln.set_num_threads("2")


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_repeated_predict_fast_path_gives_fresh_correct_arrays(fixtures):
    """From the second call on with the same input shapes, predict takes the
    fast path (one Go call writing into arrays Python allocates): the
    results equal the first call's and torch's, and each call returns its
    own arrays."""
    m = kiln.load(fixtures / "mlp.pt")
    ref = torch.jit.load(str(fixtures / "mlp.pt"))
    x = raw(fixtures, "mlp", "in", 0, np.float32, (5, 8))[:1].copy()
    first = m.predict(x)
    assert m._fast, "the first call did not record a fast-path entry"
    second = m.predict(x)
    third = m.predict(x * 2)
    assert second.shape == (1, 3) and second.dtype == np.float32
    assert not np.shares_memory(first, second) and not np.shares_memory(second, third)
    np.testing.assert_array_equal(second, first)
    with torch.no_grad():
        np.testing.assert_allclose(third, ref(torch.from_numpy(x * 2)).numpy(), atol=1e-6)
    # Read-only and non-contiguous inputs of the same signature work too.
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(m.predict(ro), first)
    wide = np.repeat(x, 2, axis=0)[::2]
    np.testing.assert_array_equal(m.predict(wide), first)

    two = kiln.load(fixtures / "two_inputs.pt")
    a = raw(fixtures, "two_inputs", "in", 0, np.float32, (3, 4))
    b = raw(fixtures, "two_inputs", "in", 1, np.float32, (1,))
    want = two.predict(a, b)
    for _ in range(2):
        got = two.predict(a, b)
        assert len(got) == 3
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
            assert not np.shares_memory(g, w)


def test_fast_path_falls_back_when_outputs_change_or_alias(fixtures):
    m = kiln.load(fixtures / "positive.pt")
    x = np.array([[1.0, -1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(m.predict(x), [1.0, 2.0])
    np.testing.assert_array_equal(m.predict(x), [1.0, 2.0])
    # Same input shape, different output shape: still right.
    y = np.array([[3.0, 4.0, 5.0]], dtype=np.float32)
    np.testing.assert_array_equal(m.predict(y), [3.0, 4.0, 5.0])
    np.testing.assert_array_equal(m.predict(x), [1.0, 2.0])
    # An error raised on the fast path is a kiln error with the model's message.
    with pytest.raises(kiln.InferenceError, match="NaN in the input"):
        m.predict(np.array([[1.0, np.nan, 2.0]], dtype=np.float32))
    np.testing.assert_array_equal(m.predict(x), [1.0, 2.0])

    # An identity model stays zero-copy on every call.
    ident = kiln.load(fixtures / "identity.pt")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    for _ in range(3):
        assert ident.predict(x).ctypes.data == x.ctypes.data


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# A leak of 8 bytes per call (a quarter of gopy's C string per call) fails.
RSS_CALLS = 1_000_000
RSS_BOUND = 8 * 2**20


def test_million_one_row_predicts_keep_rss_bounded(fixtures):
    """1,000,000 one-row predict calls (the fast path) grow RSS by less than
    8 MiB: nothing is left behind per call."""
    m = kiln.load(fixtures / "mlp.pt")
    x = np.ones((1, 8), dtype=np.float32)
    predict = m.predict
    for _ in range(20_000):
        predict(x)
    gc.collect()
    before = _rss()
    for _ in range(RSS_CALLS):
        predict(x)
    gc.collect()
    grown = _rss() - before
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB over {RSS_CALLS:,} calls"


def test_general_predict_loop_keeps_rss_flat(fixtures):
    """The general path (Go-owned outputs handed to numpy) frees them too."""
    m = kiln.load(fixtures / "identity.pt")
    x = np.ones((4, 8), dtype=np.float32)
    for _ in range(2000):
        m.predict(x)
    gc.collect()
    before = _rss()
    for _ in range(30000):
        m.predict(x)
    gc.collect()
    after = _rss()
    assert after - before < 4 * 2**20, (before, after)


def test_predict_pyarrow_tables(fixtures):
    import pyarrow as pa

    m = kiln.load(fixtures / "mlp.pt")
    x = raw(fixtures, "mlp", "in", 0, np.float32, (5, 8))
    want = m.predict(x)
    # Numeric columns are stacked into the single input's feature matrix.
    table = pa.table({f"f{i}": x[:, i] for i in range(8)})
    np.testing.assert_array_equal(m.predict(table), want)
    # A fixed_shape_tensor column named like the input feeds it as is.
    col = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    np.testing.assert_array_equal(m.predict(pa.table({"x": col})), want)
    # Several chunks give one result per row, in order.
    chunked = pa.concat_tables([pa.table({"x": col.slice(0, 2)}), pa.table({"x": col.slice(2)})])
    np.testing.assert_array_equal(m.predict(chunked), want)
    np.testing.assert_array_equal(m.predict(pa.record_batch({"x": col})), want)


def test_pyarrow_column_is_not_copied(fixtures):
    import pyarrow as pa

    m = kiln.load(fixtures / "identity.pt")
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    col = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    y = m.predict(pa.table({"x": col}))
    assert y.ctypes.data == col.storage.values.buffers()[1].address
    np.testing.assert_array_equal(y, x)


def test_pyarrow_bad_columns(fixtures):
    import pyarrow as pa

    two = kiln.load(fixtures / "two_inputs.pt")
    with pytest.raises(ValueError, match="features"):
        two.predict(pa.table({"a": [1.0], "b": [2.0]}))
    m = kiln.load(fixtures / "mlp.pt")
    with pytest.raises(kiln.InferenceError, match="f0.*utf8"):
        m.predict(pa.table({"f0": ["a", "b"]}))
    with pytest.raises(kiln.InferenceError, match="5x2"):
        m.predict(pa.table({"f0": np.zeros(5, np.float32), "f1": np.zeros(5, np.float32)}))
    assert m.predict(np.zeros((1, 8), np.float32)).shape == (1, 3)


ZERO_COPY_SCRIPT = r"""
import resource, sys
import numpy as np
import torch
import kiln

torch.manual_seed(0)
torch.jit.script(torch.nn.Linear(64, 2)).save(sys.argv[1])
m = kiln.load(sys.argv[1])
m.predict(np.ones((20_000, 64), np.float32))  # warm up the JIT and the BLAS buffers
x = np.random.default_rng(0).standard_normal((1_000_000, 64), dtype=np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
y = m.predict(x)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert y.shape == (1_000_000, 2)
print(x.nbytes, before, after)
"""


def test_predict_large_input_adds_no_copy(tmp_path):
    """A 1,000,000 x 64 float32 predict raises peak RSS by less than 10% of
    the input's size: the input is not copied on its way to libtorch."""
    # OpenBLAS gives each of its threads a GEMM workspace on the first large
    # product (about 70 MiB with two threads, for torch alone as well): one
    # BLAS thread keeps that workspace out of the measurement of copies.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", ZERO_COPY_SCRIPT, str(tmp_path / "lin.pt")],
                         capture_output=True, text=True, check=True, cwd=tmp_path, env=env).stdout
    nbytes, before, after = map(int, out.split())
    assert after - before < 0.10 * nbytes, f"peak RSS grew by {(after - before) / 2**20:.1f} MiB for a {nbytes / 2**20:.0f} MiB input"


def test_packages_load_through_go(tmp_path):
    """kiln.load takes a package's manifest from Go (core/modelpkg): a
    package written before that module existed loads, under the quantized
    engine it records; a directory without a valid manifest is refused,
    naming the file."""
    pkg = os.path.join(ROOT, "core", "modelpkg", "testdata", "v1-int8")
    m = kiln.load(pkg)
    assert m.manifest["format"] == "kiln-model/1"
    assert m.manifest["optimization"]["engine"] == "qnnpack"
    assert m.classes_ == ["x", "y"]
    assert m.predict(np.zeros((4, 3), dtype=np.float32)).shape == (4, 2)
    m.save(tmp_path / "copy")
    assert sorted(os.listdir(tmp_path / "copy")) == ["manifest.json", "model.pt"]
    assert kiln.load(tmp_path / "copy").manifest == m.manifest
    m.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(kiln.ModelLoadError, match="manifest.json"):
        kiln.load(empty)
    (tmp_path / "copy" / "manifest.json").write_text('{"format": "kiln-model/9"}')
    with pytest.raises(kiln.ModelLoadError, match="unknown model package format"):
        kiln.load(tmp_path / "copy")
