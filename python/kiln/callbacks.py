"""Keras-style training callbacks and the History that ``Model.fit``
returns.

``EarlyStopping`` and ``ModelCheckpoint`` are carried out by the Go core
during training (they become the job's ``early_stopping`` and
``model_checkpoint``); a ``Callback`` subclass's ``on_epoch_end(epoch,
logs)`` is called in Python after each epoch, as is a plain function given
the epoch's progress event (a dict).
"""
from typing import Dict, List, Optional

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "History"]


def _metric_name(monitor: str, what: str) -> str:
    """A Keras monitor name ("val_loss", "val_accuracy", "loss") as the Go
    core names it: validation metrics without the "val_" prefix, the
    training loss as "train_loss" (ModelCheckpoint only)."""
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"{what}: monitor must be a metric name such as 'val_loss', got {monitor!r}")
    m = monitor.lower()
    if m.startswith("val_"):
        m = m[4:]
        return "accuracy" if m == "acc" else m
    if m == "loss":
        return "train_loss"
    raise ValueError(f"{what}: monitor {monitor!r}: Kiln monitors validation metrics ('val_loss', "
                     "'val_accuracy', 'val_f1', 'val_mse', ...) or 'loss'")


class Callback:
    """Base class of Python callbacks: override ``on_epoch_end(epoch,
    logs)`` (epoch 0-based, as Keras; logs maps 'loss' and 'val_*' names to
    floats) or ``on_train_end(logs)``. They run after the Go core has
    finished the epoch; they observe, they cannot stop training."""

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, float]] = None) -> None:
        pass

    def on_train_end(self, logs: Optional[Dict[str, float]] = None) -> None:
        pass


class EarlyStopping(Callback):
    """Stops training when ``monitor`` (a validation metric: 'val_loss',
    'val_accuracy', ...) has not improved by more than ``min_delta`` for
    ``patience`` epochs; with ``restore_best_weights`` the model keeps the
    best epoch's weights, else the last epoch's (Keras's default). Needs a
    validation split. Runs in the Go core."""

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0,
                 restore_best_weights: bool = False):
        name = _metric_name(monitor, "EarlyStopping")
        if name == "train_loss":
            raise ValueError("EarlyStopping: Kiln stops on a validation metric ('val_loss', 'val_accuracy', ...), "
                             "not the training loss")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an integer >= 0, got {patience!r}")
        self.monitor, self.min_delta, self.patience = monitor, float(min_delta), patience
        self.restore_best_weights = bool(restore_best_weights)
        self._metric = name

    def _config(self) -> dict:
        # Keras's patience=0 stops after the first epoch without improvement.
        return {"patience": max(self.patience, 1), "metric": self._metric, "min_delta": abs(self.min_delta),
                "restore_best_weights": self.restore_best_weights}


class ModelCheckpoint(Callback):
    """Saves the model as a Kiln package directory (``kiln.load`` reads it)
    at ``filepath`` after each epoch, or with ``save_best_only`` only when
    ``monitor`` improved; "{epoch}" in filepath becomes the epoch number
    (1-based, as Keras). Runs in the Go core."""

    def __init__(self, filepath, monitor: str = "val_loss", save_best_only: bool = False):
        import os

        self.filepath = os.fspath(filepath)
        if not self.filepath:
            raise ValueError("ModelCheckpoint: filepath is empty")
        self.monitor, self.save_best_only = monitor, bool(save_best_only)
        self._metric = _metric_name(monitor, "ModelCheckpoint")

    def _config(self) -> dict:
        return {"path": self.filepath, "monitor": self._metric, "save_best_only": self.save_best_only}


class History(Callback):
    """What ``fit`` returns, as Keras's: ``history`` maps 'loss' (training
    loss per epoch) and 'val_<metric>' (validation metrics per epoch) to
    lists of floats; ``epoch`` lists the epochs run (0-based); ``params``
    holds epochs, steps (per epoch), batch_size and verbose; ``report`` is
    the Go core's training report (best epoch, stop reason, samples/s,
    final validation metrics). Indexing it (``history["loss"]``) reads
    ``history``."""

    def __init__(self):
        self.history: Dict[str, List[float]] = {}
        self.epoch: List[int] = []
        self.params: dict = {}
        self.report: dict = {}
        self.model = None

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, float]] = None) -> None:
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)

    #: The registry run that recorded fit (None when not recorded).
    run_id = None
    #: The ModelVersion fit(register="NAME") made (None otherwise).
    registered = None

    def __getitem__(self, key):
        if key in ("report", "run_id", "registered"):
            return getattr(self, key)
        return self.history[key]

    def __setitem__(self, key, value):
        if key in ("report", "run_id", "registered"):
            setattr(self, key, value)
        else:
            self.history[key] = value

    def __contains__(self, key) -> bool:
        return key in ("report", "run_id", "registered") or key in self.history

    def keys(self):
        return self.history.keys()

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"
