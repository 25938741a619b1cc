"""Go core jobs run from Python: training, optimization and model
selection, polled with progress in Python. Each writes a model package to
a temporary directory that the caller (kiln.Model, select_model) loads;
this module knows nothing of kiln.Model beyond what evaluate calls."""
import contextlib
import json
import shutil
import signal
import tempfile
import threading
import time

import numpy as np

from ._errors import InferenceError, KilnError, translate
from ._inputs import is_arrow, is_pandas
from ._native import bindings as _b


def _progress(total, verbose):
    if not verbose:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is optional
        return None
    return tqdm(total=total, unit="epoch", desc="kiln fit")


class History(dict):
    """What a job returns (fit's per-epoch history, an optimization
    record, a leaderboard), a dict, with ``run_id``: the registry run that
    recorded the job (also under the key "run_id"; None when not
    recorded)."""

    run_id = None


def _run_job(start, bar, on_event, context=KilnError, start_context=KilnError):
    """Starts a Go job with start() and polls it (the GIL is free between
    polls) until it is done, passing each progress event to
    on_event(event, bar); Ctrl-C cancels the job. Returns (report, handle),
    or raises the job's error (as the Kiln exception class for its code, in
    context: see _errors.error_class; a start error in start_context).

    A Ctrl-C that arrives while start() runs is held until the handle is
    ours, then cancels the job: otherwise it would surface between the
    start and the polling, and the job would go on unowned."""
    held, h = [], None
    restore = _hold_interrupts(held)
    try:
        try:
            h = start()
        except RuntimeError as e:
            raise translate(e, start_context) from None
        finally:
            restore()
        if held:
            raise KeyboardInterrupt
        while True:
            st = json.loads(h.Poll(200))
            for e in st["events"]:
                on_event(e, bar)
            if st["done"]:
                break
    except KeyboardInterrupt:
        if h is not None:
            h.Cancel()
            # Let the job stop before the caller cleans up what it was writing
            # (it stops at its next epoch or stage); a second Ctrl-C stops waiting.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not json.loads(h.Poll(200))["done"]:
                pass
        raise
    finally:
        if bar is not None:
            bar.close()
    try:
        return json.loads(h.Report()), h
    except RuntimeError as e:
        raise translate(e, context) from None


