"""TorchScript models run by Kiln's Go core, with numpy arrays passed by
address in both directions."""
import ctypes
import json
import math
import os
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _train
from ._errors import InferenceError, KilnError, ModelLoadError, ModelNotFoundError, translate
from ._inputs import is_arrow, is_pandas, pandas_to_arrow
from ._native import _kilngo as _go
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
# The Go core's codes for each dtype, as PredictInto's descriptors use them.
_CODES = {dt: _b.DTypeCode(name) for dt, name in _DTYPES.items()}
_DONE, _MISMATCH, _ALIASED = _b.PredictDone, _b.PredictMismatch, _b.PredictAliased
# Outputs up to this size take the fast path (copied into numpy arrays
# Python allocates); larger ones are handed over without a copy.
_FAST_MAX_BYTES = 1 << 16
# Input signatures (dtype and shape of each input) remembered per model.
_FAST_MAX_ENTRIES = 64

ArrayLike = Union[np.ndarray, Sequence]


def _as_input(x, i: int) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"input {i}: cannot convert {type(x).__name__} to an array: {e}") from None
    # Byte order does not change the element type: a big-endian ">f4" array
    # is float32, copied into native order below.
    if x.dtype.newbyteorder("=") not in _DTYPES:
        raise TypeError(f"input {i}: dtype {x.dtype} is not supported; use one of {sorted(_DTYPES.values())}")
    # Row-major, aligned, native byte order: view as is; otherwise one copy.
    if x.flags.c_contiguous and x.flags.aligned and x.dtype.isnative:
        return x
    return np.require(x, requirements=["C", "A"]).astype(x.dtype.newbyteorder("="), copy=False)


def _wrap_output(out, i: int, keep) -> np.ndarray:
    dtype = _NUMPY.get(out.DType(i))
    shape = tuple(json.loads(out.ShapeJSON(i)))
    if dtype is None:
        raise KilnError(f"output {i} has dtype {out.DType(i)}, which numpy cannot hold")
    n = math.prod(shape) * dtype.itemsize
    if n == 0:
        return np.empty(shape, dtype=dtype)
    # A view of libtorch's memory: no copy. The ctypes buffer owns the Go
    # Output; when numpy drops the last view of it, the tensors are freed.
    buf = (ctypes.c_char * n).from_address(out.Addr(i))
    buf._kiln_keep = keep
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


class _Owner:
    """Closes a Go Output exactly once, when the last array viewing it dies."""

    def __init__(self, out, inputs):
        self._inputs = inputs  # outputs may alias inputs: keep them alive too
        self._fin = weakref.finalize(self, out.Close)


_byte, _addressof = ctypes.c_byte, ctypes.addressof
_predict_into = _go.bindings_Model_PredictInto


def _addr(a: np.ndarray) -> int:
    """The address of a C-contiguous array's data (through ctypes'
    from_buffer, twice as fast as .ctypes.data, for non-empty writable
    arrays)."""
    return _addressof(_byte.from_buffer(a)) if a.flags.writeable and a.nbytes else a.ctypes.data


class _Fast:
    """What the fast path needs for one input signature: the descriptor
    PredictInto reads (kept alive here) and the outputs to allocate."""

    __slots__ = ("desc", "addr", "outs", "single", "out_shape", "out_dtype", "out_empty")

    def __init__(self, arrays, results):
        d = [len(arrays), len(results)]
        for a in (*arrays, *results):
            d += [_CODES[a.dtype], a.ndim, *a.shape]
        self.desc = np.array(d, dtype=np.int64)
        self.addr = self.desc.ctypes.data
        self.outs = [(r.shape, r.dtype) for r in results]
        self.single = len(arrays) == 1 and len(results) == 1
        # The one output of a single-input, single-output signature.
        self.out_shape, self.out_dtype = self.outs[0] if self.single else ((), None)
        self.out_empty = self.single and results[0].nbytes == 0


def _fast_entry(inputs, arrays, results):
    """The fast-path entry for a call that went the general way, or None
    when that signature must keep going the general way: an input needed a
    conversion, an output is large, of a dtype without a code, or shares
    memory with an input (zero-copy must then hand over libtorch's memory)."""
    if any(a is not x for a, x in zip(arrays, inputs)):
        return None
    total = 0
    for r in results:
        if r.dtype not in _CODES or not r.flags.c_contiguous:
            return None
        total += r.nbytes
        if r.nbytes and any(np.shares_memory(r, a) for a in arrays):
            return None
    if total > _FAST_MAX_BYTES:
        return None
    return _Fast(arrays, results)


