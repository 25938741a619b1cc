"""pyarrow and Kiln's Go arrowio agree on arrow.fixed_shape_tensor.

pyarrow writes an IPC stream with fixed_shape_tensor columns; the Go helper
arrowio/internal/ipccheck reads it with arrowio's extension type, passes
every batch through the C Data Interface and each tensor column through a
libtorch tensor and back (without copies), and writes the stream back;
pyarrow must read the same type, parameters and values."""
import subprocess

import numpy as np
import pyarrow as pa
import pytest

from conftest import ROOT


@pytest.fixture(scope="session")
def ipccheck(tmp_path_factory):
    path = tmp_path_factory.mktemp("bin") / "ipccheck"
    subprocess.run(["go", "build", "-o", str(path), "./arrowio/internal/ipccheck"], cwd=ROOT, check=True)
    return path


def round_trip(ipccheck, table, check=True):
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=3):
            w.write_batch(batch)
    res = subprocess.run([str(ipccheck)], input=sink.getvalue().to_pybytes(), capture_output=True)
    if not check:
        return res
    assert res.returncode == 0, res.stderr.decode()
    return pa.ipc.open_stream(res.stdout).read_all()


def tensor_column(value_type, shape, rows, **params):
    typ = pa.fixed_shape_tensor(value_type, shape, **params)
    n = int(np.prod(shape))
    flat = (np.arange(rows * n) * 0.5 - 3).astype(NUMPY[value_type])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type), n)
    return pa.ExtensionArray.from_storage(typ, storage)


NUMPY = {pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64,
         pa.int64(): np.int64, pa.uint8(): np.uint8}

CASES = [
    (pa.float32(), [2, 3], {}),
    (pa.float32(), [2, 3], {"dim_names": ["H", "W"]}),
    (pa.int64(), [2, 3, 4], {"dim_names": ["C", "H", "W"], "permutation": [2, 0, 1]}),
    (pa.float64(), [5], {}),
    (pa.float16(), [1, 2], {"permutation": [1, 0]}),
    (pa.uint8(), [3], {"dim_names": ["rgb"]}),
]


@pytest.mark.parametrize("value_type,shape,params", CASES)
def test_round_trip(ipccheck, value_type, shape, params):
    col = tensor_column(value_type, shape, rows=7, **params)
    table = pa.table({"x": col, "id": pa.array(range(7), pa.int64())})
    out = round_trip(ipccheck, table)
    typ = out.schema.field("x").type
    assert isinstance(typ, pa.FixedShapeTensorType), typ
    assert typ.value_type == value_type
    assert typ.shape == shape
    assert typ.dim_names == params.get("dim_names")
    assert typ.permutation == params.get("permutation")
    assert typ == col.type
    assert out.equals(table)
    got = out.column("x").combine_chunks()
    assert got.storage.flatten().to_numpy().tobytes() == col.storage.flatten().to_numpy().tobytes()
    np.testing.assert_array_equal(got.to_numpy_ndarray(), col.to_numpy_ndarray())


def test_numpy_layouts(ipccheck):
    # A non-C-contiguous ndarray: pyarrow stores it with a permutation.
    x = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 2, 3).transpose(0, 2, 1)
    col = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    assert col.type.permutation == [1, 0]
    out = round_trip(ipccheck, pa.table({"x": col}))
    np.testing.assert_array_equal(out.column("x").combine_chunks().to_numpy_ndarray(), x)


def test_sliced_input(ipccheck):
    col = tensor_column(pa.float32(), [2, 2], rows=10)
    table = pa.table({"x": col}).slice(3, 5)
    out = round_trip(ipccheck, table)
    assert out.equals(table)


def test_no_rows(ipccheck):
    table = pa.table({"x": tensor_column(pa.float32(), [2, 3], rows=0)})
    out = round_trip(ipccheck, table)
    assert out.schema.equals(table.schema)
    assert out.num_rows == 0


def test_null_rows_are_refused(ipccheck):
    typ = pa.fixed_shape_tensor(pa.float32(), [2])
    storage = pa.array([[1, 2], None, [3, 4]], pa.list_(pa.float32(), 2))
    table = pa.table({"x": pa.ExtensionArray.from_storage(typ, storage)})
    res = round_trip(ipccheck, table, check=False)
    assert res.returncode == 1
    assert b'column "x"' in res.stderr and b"null" in res.stderr


def test_bad_metadata_is_refused(ipccheck):
    # A stream whose extension metadata does not fit its storage.
    field = pa.field("x", pa.list_(pa.float32(), 6), metadata={
        b"ARROW:extension:name": b"arrow.fixed_shape_tensor",
        b"ARROW:extension:metadata": b'{"shape":[2,4]}',
    })
    # pyarrow itself refuses this type, so write the storage schema by hand
    # under a name it does not know, then swap in the canonical name.
    sink = pa.BufferOutputStream()
    placeholder = field.with_metadata({
        b"ARROW:extension:name": b"arrow.fixed_shape_tensoX",
        b"ARROW:extension:metadata": b'{"shape":[2,4]}',
    })
    schema = pa.schema([placeholder])
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(pa.record_batch([pa.array([[0] * 6], pa.list_(pa.float32(), 6))], schema=schema))
    data = sink.getvalue().to_pybytes().replace(b"arrow.fixed_shape_tensoX", b"arrow.fixed_shape_tensor")
    res = subprocess.run([str(ipccheck)], input=data, capture_output=True)
    assert res.returncode == 1
    assert b"holds 8 elements" in res.stderr