def _hold_interrupts(held):
    """Makes SIGINT append to held instead of raising KeyboardInterrupt,
    in the main thread (the only one a KeyboardInterrupt reaches); returns
    the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:  # not the main interpreter
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _scratch_dir(prefix):
    """A new temporary directory for a job's output package, removed again
    if the job fails or is interrupted (kept when it succeeds: the model
    now lives there)."""
    out = tempfile.mkdtemp(prefix=prefix)
    try:
        yield out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


# Loss names (normalized as core/train does) by what they train.
_BINARY_LOSSES = {"bce_with_logits", "bcewithlogits", "binary_cross_entropy_with_logits", "binary_crossentropy",
                  "binary_cross_entropy"}
_CLASS_LOSSES = {"cross_entropy", "crossentropy", "ce", "categorical_crossentropy", "sparse_categorical_crossentropy",
                 "categorical_cross_entropy", "sparse_categorical_cross_entropy"}
# Keras metric names -> the Go core's validation metric names.
_METRICS = {"accuracy": "accuracy", "acc": "accuracy", "binary_accuracy": "accuracy",
            "categorical_accuracy": "accuracy", "sparse_categorical_accuracy": "accuracy",
            "precision": "precision", "recall": "recall", "f1": "f1", "f1_score": "f1",
            "mse": "mse", "mean_squared_error": "mse", "mae": "mae", "mean_absolute_error": "mae", "r2": "r2"}
_CLASS_METRICS = {"accuracy", "precision", "recall", "f1"}


def norm_loss(loss):
    """A loss name as core/train normalizes it (None stays None)."""
    if loss is None:
        return None
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a loss name such as 'binary_crossentropy', got {type(loss).__name__}")
    return loss.strip().lower().replace("-", "_").replace(" ", "_")


def metric_names(metrics):
    """The Go core's names for Keras-style metric names (ValueError for
    one Kiln does not compute); None for 'all'."""
    if metrics is None:
        return None
    if isinstance(metrics, str):
        metrics = [metrics]
    out = []
    for m in metrics:
        key = m.lower() if isinstance(m, str) else m
        if key not in _METRICS:
            raise ValueError(f"unknown metric {m!r}; Kiln computes {sorted(set(_METRICS))}")
        if _METRICS[key] not in out:
            out.append(_METRICS[key])
    return out


def class_targets(y, loss):
    """(labels, codes) when (y, loss) make a classifier, else (None, y):
    text, bool and integer labels (integers with no loss or a class or
    binary loss), 0/1 floats with a binary loss, and one-hot rows with
    categorical_crossentropy."""
    lossn = norm_loss(loss)
    if y.ndim == 2 and lossn == "categorical_crossentropy":
        if y.shape[1] < 2:
            raise ValueError(f"categorical_crossentropy takes one-hot targets [rows, classes], got shape {y.shape}")
        y = y.argmax(axis=1)
    if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise ValueError(f"y must be 1-D [rows] (or one-hot [rows, classes] with categorical_crossentropy), "
                         f"got shape {y.shape}")
    y = y.reshape(-1)
    binary = lossn in _BINARY_LOSSES
    classify = (y.dtype.kind in "OUSb"
                or (y.dtype.kind in "iu" and (lossn is None or lossn in _CLASS_LOSSES or binary))
                or (y.dtype.kind == "f" and binary and len(y) > 0 and bool(np.isin(y, (0.0, 1.0)).all())))
    if not classify:
        return None, y
    labels, codes = np.unique(y, return_inverse=True)
    if binary and len(labels) > 2:
        raise ValueError(f"loss {loss!r} trains a binary classifier but y has {len(labels)} classes "
                         f"({list(labels[:5])}...); use sparse_categorical_crossentropy with a softmax output")
    if y.dtype.kind == "f":
        labels = labels.astype(np.int64)  # 0/1 floats: classes [0, 1]
    return labels, codes


def _split_callbacks(callbacks, early_stopping):
    """(early_stopping dict, model_checkpoint dict, Python callbacks) from
    fit's callbacks: kiln.callbacks.EarlyStopping / ModelCheckpoint run in
    the Go core; Callback objects and plain functions in Python."""
    from .callbacks import Callback, EarlyStopping, ModelCheckpoint

    es, ck, py = early_stopping, None, []
    for cb in callbacks or ():
        if isinstance(cb, EarlyStopping):
            if es is not None:
                raise ValueError("fit: more than one early stopping (an EarlyStopping callback and early_stopping=)")
            es = cb._config()
        elif isinstance(cb, ModelCheckpoint):
            if ck is not None:
                raise ValueError("fit: Kiln takes one ModelCheckpoint")
            ck = cb._config()
        elif isinstance(cb, Callback) or callable(cb):
            py.append(cb)
        else:
            raise TypeError(f"fit: a callback is a kiln.callbacks.Callback or a function of the epoch event, "
                            f"got {type(cb).__name__}")
    return es, ck, py


@contextlib.contextmanager
def fit(spec, x, y, *, epochs, batch_size, validation_split, optimizer, lr, loss, seed, early_stopping,
        verbose, callbacks, workers=1, device=None, amp=None, metrics=None, sync_batchnorm=False,
        record=""):
    """Trains the network spec on (x, y) in the Go core, writing a model
    package (with the caller's class labels) to a new temporary directory.
    record: how to record the job as a registry run (JSON from
    _registry.record_spec; "" for not at all). Yields (directory,
    History, with run_id); the directory is removed again if the job
    or the with block fails."""
    from .callbacks import Callback, History

    if spec is None:
        raise KilnError("this model has no spec to train (load a package or use kiln.Model.from_spec)")
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [rows, features], got shape {x.shape}")
    y = np.asarray(y)
    if len(y) != len(x):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    labels, y = class_targets(y, loss)
    y = np.ascontiguousarray(y, dtype=np.float32)
    if not 0 <= validation_split < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    wanted = metric_names(metrics)
    if wanted is not None:
        wrong = [m for m in wanted if (m in _CLASS_METRICS) != (labels is not None)]
        if wrong:
            kind = "a classifier" if labels is not None else "a regressor"
            raise ValueError(f"metrics {wrong} do not apply to {kind} (these targets and loss train {kind})")
    es, ck, py_callbacks = _split_callbacks(callbacks, early_stopping)
    job = {
        "model": spec,
        "data": {"target": "target", "task": "classification" if labels is not None else "regression"},
        "split": {"val": validation_split, "test": 0, "stratify": labels is not None},
        "train": {"epochs": epochs, "batch_size": batch_size, "seed": seed,
                  "optimizer": {"type": optimizer, "lr": lr}},
    }
    if loss:
        job["train"]["loss"] = {"type": loss}
    if es:
        job["train"]["early_stopping"] = es
    if ck:
        job["train"]["model_checkpoint"] = ck
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if workers > 1:
        job["train"]["workers"] = workers
    if device:
        job["train"]["device"] = str(device)
    if amp:
        job["train"]["amp"] = str(amp)
    if not isinstance(sync_batchnorm, bool):
        raise ValueError(f"sync_batchnorm must be True or False, got {sync_batchnorm!r}")
    if sync_batchnorm:
        job["train"]["sync_batchnorm"] = True
    with _scratch_dir("kiln-model-") as out:
        history = History()
        history.params = {"epochs": epochs, "batch_size": batch_size, "verbose": verbose, "steps": None}

        def on_event(e, bar):
            if e["kind"] != "epoch":
                return
            logs = {"loss": e["loss"]}
            for k, v in (e.get("metrics") or {}).items():
                if wanted is None or k == "loss" or k in wanted:
                    logs["val_" + k] = v
            history.params["steps"] = e["steps"]
            history.on_epoch_end(e["epoch"] - 1, logs)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{e['loss']:.4f}", sps=f"{e['samples_per_sec']:.0f}")
            for cb in py_callbacks:
                if isinstance(cb, Callback):
                    cb.on_epoch_end(e["epoch"] - 1, dict(logs))
                else:
                    cb(e)

        history.report, h = _run_job(
            lambda: _b.StartTraining(json.dumps(job), x.ctypes.data, x.shape[0], x.shape[1], y.ctypes.data, out, record),
            _progress(epochs, verbose), on_event, start_context=InferenceError)
        for cb in py_callbacks:
            if isinstance(cb, Callback):
                cb.on_train_end(dict(history.report.get("val") or {}))
        history.run_id = h.RunID() or None
        if labels is not None:
            # Go saw class codes 0..k-1; the package records the caller's labels.
            _record_labels(out, labels)
            if ck:  # and so do the packages ModelCheckpoint wrote
                import os

                for e in range(1, len(history.epoch) + 1):
                    p = ck["path"].replace("{epoch}", str(e))
                    if os.path.isfile(os.path.join(p, "manifest.json")):
                        _record_labels(p, labels)
        yield out, history


def _outputs_probabilities(model):
    """Whether the model's output is probabilities (trained with
    binary_crossentropy on a sigmoid or a categorical loss on a softmax)
    rather than logits."""
    outs = (model.manifest or {}).get("outputs") or [{}]
    return str(outs[0].get("meaning", "")).startswith("probabilit")


def evaluate(model, x, y):
    pred = model.predict(np.asarray(x, dtype=np.float32))
    y = np.asarray(y)
    labels = model.classes_
    if labels is not None:
        names = list(labels)
        if y.ndim == 2 and y.shape[1] > 1:  # one-hot (categorical_crossentropy)
            y = np.asarray(names, dtype=object)[y.argmax(axis=1)]
        probs = _outputs_probabilities(model)
        if pred.ndim == 2 and pred.shape[1] > 1:
            idx = pred.argmax(axis=1)
            p = pred if probs else _softmax(pred)
        else:  # one output: binary
            z = pred.reshape(-1).astype(np.float64)
            idx = (z > (0.5 if probs else 0)).astype(int)
            p1 = z if probs else 1 / (1 + np.exp(-z))
            p = np.stack([1 - p1, p1], axis=1)
        try:
            truth = np.array([names.index(v.item() if hasattr(v, "item") else v) for v in y.reshape(-1)])
        except ValueError as e:
            raise ValueError(f"y holds a value that is not one of the model's classes {names}: {e}") from None
        # Cross-entropy of the predicted probabilities, clipped as Keras does.
        eps = 1e-7
        loss = float(-np.log(np.clip(p[np.arange(len(truth)), truth], eps, 1 - eps)).mean())
        return {"loss": loss, "accuracy": float((idx == truth).mean())}
    p = pred.reshape(-1).astype(np.float64)
    t = y.reshape(-1).astype(np.float64)
    ss = ((t - t.mean()) ** 2).sum()
    return {"mse": float(((p - t) ** 2).mean()), "mae": float(np.abs(p - t).mean()),
            "r2": float(1 - ((p - t) ** 2).sum() / ss) if ss else float("nan")}


def _softmax(z):
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _encode_like_fit(labels, x, y):
    """x and y as fit passed them to Go for a model with class labels
    (None for a regressor): float32 features, class codes."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    y = np.asarray(y)
    if labels is not None:
        index = {v: i for i, v in enumerate(labels)}
        try:
            y = np.array([index[v.item() if hasattr(v, "item") else v] for v in y])
        except KeyError as e:
            raise ValueError(f"y holds {e.args[0]!r}, which is not one of the model's classes {labels}") from None
    return x, np.ascontiguousarray(y, dtype=np.float32)