class Model:
    """A TorchScript model loaded by Kiln's Go core, in eval mode.

    ``predict`` takes numpy arrays (or anything ``np.asarray`` accepts) and
    returns numpy arrays; C-contiguous inputs and all outputs are passed by
    address, without copying.
    """

    def __init__(self, handle=None, path: str = "", spec: Optional[dict] = None, manifest: Optional[dict] = None):
        self._h = handle
        self.path = path
        self.spec = spec
        self.manifest = manifest
        self._package = None
        # The registry run that made the current package (fit, select,
        # prune/quantize); the version it is registered as (register,
        # Registry.load); the registered version an optimized package
        # derives from (the parent register records).
        self.run_id: Optional[str] = None
        self.registered = None
        self._parent = None
        # Input signature -> _Fast, or None for "use the general path".
        self._fast: Dict[tuple, Optional[_Fast]] = {}
        self._inputs = json.loads(handle.InputsJSON() or "null") or [] if handle is not None else []

    @classmethod
    def from_spec(cls, spec) -> "Model":
        """A new, untrained network from a core/nn spec: a dict, or JSON or
        YAML text, e.g. {"layers": [{"type": "linear", "out": 32},
        {"type": "relu"}, {"type": "linear"}]} (the last linear layer's
        ``out`` defaults to the number of classes, or 1)."""
        if isinstance(spec, str):
            import yaml

            spec = yaml.safe_load(spec)
        if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
            raise ValueError("a model spec is a mapping with a 'layers' list")
        return cls(spec=dict(spec))

    def fit(self, x, y, epochs: int = 10, batch_size: int = 32, validation_split: float = 0.2,
            optimizer: str = "adam", lr: float = 1e-3, loss: Optional[str] = None, seed: int = 0,
            early_stopping: Optional[dict] = None, verbose: int = 1, callbacks=(), workers: int = 1,
            freeze=None, param_groups=None, freeze_bn: bool = False,
            device: Optional[str] = None, amp: Optional[str] = None, metrics=None,
            sync_batchnorm: bool = False, record: Optional[bool] = None, register: Optional[str] = None,
            registry=None):
        """Trains in Kiln's Go core (the GIL is released while it works) and
        returns a ``kiln.callbacks.History``: ``history.history["loss"]``
        (training loss per epoch), ``["val_loss"]``, ``["val_accuracy"]``,
        ... (validation metrics per epoch; ``metrics`` picks which, e.g.
        ["accuracy"]), ``history.epoch``, ``history.params``.

        x: float features [rows, features]. y: targets [rows]. Text, bool
        and integer labels make a classifier (labels kept as ``classes_``;
        with a binary loss, bce_with_logits or binary_crossentropy, 0/1
        labels make a binary one with classes [0, 1]); floats a regressor.
        loss: mse, l1, huber, bce_with_logits, cross_entropy, or Keras's
        binary_crossentropy (the network ends in a sigmoid),
        categorical_crossentropy (one-hot y) and
        sparse_categorical_crossentropy (ending in a softmax): computed
        stably on the activation's input; the model then predicts
        probabilities. callbacks: kiln.callbacks.EarlyStopping and
        ModelCheckpoint (run in the Go core), Callback objects or functions
        of each epoch's event. Ctrl-C cancels. ``workers`` > 1 trains
        data-parallel: that many ranks of a c10d Gloo group in this
        process, each with ``batch_size`` on its shard (as ``torchrun
        --nproc_per_node`` would run them); ``sync_batchnorm`` makes the
        ranks' batch-norm layers normalize with the statistics of all ranks'
        batches together (``torch.nn.SyncBatchNorm``; default: each rank its
        own, as DDP), no effect with one worker. Errors: ValueError
        (kiln.InvalidArgumentError) for data, loss and network that do not
        fit together.

        ``device`` is where training runs, as PyTorch names devices: "cpu"
        (default), "cuda" or "cuda:N" (needs a Kiln built against a libtorch
        with CUDA, and the GPU; otherwise ``kiln.UnsupportedError`` /
        ``kiln.UnavailableError`` before any work). ``amp`` is mixed
        precision: "bf16" (CPU or CUDA) or "fp16" (CUDA) autocast of
        forward and loss, as ``torch.autocast``; weights stay float32.

        A model loaded from a TorchScript file (any architecture, e.g. a
        ResNet scripted in Python torch) is fine-tuned: x is
        [rows, *input_shape] as its forward takes it (unscaled), every
        parameter trains except those whose names (``named_parameters``)
        start with a ``freeze`` prefix (e.g. ``["conv1.", "layer1."]``);
        ``param_groups=[{"prefix": "fc.", "lr": 1e-2}]`` gives parameters
        their own learning rate; ``freeze_bn=True`` keeps the frozen
        modules' batch norm in eval mode. The result is TorchScript that
        ``torch.jit.load`` reads (``save``/``export_torchscript``).

"""
        if self._h is not None and not (self.spec or {}).get("layers"):
            from . import _finetune

            with _finetune.fit(self._package or self.path, x, y, epochs=epochs, batch_size=batch_size,
                               validation_split=validation_split, optimizer=optimizer, lr=lr, loss=loss,
                               seed=seed, early_stopping=early_stopping, verbose=verbose, callbacks=callbacks,
                               freeze=freeze, param_groups=param_groups, freeze_bn=freeze_bn) as (out, history):
                old = self._adopt(load(out), out)
            if old is not None:
                old.Close()
            return history
        if freeze or param_groups or freeze_bn:
            raise ValueError("freeze, param_groups and freeze_bn apply to fine-tuning a loaded TorchScript model")
        from . import _registry

        rec = _registry.record_spec(record, register, registry)
        with _train.fit(self.spec, x, y, epochs=epochs, batch_size=batch_size, validation_split=validation_split,
                        optimizer=optimizer, lr=lr, loss=loss, seed=seed, early_stopping=early_stopping,
                        verbose=verbose, callbacks=callbacks, workers=workers, device=device,
                        amp=amp, metrics=metrics, sync_batchnorm=sync_batchnorm,
                        record=rec) as (out, history):
            self._adopt(load(out), out)
        history.model = self
        self.run_id, self.registered, self._parent = history.run_id, None, None
        if register:
            history.registered = self.register(register, registry=registry)
        return history

    def evaluate(self, x, y) -> Dict[str, float]:
        """Metrics of the trained model on (x, y): accuracy for a classifier,
        mse/mae/r2 for a regressor."""
        return _train.evaluate(self, x, y)

    def save(self, path) -> None:
        """Writes the Kiln model package (model.pt + manifest.json) to the
        directory path, which kiln.load reads back."""
        if self._package is None:
            raise KilnError("only a model trained by fit (or loaded from a package) can be saved")
        try:
            _b.CopyPackage(self._package, os.fspath(path))
        except RuntimeError as e:
            raise translate(e, KilnError) from None

    def export_torchscript(self, path) -> None:
        """Writes the TorchScript module alone; torch.jit.load reads it."""
        import shutil

        if self._package is None:
            raise KilnError("only a model trained by fit (or loaded from a package) can be exported")
        shutil.copy2(os.path.join(self._package, "model.pt"), os.fspath(path))

    def prune(self, amount: float, x, y, structured: bool = False, global_: bool = False,
              finetune_epochs: int = 0, steps: int = 1, record: Optional[bool] = None,
              register: Optional[str] = None, registry=None) -> dict:
        """Prunes this trained model in place: unstructured magnitude pruning
        to `amount` sparsity (per layer, or across layers with global_), or
        with structured=True removes that fraction of each hidden Linear
        layer's neurons and conv layer's channels and rebuilds a smaller
        dense network; then fine-tunes
        for finetune_epochs. x and y are the data fit used (its splits are
        re-created). Returns the record with the size/accuracy/latency report.
        record, register, registry: as for ``quantize``."""
        if not 0 <= amount < 1:
            raise ValueError(f"amount (sparsity) {amount} is outside [0, 1)")
        return self._optimize(x, y, {"prune": amount, "structured": structured, "global": global_,
                                     "finetune_epochs": finetune_epochs, "steps": steps},
                              record=record, register=register, registry=registry)

    def quantize(self, mode: str, x, y, engine: str = "", calibration=None, weights: str = "",
                 record: Optional[bool] = None, register: Optional[str] = None, registry=None) -> dict:
        """Quantizes this trained model in place and returns the record
        with the report (size, parameters, accuracy, latency at batch 1 and
        64, before and after).

        mode: "int8" (dynamic int8 Linear layers; static int8 Linear and
        Conv layers when `calibration` is given), "fp16" or "bf16"
        (weight-only). x, y: the data the model was fitted on (its splits
        are re-created to measure accuracy). engine: the quantized engine
        ("qnnpack", "onednn", "fbgemm", "x86"; "" picks the first of
        fbgemm, qnnpack, onednn that the linked libtorch has); it is
        recorded in the package's manifest and selected when Kiln loads it
        (set torch.backends.quantized.engine to it before torch.jit.load).
        calibration: rows of raw model inputs (a numpy array of shape
        [rows, features], a pandas DataFrame or a pyarrow Table/RecordBatch
        whose columns are the features, in order) that static int8 runs
        through the float model to observe activation ranges; a few
        hundred representative rows are enough. weights: static int8's
        weight scales, "per-channel" (more accurate) or "per-tensor"
        (smaller file); "" takes the engine's default (per-tensor on
        qnnpack, as PyTorch's default qconfig).

        Registry (as for ``fit``): the optimization is recorded as a run
        of kind "optimize" (its options, one metric step per variant:
        metric, file bytes, parameters, sparsity, latency) when
        ``record`` is True or, with None, when ``registry`` or
        ``register`` is given or ``$KILN_REGISTRY`` is set; the record's
        ``run_id`` and ``model.run_id`` name it. ``register="NAME"``
        registers the result (``record["registered"]``); when this model
        came from the registry (``Registry.load``, ``register``) that
        version is its parent."""
        return self._optimize(x, y, {"quantize": mode, "engine": engine, "weights": weights},
                              calibration=calibration, record=record, register=register, registry=registry)

    def _optimize(self, x, y, options, calibration=None, record=None, register=None, registry=None) -> dict:
        """Runs the Go optimizer on this model's package with options (see
        core/optimize.Options) and takes over the optimized package;
        returns the optimization record."""
        from . import _registry

        rec = _registry.record_spec(record, register, registry)
        with _train.optimize(self._package, self.classes_, x, y, options, calibration, record=rec) as (out, result):
            new = load(out)
        old = self._adopt(new, out)
        if old is not None:
            old.Close()
        # The optimized package derives from the registered version this
        # model was (or from that one's parent, after several steps).
        self._parent = self.registered or self._parent
        self.registered, self.run_id = None, result.run_id
        if register:
            result["registered"] = self.register(register, registry=registry)
        return result

    def register(self, name: str, registry=None, *, run_id: Optional[str] = None, parent: Optional[str] = None,
                 description: str = "", actor: str = "", lineage: Optional[dict] = None):
        """Registers this model's package as a new immutable version of the
        registered model ``name`` (created when new) and returns the
        ``kiln.ModelVersion`` (digest, size, run, parent, lineage, ...).

        registry: a ``kiln.Registry``, a registry URI, or None for the
        default (``$KILN_REGISTRY``, else ``$KILN_HOME/registry.db``). The
        lineage is what the package's manifest records (data fingerprint,
        network spec, hyper-parameters, preprocessing, optimization report,
        metrics) plus ``lineage``; run_id defaults to the run that made the
        package (``model.run_id``), parent to the registered version an
        optimized model derives from (``models:/NAME/VERSION``). Raises
        KilnError for a model without a package (untrained, or loaded from
        a bare TorchScript file)."""
        from . import _registry

        if self._package is None:
            raise KilnError("only a model trained by fit (or loaded from a package) can be registered")
        if parent is None and self._parent is not None:
            parent = self._parent.uri
        opts = {"run_id": run_id if run_id is not None else (self.run_id or ""), "description": description,
                "actor": actor}
        if parent:
            opts["parent"] = _registry._parse_ref(parent)
        if lineage:
            opts["lineage"] = lineage
        reg, close = _registry.open_for(registry)
        try:
            v = _registry.ModelVersion._from(reg._json("Register", name, self._package, json.dumps(opts)))
        finally:
            if close:
                reg.close()
        self.registered = v
        return v

    def _adopt(self, new: "Model", package: str):
        """Takes over new's native model and manifest, which it loaded from
        the package directory package, and returns the native model this one
        had (the caller closes it, or leaves it to the garbage collector)."""
        old = self._h
        self._h, self.path, self.manifest, self._package = new._h, package, new.manifest, package
        self._fast.clear()
        self._inputs = new._inputs
        new._h = None
        return old

    def deploy(self, repository, name: str) -> int:
        """Installs this trained model into a model repository as the next
        version of model `name` (writing its config.yaml when new, as the
        Flight train action does); returns the version. A server in poll
        mode picks it up, or load it with Client.load_model."""
        if self._package is None:
            raise KilnError("only a model trained by fit (or loaded from a package) can be deployed")
        try:
            return _b.Deploy(self._package, os.fspath(repository), name)
        except RuntimeError as e:
            raise translate(e, KilnError) from None

    def summary(self, print_fn=None) -> None:
        """Prints the network as Keras does: each layer's name and type,
        its output shape (None: the batch dimension) and its parameter
        count, then the totals. Needs the input size: a trained model, or a
        first layer with input_shape. print_fn (default print) receives the
        text."""
        from ._summary import summary

        (print_fn or print)(summary(self))

    @property
    def classes_(self) -> Optional[list]:
        """Class labels of a classifier, in output order."""
        m = self.manifest or {}
        return m.get("python_labels", m.get("labels"))

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
        # Fast path: numpy inputs whose signature (dtypes and shapes) an
        # earlier call taught us; one Go call with integer arguments that
        # copies the small outputs into arrays allocated here. The most
        # common call, one C-contiguous array in and one out, takes the
        # fewest Python steps (each costs about as much as torch's own
        # per-call overhead, which is what predict is measured against).
        h = self._h
        if len(inputs) == 1 and h is not None:
            x = inputs[0]
            if type(x) is np.ndarray:
                key = ((x.dtype, x.shape),)
                fast = self._fast.get(key)
                flags = x.flags
                if fast is not None and fast.single and flags.c_contiguous and flags.aligned:
                    y = np.empty(fast.out_shape, fast.out_dtype)
                    try:
                        rc = _predict_into(
                            h.handle, fast.addr,
                            _addressof(_byte.from_buffer(x)) if flags.writeable and x.nbytes else x.ctypes.data,
                            y.ctypes.data if fast.out_empty else _addressof(_byte.from_buffer(y)))
                    except RuntimeError as e:
                        raise translate(e, InferenceError) from None
                    if rc == _DONE:
                        return y
                    # The outputs differ from last time (or alias the input
                    # now): relearn from the general path.
                    self._fast.pop(key, None)
                    return self._predict_general(inputs, key)
        try:
            if len(inputs) == 1:
                x = inputs[0]
                key = ((x.dtype, x.shape),)
            else:
                key = tuple([(x.dtype, x.shape) for x in inputs])
            fast = self._fast.get(key)
        except (AttributeError, TypeError):  # not arrays; unhashable
            key = fast = None
        # Several inputs or outputs: their addresses in one array. (A
        # single-input, single-output signature got here only because its
        # array is not a C-contiguous, aligned ndarray: the general path.)
        if (fast is not None and h is not None and not fast.single
                and all(type(x) is np.ndarray and x.flags.c_contiguous and x.flags.aligned for x in inputs)):
            results = [np.empty(shape, dtype) for shape, dtype in fast.outs]
            addrs = np.array([_addr(a) for a in (*inputs, *results)], dtype=np.uint64)
            try:
                rc = _predict_into(h.handle, fast.addr, addrs.ctypes.data, 0)
            except RuntimeError as e:
                raise translate(e, InferenceError) from None
            if rc == _DONE:
                return results[0] if len(results) == 1 else tuple(results)
            # The outputs differ from last time (or alias an input now):
            # relearn from the general path.
            self._fast.pop(key, None)
        return self._predict_general(inputs, key)

    __call__ = predict

    def _predict_general(self, inputs, key):
        if self._h is None:
            raise KilnError("model is closed" if self.spec is None or self._package else "model is not trained: call fit first")
        if len(inputs) == 1 and is_pandas(inputs[0]):
            inputs = (pandas_to_arrow(inputs[0]),)
        if len(inputs) == 1 and is_arrow(inputs[0]):
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
        if key is not None and key not in self._fast:
            if len(self._fast) >= _FAST_MAX_ENTRIES:
                self._fast.clear()
            self._fast[key] = _fast_entry(inputs, arrays, res)
        return res[0] if len(res) == 1 else res

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
        if self._h is None:
            return f"kiln.Model(untrained, {len(self.spec.get('layers', [])) if self.spec else 0} layers)"
        args = ", ".join(f"{n}: {t}" for n, t in self.inputs)
        return f"kiln.Model({os.path.basename(self.path)!r}, forward({args}), {self.num_parameters} parameters)"


def load(path: Union[str, os.PathLike]) -> Model:
    """Loads a Kiln model package (a directory with model.pt and
    manifest.json, as fit/save and `kiln train` write) or a TorchScript
    file (as torch.jit.save writes). Go reads and checks the package
    (core/modelpkg) and hands over its manifest."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelNotFoundError(f"kiln: no model at {path}")
    try:
        h = _b.LoadModel(os.path.abspath(path))
    except RuntimeError as e:
        raise translate(e, ModelLoadError) from None
    manifest = json.loads(h.ManifestJSON() or "null")
    m = Model(h, path, spec=(manifest or {}).get("spec"), manifest=manifest)
    if manifest is not None:
        m._package = os.path.abspath(path)
    return m
