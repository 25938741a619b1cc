"""Layer constructors for kiln.Sequential: each returns the spec dict that
core/nn reads, e.g. Linear(32) == {"type": "linear", "out": 32}; Keras's
Dense(units, activation=..., input_shape=...) returns a linear layer and
its activation."""


def _layer(kind, **kw):
    return {"type": kind, **{k: v for k, v in kw.items() if v is not None}}


def Linear(out=None):
    """A fully connected layer; out=None on the last one means 'as many as
    classes' (or 1 for regression)."""
    return _layer("linear", out=out)


def ReLU():
    return _layer("relu")


def GELU():
    return _layer("gelu")


def Tanh():
    return _layer("tanh")


def Sigmoid():
    return _layer("sigmoid")


def Dropout(p=0.5):
    return _layer("dropout", p=p)


def BatchNorm1d():
    return _layer("batchnorm1d")


def LayerNorm():
    return _layer("layernorm")


def Softmax():
    return _layer("softmax")


def Flatten():
    return _layer("flatten")


# Keras activation names -> core/nn layer types ("linear"/None: none).
_ACTIVATIONS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax", "gelu": "gelu",
                "linear": None, None: None}


class _Block(list):
    """Layer specs that one Keras layer expands to, with the input_shape it
    declares (kiln.Sequential reads it)."""

    input_shape = None


def Dense(units, activation=None, input_shape=None, use_bias=True, name=None):
    """Keras's Dense: a Linear layer of ``units`` outputs followed by its
    activation ('relu', 'sigmoid', 'tanh', 'softmax', 'gelu', 'linear' or
    None). input_shape, on the first layer, is one sample's shape without
    the batch dimension, e.g. (30,) for 30 features."""
    if not isinstance(units, int) or units <= 0:
        raise ValueError(f"Dense: units must be a positive integer, got {units!r}")
    key = activation.lower() if isinstance(activation, str) else activation
    if key not in _ACTIVATIONS:
        raise ValueError(f"Dense: unknown activation {activation!r} (Kiln has {sorted(k for k in _ACTIVATIONS if k)})")
    lin = _layer("linear", out=units, name=name)
    if not use_bias:
        lin["bias"] = False
    block = _Block([lin])
    if _ACTIVATIONS[key]:
        block.append(_layer(_ACTIVATIONS[key]))
    if input_shape is not None:
        block.input_shape = tuple(int(d) for d in (input_shape if isinstance(input_shape, (tuple, list)) else (input_shape,)))
    return block


def Activation(activation):
    """Keras's Activation layer: one of Dense's activation names."""
    key = activation.lower() if isinstance(activation, str) else activation
    if not _ACTIVATIONS.get(key):
        raise ValueError(f"Activation: unknown activation {activation!r}")
    return _layer(_ACTIVATIONS[key])