def _calibration_array(data):
    """Calibration rows as a C-contiguous float32 [rows, features] array:
    numpy (or array-like), pandas DataFrame or pyarrow Table/RecordBatch
    (columns stacked in order)."""
    if is_pandas(data):
        data = data.to_numpy(dtype=np.float32)
    elif is_arrow(data):
        cols = [c.to_numpy(zero_copy_only=False) if hasattr(c, "to_numpy") else np.asarray(c) for c in data.columns]
        data = np.column_stack(cols) if cols else np.zeros((data.num_rows, 0))
    try:
        a = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"calibration data must be numeric rows of features: {e}") from None
    if a.ndim != 2:
        raise ValueError(f"calibration data must be 2-D [rows, features], got shape {a.shape}")
    return np.ascontiguousarray(a)


@contextlib.contextmanager
def optimize(package, classes, x, y, options, calibration=None, record=""):
    """Prunes and/or quantizes the model package at package (whose class
    labels are classes, None for a regressor) as options say, measuring it
    on the splits of (x, y), the data it was fitted on; writes the result,
    with the class labels, to a new temporary directory. record: how to
    record the job as a registry run (see fit). Yields (directory, the
    optimization record as a History); the directory is removed again if
    the job or the with block fails."""
    if package is None:
        raise KilnError("only a model trained by fit (or loaded from a package) can be optimized")
    x, y = _encode_like_fit(classes, x, y)
    cal_addr, cal_rows, cal_cols = 0, -1, 0
    if calibration is not None:
        cal = _calibration_array(calibration)
        cal_addr, (cal_rows, cal_cols) = cal.ctypes.data, cal.shape
    with _scratch_dir("kiln-optimized-") as out:
        # Runs in a Go goroutine that this thread polls: the GIL stays free and
        # Ctrl-C cancels it.
        # Bad calibration data or sparsity are INVALID_ARGUMENT: an
        # InvalidArgumentError, which is a ValueError.
        report, h = _run_job(
            lambda: _b.StartOptimize(package, json.dumps(options), x.ctypes.data, x.shape[0], x.shape[1],
                                     y.ctypes.data, cal_addr, cal_rows, cal_cols, out, record),
            None, lambda e, bar: None)
        rec = History(report)
        rec.run_id = rec["run_id"] = h.RunID() or None
        if classes is not None:
            _record_labels(out, classes)
        yield out, rec


