"""Training kiln.Model networks in the Go core, with progress in Python."""
import contextlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from ._errors import InferenceError, KilnError, translate
from ._native import bindings as _b


def _progress(total, verbose):
    if not verbose:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is optional
        return None
    return tqdm(total=total, unit="epoch", desc="kiln fit")


def _run_job(h, bar, on_event, error_class=lambda e: KilnError):
    """Polls a Go job (the GIL is free between polls) until it is done,
    passing each progress event to on_event(event, bar); Ctrl-C cancels the
    job. Returns the job's report, or raises its error (as the Kiln
    exception class that error_class picks for it)."""
    try:
        while True:
            st = json.loads(h.Poll(200))
            for e in st["events"]:
                on_event(e, bar)
            if st["done"]:
                break
    except KeyboardInterrupt:
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
        return json.loads(h.Report())
    except RuntimeError as e:
        raise translate(e, error_class(e)) from None


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


def fit(model, x, y, *, epochs, batch_size, validation_split, optimizer, lr, loss, seed, early_stopping,
        verbose, callbacks):
    from ._model import load

    if model.spec is None:
        raise KilnError("this model has no spec to train (load a package or use kiln.Model.from_spec)")
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [rows, features], got shape {x.shape}")
    y = np.asarray(y)
    if len(y) != len(x):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    labels = None
    if y.dtype.kind in "OUSb" or (y.dtype.kind in "iu" and loss in (None, "cross_entropy")):
        labels, codes = np.unique(y, return_inverse=True)
        y = codes
    y = np.ascontiguousarray(y, dtype=np.float32)
    if not 0 <= validation_split < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    job = {
        "model": model.spec,
        "data": {"target": "target", "task": "classification" if labels is not None else "regression"},
        "split": {"val": validation_split, "test": 0, "stratify": labels is not None},
        "train": {"epochs": epochs, "batch_size": batch_size, "seed": seed,
                  "optimizer": {"type": optimizer, "lr": lr}},
    }
    if loss:
        job["train"]["loss"] = {"type": loss}
    if early_stopping:
        job["train"]["early_stopping"] = early_stopping
    with _scratch_dir("kiln-model-") as out:
        try:
            h = _b.StartTraining(json.dumps(job), x.ctypes.data, x.shape[0], x.shape[1], y.ctypes.data, out)
        except RuntimeError as e:
            raise translate(e, InferenceError) from None
        history = {"loss": []}

        def on_event(e, bar):
            if e["kind"] != "epoch":
                return
            history["loss"].append(e["loss"])
            for k, v in (e.get("metrics") or {}).items():
                history.setdefault("val_" + k, []).append(v)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{e['loss']:.4f}", sps=f"{e['samples_per_sec']:.0f}")
            for cb in callbacks:
                cb(e)

        report = _run_job(h, _progress(epochs, verbose), on_event)
        trained = load(report.get("dir") or out)
        model._h, model.path, model.manifest, model._package = trained._h, out, trained.manifest, out
        model._fast.clear()
        model._inputs = trained._inputs
        trained._h = None
        if labels is not None:
            # Go saw class codes 0..k-1; the package records the caller's labels.
            _record_labels(model.manifest, out, labels)
    history["report"] = report
    return history


def evaluate(model, x, y):
    pred = model.predict(np.asarray(x, dtype=np.float32))
    y = np.asarray(y)
    labels = model.classes_
    if labels is not None:
        names = list(labels)
        if pred.ndim == 2 and pred.shape[1] > 1:
            idx = pred.argmax(axis=1)
        else:  # one logit: binary
            idx = (pred.reshape(-1) > 0).astype(int)
        truth = np.array([names.index(v.item() if hasattr(v, "item") else v) for v in y])
        return {"accuracy": float((idx == truth).mean())}
    p = pred.reshape(-1).astype(np.float64)
    t = y.reshape(-1).astype(np.float64)
    ss = ((t - t.mean()) ** 2).sum()
    return {"mse": float(((p - t) ** 2).mean()), "mae": float(np.abs(p - t).mean()),
            "r2": float(1 - ((p - t) ** 2).sum() / ss) if ss else float("nan")}


