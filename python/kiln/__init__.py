"""Kiln: a model-as-a-service engine with a Go core over libtorch.

>>> import kiln
>>> model = kiln.load("model.pt")          # a TorchScript file
>>> probs = model.predict(features)        # numpy in, numpy out, no copies
"""
from ._errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InferenceError,
    InternalError,
    InvalidArgumentError,
    InvalidModelError,
    KilnError,
    ModelLoadError,
    ModelNotFoundError,
    NotFoundError,
    OutOfMemoryError,
    ResourceExhaustedError,
    UnavailableError,
    UnsupportedError,
)
from ._model import Model, load
from . import layers


def Sequential(layers_):
    """An untrained network from a list of layer specs (see kiln.layers)."""
    return Model.from_spec({"layers": list(layers_)})


from .client import Client, ServerError
from ._serve import Server, serve
from ._select import select_model
from ._registry import AliasConflictError, AliasEvent, Metric, ModelVersion, RegisteredModel, Registry, Run
from ._runtime import get_num_threads, set_num_threads, torch_version, __version__

__all__ = [
    "KilnError",
    "ModelLoadError",
    "InferenceError",
    "InvalidArgumentError",
    "InvalidModelError",
    "NotFoundError",
    "ModelNotFoundError",
    "OutOfMemoryError",
    "CancelledError",
    "UnsupportedError",
    "UnavailableError",
    "InternalError",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "DeadlineExceededError",
    "Model",
    "Sequential",
    "layers",
    "Client",
    "Server",
    "serve",
    "select_model",
    "Registry",
    "ModelVersion",
    "RegisteredModel",
    "Run",
    "Metric",
    "AliasEvent",
    "AliasConflictError",
    "ServerError",
    "load",
    "get_num_threads",
    "set_num_threads",
    "torch_version",
    "__version__",
]
