"""kiln.Sequential: a Keras-shaped network over Kiln's network spec.

The founding document's Keras model runs with only its imports changed::

    from kiln import Sequential          # from keras.models import Sequential
    from kiln.layers import Dense        # from keras.layers import Dense

    model = Sequential([Dense(10, activation="relu", input_shape=(30,)),
                        Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=10, batch_size=32, validation_split=0.2)
    loss, accuracy = model.evaluate(x_test, y_test)
    probabilities = model.predict(x_test)    # [rows, 1], float32

Training runs in the Go core (core/train), with the loss fused with the
output activation (sigmoid + binary_crossentropy trains as
BCE-with-logits on the sigmoid's input).
"""
import numpy as np

from . import _train
from ._model import Model


def _flatten(layers):
    """Layer specs, with Dense(..., activation=...) blocks spread out, and
    the input_shape the first one declares (or None)."""
    out, shape = [], None
    for l in layers:
        block = l if isinstance(l, list) else [l]
        if shape is None and not out:
            shape = getattr(l, "input_shape", None)
        elif getattr(l, "input_shape", None) is not None:
            raise ValueError("only the first layer takes input_shape")
        for d in block:
            if not isinstance(d, dict) or "type" not in d:
                raise TypeError(f"a layer is a kiln.layers constructor's result (a spec dict), got {d!r}")
            out.append(dict(d))
    return out, shape


class Sequential(Model):
    """A network from a list of layers (kiln.layers: Dense, Linear, ReLU,
    ...), trained by ``fit`` in the Go core; ``add``, ``compile``,
    ``summary``, ``evaluate`` and ``predict`` as in Keras.

    >>> model = kiln.Sequential([Dense(10, activation="relu"), Dense(1, activation="sigmoid")])
    """

    def __init__(self, layers=None, name=None):
        flat, shape = _flatten(layers or [])
        spec = {"layers": flat}
        if shape is not None:
            spec["input_shape"] = [int(d) for d in shape]
        if name:
            spec["name"] = name
        super().__init__(spec=spec)
        self._compiled = None

    def add(self, layer) -> None:
        """Appends a layer (before training)."""
        if self._h is not None:
            raise ValueError("add: the model is trained already; build a new Sequential")
        flat, shape = _flatten([layer])
        if shape is not None:
            if self.spec["layers"]:
                raise ValueError("only the first layer takes input_shape")
            self.spec["input_shape"] = [int(d) for d in shape]
        self.spec["layers"].extend(flat)

    def compile(self, optimizer="adam", loss=None, metrics=None, learning_rate=None) -> None:
        """Sets what ``fit`` and ``evaluate`` use: optimizer (adam, sgd,
        adamw, rmsprop), loss (binary_crossentropy,
        sparse_categorical_crossentropy, categorical_crossentropy, mse,
        ...; see Model.fit), metrics (e.g. ["accuracy"]) and the learning
        rate (default 1e-3, Keras's Adam default)."""
        if not isinstance(optimizer, str):
            raise TypeError("compile: optimizer is a name in Kiln ('adam', 'sgd', 'adamw', 'rmsprop'); "
                            "set the rate with learning_rate=")
        names = _train.metric_names(metrics) or []
        self._compiled = {"optimizer": optimizer, "loss": loss, "metrics": list(metrics or []), "names": names,
                          "lr": 1e-3 if learning_rate is None else float(learning_rate)}

    def fit(self, x, y, epochs: int = 10, batch_size: int = 32, validation_split: float = 0.2,
            optimizer=None, lr=None, loss=None, metrics=None, **kw):
        """Model.fit, taking optimizer, loss, learning rate and metrics
        from ``compile`` unless given here."""
        c = self._compiled or {}
        return super().fit(x, y, epochs=epochs, batch_size=batch_size, validation_split=validation_split,
                           optimizer=optimizer or c.get("optimizer", "adam"),
                           lr=lr if lr is not None else c.get("lr", 1e-3),
                           loss=loss if loss is not None else c.get("loss"),
                           metrics=metrics if metrics is not None else (c.get("metrics") or None), **kw)

    def evaluate(self, x, y, return_dict: bool = False, verbose=None, batch_size=None):
        """After ``compile``, as Keras: the loss, or [loss, metric, ...] in
        compile's metrics order (a dict with return_dict). Without
        compile, Model.evaluate's dict. Classifiers report the
        cross-entropy of the predicted probabilities (clipped to
        [1e-7, 1-1e-7], as Keras) and accuracy; regressors mse, mae, r2
        (the loss being mse, or mae for l1/mae)."""
        m = _train.evaluate(self, x, y)
        if self._compiled is None:
            return m
        if "loss" not in m:
            lossn = _train.norm_loss(self._compiled.get("loss")) or "mse"
            m = {"loss": m["mae"] if lossn in ("l1", "mae", "mean_absolute_error") else m["mse"], **m}
        out = {"loss": m["loss"]}
        for name, key in zip(self._compiled["metrics"], self._compiled["names"]):
            if key not in m:
                raise ValueError(f"evaluate computes {sorted(m)} for this model, not {name!r}")
            out[name] = m[key]
        if return_dict:
            return out
        vals = list(out.values())
        return vals[0] if len(vals) == 1 else vals

    def predict(self, *inputs, verbose=None, batch_size=None):
        """Model.predict; float64 numpy features (as scikit-learn gives
        them) are cast to the model's float32."""
        if len(inputs) == 1 and isinstance(inputs[0], np.ndarray) and inputs[0].dtype == np.float64:
            inputs = (inputs[0].astype(np.float32),)
        return super().predict(*inputs)

    __call__ = predict