@contextlib.contextmanager
def select(specs, x, y, *, epochs, batch_size, validation_split, optimizer, lr, seed, budget_seconds,
           concurrency, metric, verbose, record=""):
    """Trains each network spec on the same split of (x, y) and ranks them
    (see core/train.Select), writing the winner's model package (with the
    caller's class labels) to a new temporary directory. record: how to
    record the job as a registry run (see fit). Yields (directory,
    leaderboard); the directory is removed again if the job or the with
    block fails."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    y = np.asarray(y)
    labels = None
    if y.dtype.kind in "OUSbiu":
        labels, codes = np.unique(y, return_inverse=True)
        y = codes
    y = np.ascontiguousarray(y, dtype=np.float32)
    job = {
        "data": {"target": "target", "task": "classification" if labels is not None else "regression"},
        "split": {"val": validation_split, "test": 0, "stratify": labels is not None},
        "train": {"epochs": epochs, "batch_size": batch_size, "seed": seed, "optimizer": {"type": optimizer, "lr": lr}},
        "candidates": specs,
    }
    if budget_seconds:
        job["budget"] = {"seconds": budget_seconds}
    if concurrency:
        job["concurrency"] = concurrency
    if metric:
        job["rank"] = {"metric": metric}
    with _scratch_dir("kiln-selected-") as out:
        report, h = _run_job(
            lambda: _b.StartSelection(json.dumps(job), x.ctypes.data, x.shape[0], x.shape[1], y.ctypes.data, out, record),
            _progress(len(specs), verbose), lambda e, bar: bar is not None and bar.update(1))
        board = History(report)
        board.run_id = board["run_id"] = h.RunID() or None
        if labels is not None:
            _record_labels(out, labels)
        yield out, board


def _record_labels(pkg_dir, labels):
    """Records the caller's class labels in the manifest of the package in
    pkg_dir (Go reads and rewrites it, core/modelpkg): as text in "labels"
    (what Go and the server read) and with their Python types (ints,
    strings, bools) in "python_labels" (what classes_ returns)."""
    typed = [l.item() if hasattr(l, "item") else l for l in labels]
    try:
        _b.RecordLabels(pkg_dir, json.dumps([str(l) for l in typed]), json.dumps(typed))
    except RuntimeError as e:
        raise translate(e, KilnError) from None