def _encode_like_fit(model, x, y):
    """x and y as fit passed them to Go: float32 features, class codes."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    y = np.asarray(y)
    labels = model.classes_
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
    from ._model import _is_arrow, _is_pandas

    if _is_pandas(data):
        data = data.to_numpy(dtype=np.float32)
    elif _is_arrow(data):
        cols = [c.to_numpy(zero_copy_only=False) if hasattr(c, "to_numpy") else np.asarray(c) for c in data.columns]
        data = np.column_stack(cols) if cols else np.zeros((data.num_rows, 0))
    try:
        a = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"calibration data must be numeric rows of features: {e}") from None
    if a.ndim != 2:
        raise ValueError(f"calibration data must be 2-D [rows, features], got shape {a.shape}")
    return np.ascontiguousarray(a)


def optimize(model, x, y, options, calibration=None):
    from ._model import load

    if model._package is None:
        raise KilnError("only a model trained by fit (or loaded from a package) can be optimized")
    x, y = _encode_like_fit(model, x, y)
    cal_addr, cal_rows, cal_cols = 0, -1, 0
    if calibration is not None:
        cal = _calibration_array(calibration)
        cal_addr, (cal_rows, cal_cols) = cal.ctypes.data, cal.shape
    with _scratch_dir("kiln-optimized-") as out:

        def error_class(e):
            bad_input = "outside" in str(e) or "calibration" in str(e)
            return ValueError if bad_input else KilnError

        # Runs in a Go goroutine that this thread polls: the GIL stays free and
        # Ctrl-C cancels it.
        try:
            h = _b.StartOptimize(model._package, json.dumps(options), x.ctypes.data, x.shape[0], x.shape[1],
                                 y.ctypes.data, cal_addr, cal_rows, cal_cols, out)
        except RuntimeError as e:
            raise translate(e, error_class(e)) from None
        record = _run_job(h, None, lambda e, bar: None, error_class)
        labels = model.classes_
        new = load(out)
        if labels is not None:
            _record_labels(new.manifest, out, labels)
    old = model._h
    model._h, model.path, model.manifest, model._package = new._h, out, new.manifest, out
    model._fast.clear()
    model._inputs = new._inputs
    new._h = None
    if old is not None:
        old.Close()
    return record


def select_model(candidates, x, y, *, epochs=20, batch_size=32, validation_split=0.2, optimizer="adam",
                 lr=1e-3, seed=0, budget_seconds=None, concurrency=None, metric=None, verbose=1):
    """Trains each candidate (a list of layer lists or specs) on the same
    split, ranks them on the validation metric with a cost term, and returns
    (leaderboard, best_model)."""
    from ._model import Model, load

    specs = []
    for c in candidates:
        if isinstance(c, Model):
            c = c.spec
        elif isinstance(c, (list, tuple)):
            c = {"layers": list(c)}
        if not isinstance(c, dict) or "layers" not in c:
            raise ValueError(f"a candidate is a list of layers or a spec with 'layers', got {c!r}")
        specs.append(c)
    if not specs:
        raise ValueError("select_model needs at least one candidate")
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
        try:
            h = _b.StartSelection(json.dumps(job), x.ctypes.data, x.shape[0], x.shape[1], y.ctypes.data, out)
        except RuntimeError as e:
            raise translate(e, KilnError) from None
        board = _run_job(h, _progress(len(specs), verbose), lambda e, bar: bar is not None and bar.update(1))
        best = load(out)
        best._package = out
        if labels is not None:
            _record_labels(best.manifest, out, labels)
    return board, best


def _record_labels(manifest, pkg_dir, labels):
    """Records the caller's class labels in the manifest of the package in
    pkg_dir (Go rewrites it): as text in "labels" (what Go and the server
    read) and with their Python types (ints, strings, bools) in
    "python_labels" (what classes_ returns); manifest, the package's
    manifest dict, is updated to match."""
    typed = [l.item() if hasattr(l, "item") else l for l in labels]
    try:
        new = _b.RecordLabels(pkg_dir, json.dumps([str(l) for l in typed]), json.dumps(typed))
    except RuntimeError as e:
        raise translate(e, KilnError) from None
    manifest.clear()
    manifest.update(json.loads(new))
