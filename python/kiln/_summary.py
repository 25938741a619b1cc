"""Model.summary: layers, output shapes and parameter counts, as Keras
prints them, from the Go core's shape inference (core/nn)."""
import json
import math

from ._errors import KilnError, translate
from ._native import bindings as _b

_TYPES = {"linear": "Linear", "conv1d": "Conv1d", "conv2d": "Conv2d", "maxpool1d": "MaxPool1d",
          "maxpool2d": "MaxPool2d", "avgpool1d": "AvgPool1d", "avgpool2d": "AvgPool2d",
          "batchnorm1d": "BatchNorm1d", "batchnorm2d": "BatchNorm2d", "layernorm": "LayerNorm",
          "dropout": "Dropout", "flatten": "Flatten", "embedding": "Embedding", "relu": "ReLU", "gelu": "GELU",
          "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax"}


def features_of(model):
    """How many values one sample has when it reaches the first layer:
    after preprocessing for a trained model (one per numeric column, one
    per category), else the spec's input_shape; None when unknown."""
    pre = (model.manifest or {}).get("preprocessing")
    if pre and pre.get("features"):
        return sum(len(f.get("categories") or []) if f.get("categorical") else 1 for f in pre["features"])
    shape = (model.spec or {}).get("input_shape")
    if shape:
        return math.prod(shape)
    return None


def layer_table(model):
    """[(name, type, output shape, params)] of the model's layers."""
    if not model.spec:
        raise KilnError("this model has no network spec to summarize (a TorchScript file loaded as is)")
    n = features_of(model)
    if n is None:
        raise ValueError("This model has not yet been built: fit it, or give the first layer an input_shape "
                         "(e.g. Dense(10, activation='relu', input_shape=(30,)))")
    try:
        infos = json.loads(_b.SpecSummary(json.dumps(model.spec), int(n)))
    except RuntimeError as e:
        raise translate(e, KilnError) from None
    return [(i["name"], _TYPES.get(i["type"], i["type"]), (None, *i["out"]), i["params"]) for i in infos]


def summary(model, line_length=65):
    """The summary text (Keras's layout)."""
    rows = layer_table(model)
    cols = (29, 26, line_length - 55)
    name = model.spec.get("name") or "sequential"
    lines = [f'Model: "{name}"', "_" * line_length,
             f"{'Layer (type)':<{cols[0]}}{'Output Shape':<{cols[1]}}{'Param #':>{cols[2]}}", "=" * line_length]
    total = 0
    for i, (lname, ltype, shape, params) in enumerate(rows):
        shape_s = "(" + ", ".join(str(d) for d in shape) + ")"
        lines.append(f"{(lname + ' (' + ltype + ')'):<{cols[0]}}{shape_s:<{cols[1]}}{params:>{cols[2]},}")
        lines.append("_" * line_length if i < len(rows) - 1 else "=" * line_length)
        total += params
    lines += [f"Total params: {total:,}", f"Trainable params: {total:,}", "Non-trainable params: 0",
              "_" * line_length]
    return "\n".join(lines)
