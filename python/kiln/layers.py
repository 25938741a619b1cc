"""Layer constructors for kiln.Sequential: each returns the spec dict that
core/nn reads, e.g. Linear(32) == {"type": "linear", "out": 32}."""


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
