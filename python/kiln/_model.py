"""TorchScript models run by Kiln's Go core, with numpy arrays passed by
address in both directions."""
import ctypes
import json
import os
import weakref
from typing import List, Sequence, Tuple, Union

import numpy as np

from ._errors import InferenceError, KilnError, ModelLoadError, translate
from ._native import bindings as _b

_DTYPES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.int64): "int64",
    np.dtype(np.int32): "int32",
    np.dtype(np.int16): "int16",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.bool_): "bool",
    np.dtype(np.float16): "float16",
}
_NUMPY = {v: k for k, v in _DTYPES.items()}

ArrayLike = Union[np.ndarray, Sequence]


def _as_input(x, i: int) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"input {i}: cannot convert {type(x).__name__} to an array: {e}") from None
    if x.dtype not in _DTYPES:
        raise TypeError(f"input {i}: dtype {x.dtype} is not supported; use one of {sorted(_DTYPES.values())}")
    # Row-major, aligned, native byte order: view as is; otherwise one copy.
    return np.require(x, requirements=["C", "A"]).astype(x.dtype.newbyteorder("="), copy=False)


def _wrap_output(out, i: int, keep) -> np.ndarray:
    dtype = _NUMPY.get(out.DType(i))
    shape = tuple(json.loads(out.ShapeJSON(i)))
    if dtype is None:
        raise KilnError(f"output {i} has dtype {out.DType(i)}, which numpy cannot hold")
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n == 0:
        return np.empty(shape, dtype=dtype)
    # A view of libtorch's memory: no copy. The ctypes buffer owns the Go
    # Output; when numpy drops the last view of it, the tensors are freed.
    buf = (ctypes.c_char * n).from_address(out.Addr(i))
    buf._kiln_keep = keep
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _is_arrow(x) -> bool:
    return type(x).__module__.startswith("pyarrow") and type(x).__name__ in ("Table", "RecordBatch")


def _is_pandas(x) -> bool:
    return type(x).__module__.startswith("pandas") and type(x).__name__ == "DataFrame"


def _pandas_to_arrow(df):
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False)


class _Owner:
    """Closes a Go Output exactly once, when the last array viewing it dies."""

    def __init__(self, out, inputs):
        self._inputs = inputs  # outputs may alias inputs: keep them alive too
        self._fin = weakref.finalize(self, out.Close)


class Model:
    """A TorchScript model loaded by Kiln's Go core, in eval mode.

    ``predict`` takes numpy arrays (or anything ``np.asarray`` accepts) and
    returns numpy arrays; C-contiguous inputs and all outputs are passed by
    address, without copying.
    """

    def __init__(self, handle, path: str):
        self._h = handle
        self.path = path
        self._inputs = json.loads(handle.InputsJSON() or "null") or []

    @property
    def inputs(self) -> List[Tuple[str, str]]:
        """(name, TorchScript type) of each forward argument."""
        return [(a["name"], a["type"]) for a in self._inputs]

    @property
    def schema(self) -> str:
        """The TorchScript schema of forward."""
        return self._h.Schema()

    @property
    def num_parameters(self) -> int:
        """The number of parameter elements."""
        return self._h.NumParameters()

    def predict(self, *inputs: ArrayLike):
        """Runs forward on the inputs without recording gradients.

        Inputs are numpy arrays (or array-likes), one per forward argument;
        or a single pyarrow Table/RecordBatch or pandas DataFrame, whose
        columns named like the model's inputs feed them (a model with one
        input takes a fixed_shape_tensor column as is, or all numeric
        columns stacked as features). Returns one array when the model
        returns one tensor, else a tuple (nested tuples flattened in order).
        """
        if self._h is None:
            raise KilnError("model is closed")
        if len(inputs) == 1 and _is_pandas(inputs[0]):
            inputs = (_pandas_to_arrow(inputs[0]),)
        if len(inputs) == 1 and _is_arrow(inputs[0]):
            return self._predict_arrow(inputs[0])
        arrays = [_as_input(x, i) for i, x in enumerate(inputs)]
        spec = json.dumps(
            [{"addr": a.ctypes.data, "dtype": _DTYPES[a.dtype.newbyteorder("=")], "shape": list(a.shape)} for a in arrays]
        )
        try:
            out = self._h.Predict(spec)
        except RuntimeError as e:
            raise translate(e, InferenceError) from None
        owner = _Owner(out, arrays)
        res = tuple(_wrap_output(out, i, owner) for i in range(out.Count()))
        return res[0] if len(res) == 1 else res

    __call__ = predict

    def _arrow_columns(self, names: List[str]) -> List[List[str]]:
        """Which columns feed which input: columns named like the inputs,
        else every column into a single-input model."""
        wanted = [n for n, _ in self.inputs]
        if wanted and all(n in names for n in wanted):
            return [[n] for n in wanted]
        if len(wanted) == 1:
            return [list(names)]
        raise ValueError(f"the model's inputs {wanted} are not all among the columns {names}")

    def _predict_arrow(self, data):
        import pyarrow as pa

        if isinstance(data, pa.Table):
            batches = data.combine_chunks().to_batches()
            if not batches:
                raise ValueError("the table has no rows")
        else:
            batches = [data]
        columns = json.dumps(self._arrow_columns(batches[0].schema.names))
        results = []
        for b in batches:
            # The C Data Interface structs (ArrowArray: 80 bytes, ArrowSchema:
            # 72) live here; Go imports the batch from them and releases it.
            arr, sch = ctypes.create_string_buffer(80), ctypes.create_string_buffer(72)
            b._export_to_c(ctypes.addressof(arr), ctypes.addressof(sch))
            try:
                out = self._h.PredictArrow(ctypes.addressof(arr), ctypes.addressof(sch), columns)
            except RuntimeError as e:
                raise translate(e, InferenceError) from None
            owner = _Owner(out, [b])
            results.append(tuple(_wrap_output(out, i, owner) for i in range(out.Count())))
        res = results[0] if len(results) == 1 else tuple(np.concatenate(parts) for parts in zip(*results))
        return res[0] if len(res) == 1 else res

    def close(self) -> None:
        """Releases the model's native memory now (idempotent)."""
        if self._h is not None:
            self._h.Close()
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        args = ", ".join(f"{n}: {t}" for n, t in self.inputs)
        return f"kiln.Model({os.path.basename(self.path)!r}, forward({args}), {self.num_parameters} parameters)"


def load(path: Union[str, os.PathLike]) -> Model:
    """Loads a TorchScript file (as written by torch.jit.save)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"kiln: no model at {path}")
    try:
        h = _b.LoadModel(os.path.abspath(path))
    except RuntimeError as e:
        raise translate(e, ModelLoadError) from None
    return Model(h, path)
