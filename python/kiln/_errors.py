"""Kiln's exceptions. Go errors reach Python as RuntimeError from gopy;
Kiln maps them onto these classes, which keep the Go message."""


class KilnError(RuntimeError):
    """Base class of every error Kiln raises from its Go core."""


class ModelLoadError(KilnError, OSError):
    """A model file is missing, unreadable or not a TorchScript archive."""


class InferenceError(KilnError, ValueError):
    """The model rejected its inputs (wrong shape, dtype, count, ...)."""


def translate(exc: BaseException, cls=KilnError) -> KilnError:
    """Wraps a gopy RuntimeError into a Kiln exception with the Go message."""
    return cls(str(exc))
