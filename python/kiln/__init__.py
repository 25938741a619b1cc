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
from . import callbacks, layers
from ._keras import Sequential
from ._plot import plot_history, plot_optimization


from .client import Client, ServerError
from ._serve import Server, serve
from ._select import select_model
from ._pipeline import pipeline_run
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
    "callbacks",
    "plot_history",
    "plot_optimization",
    "Client",
    "Server",
    "serve",
    "select_model",
    "pipeline_run",
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
