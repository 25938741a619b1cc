"""Fine-tuning a TorchScript model of any architecture in the Go core
(core/train's init jobs): kiln.load("model.pt").fit(x, y, freeze=...,
param_groups=...)."""
import contextlib
import json
import os

import numpy as np

from ._errors import InferenceError
from ._native import bindings as _b
from . import _train


def _groups(param_groups):
    out = []
    for i, g in enumerate(param_groups or ()):
        if not isinstance(g, dict) or not isinstance(g.get("prefix"), str) or "lr" not in g:
            raise ValueError(f"param_groups[{i}] must be a dict with 'prefix' (str) and 'lr', got {g!r}")
        out.append({"prefix": g["prefix"], "lr": float(g["lr"])})
    return out


@contextlib.contextmanager
def fit(path, x, y, *, epochs, batch_size, validation_split, optimizer, lr, loss, seed, early_stopping,
        verbose, callbacks, freeze=None, param_groups=None, freeze_bn=False):
    """Fine-tunes the TorchScript model at path (a file or a package
    directory) on (x, y) in the Go core, writing a package to a new
    temporary directory; yields (directory, history).

    x: float32 samples [rows, *input_shape] (e.g. [n, 3, 32, 32]); forward
    receives batches of that shape as they are (no scaling). y: class
    labels (any type; integer or string labels make a classifier trained
    with cross_entropy) or float regression targets [rows]."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be [rows, ...sample shape], got shape {x.shape}")
    input_shape = [int(d) for d in x.shape[1:]]
    x = np.ascontiguousarray(x.reshape(len(x), -1))
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y must be 1-D with one target per row of x ({len(x)}), got shape {y.shape}")
    labels = None
    if y.dtype.kind in "OUSb" or (y.dtype.kind in "iu" and loss in (None, "cross_entropy")):
        labels, y = np.unique(y, return_inverse=True)
    y = np.ascontiguousarray(y, dtype=np.float32)
    if not 0 <= validation_split < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if isinstance(freeze, str):
        freeze = [freeze]
    train = {"epochs": epochs, "batch_size": batch_size, "seed": seed,
             "optimizer": {"type": optimizer, "lr": lr},
             "freeze": list(freeze or ()), "param_groups": _groups(param_groups), "freeze_bn": bool(freeze_bn)}
    if loss:
        train["loss"] = {"type": loss}
    if early_stopping:
        train["early_stopping"] = early_stopping
    job = {
        "init": {"path": os.path.abspath(os.fspath(path)), "input_shape": input_shape},
        "data": {"target": "target", "task": "classification" if labels is not None else "regression",
                 "scale": "none"},
        "split": {"val": validation_split, "test": 0, "stratify": labels is not None},
        "train": train,
    }
    with _train._scratch_dir("kiln-finetuned-") as out:
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

        history["report"], _ = _train._run_job(
            lambda: _b.StartTraining(json.dumps(job), x.ctypes.data, x.shape[0], x.shape[1], y.ctypes.data, out, ""),
            _train._progress(epochs, verbose), on_event, start_context=InferenceError)
        if labels is not None:
            _train._record_labels(out, labels)
        yield out, history
