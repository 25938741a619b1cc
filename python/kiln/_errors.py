"""Kiln's exceptions, one class per error code.

Every error of Kiln's Go core carries a code (kiln.h's kiln_error_code_t:
INVALID_ARGUMENT, NOT_FOUND, OUT_OF_MEMORY, ...). gopy turns a Go error into
``RuntimeError(str(err))``, so the bindings write the code as a tag at the
start of the message, ``"[KILN_INVALID_ARGUMENT] message"``; ``translate``
reads that tag (at position 0 only, never searching the text) to pick the
class, and the exception's message is the rest. ``code`` holds the code's
name.

Every class is a ``KilnError`` (a ``RuntimeError``) and also the built-in
exception Python code expects for its kind: ``InvalidArgumentError`` is a
``ValueError``, ``NotFoundError`` a ``LookupError``, ``OutOfMemoryError`` a
``MemoryError``, ``UnsupportedError`` a ``NotImplementedError``,
``DeadlineExceededError`` a ``TimeoutError``. ``ModelLoadError`` (an
``OSError``) and ``InferenceError`` (an ``InvalidArgumentError``) are what
loading a model and running it raise for the caller's mistakes.
"""
import re
from typing import Optional, Type


class KilnError(RuntimeError):
    """Base class of every error Kiln raises from its Go core. ``code`` is
    the Go error's code ("UNKNOWN" when it has none)."""

    code = "UNKNOWN"


class InternalError(KilnError):
    """A bug or broken invariant in Kiln or libtorch (INTERNAL); a Go panic
    recovered by the bindings is one."""

    code = "INTERNAL"


class InvalidArgumentError(KilnError, ValueError):
    """The caller's arguments or data are wrong (INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"


class NotFoundError(KilnError, LookupError):
    """A file, model, version or name does not exist (NOT_FOUND)."""

    code = "NOT_FOUND"


class UnavailableError(KilnError):
    """Not ready now, such as a model still loading (UNAVAILABLE)."""

    code = "UNAVAILABLE"


class UnsupportedError(KilnError, NotImplementedError):
    """Not implemented by Kiln or by the linked libtorch (UNSUPPORTED)."""

    code = "UNSUPPORTED"


class AlreadyExistsError(KilnError):
    """What was to be created exists already (ALREADY_EXISTS)."""

    code = "ALREADY_EXISTS"


class CancelledError(KilnError):
    """The operation was cancelled (CANCELLED)."""

    code = "CANCELLED"


class OutOfMemoryError(KilnError, MemoryError):
    """An allocation failed in libtorch or Kiln (OUT_OF_MEMORY)."""

    code = "OUT_OF_MEMORY"


class FailedPreconditionError(KilnError):
    """The object is not in the state the call needs, such as a closed
    tensor (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(KilnError):
    """A queue or quota is full (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(KilnError, TimeoutError):
    """The deadline passed (DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"


class ModelLoadError(KilnError, OSError):
    """A model file is missing, unreadable or not a TorchScript archive."""


class ModelNotFoundError(ModelLoadError, NotFoundError, FileNotFoundError):
    """The model file or package does not exist (NOT_FOUND while loading)."""

    code = "NOT_FOUND"


class InvalidModelError(ModelLoadError, InvalidArgumentError):
    """The file is not a model Kiln can load (INVALID_ARGUMENT while
    loading)."""

    code = "INVALID_ARGUMENT"


class InferenceError(InvalidArgumentError):
    """The model rejected its inputs (wrong shape, dtype, count, ...)."""

    code = "INVALID_ARGUMENT"


_BY_CODE = {
    c.code: c
    for c in (InternalError, InvalidArgumentError, NotFoundError, UnavailableError, UnsupportedError,
              AlreadyExistsError, CancelledError, OutOfMemoryError, FailedPreconditionError,
              ResourceExhaustedError, DeadlineExceededError)
}

# Classes for a code in the context of one operation: loading a model
# (ModelLoadError) or running one (InferenceError).
_IN_CONTEXT = {
    (ModelLoadError, "NOT_FOUND"): ModelNotFoundError,
    (ModelLoadError, "INVALID_ARGUMENT"): InvalidModelError,
    (InferenceError, "INVALID_ARGUMENT"): InferenceError,
}

# The tag the Go bindings put first: "[KILN_<CODE>] " (bindings.guard).
_TAG = re.compile(r"\[KILN_([A-Z_]+)\] ")


def split_code(message: str):
    """Splits a bindings error message into (code, message). The code is
    the tag at position 0 ("[KILN_NOT_FOUND] ..."); a message without one
    has code None and is returned whole."""
    m = _TAG.match(message)
    if m is None:
        return None, message
    return m.group(1), message[m.end():]


_COMBINED = {}


def error_class(code: Optional[str], context: Type[KilnError] = KilnError) -> Type[KilnError]:
    """The exception class for a code raised while doing what context names
    (KilnError: nothing in particular; ModelLoadError: loading a model;
    InferenceError: running one). In a context, the class is both the
    context's class and the code's (ModelNotFoundError for NOT_FOUND while
    loading, a class deriving from InferenceError and OutOfMemoryError for
    OUT_OF_MEMORY while running), so ``except ModelLoadError`` catches every
    failure to load and ``except MemoryError`` every allocation failure. An
    error without a code (or UNKNOWN) gets the context class."""
    cls = _BY_CODE.get(code) if code is not None else None
    if cls is None:
        return context
    if issubclass(context, cls):
        return context
    if context is KilnError:
        return cls
    special = _IN_CONTEXT.get((context, code))
    if special is not None:
        return special
    key = (context, cls)
    if key not in _COMBINED:
        name = context.__name__[: -len("Error")] + cls.__name__
        _COMBINED[key] = type(name, (context, cls), {
            "__module__": __name__,
            "__doc__": f"{context.__name__} with code {cls.code}.",
            "code": cls.code,
        })
    return _COMBINED[key]


def translate(exc: BaseException, cls: Type[KilnError] = KilnError) -> KilnError:
    """The Kiln exception for a gopy RuntimeError: its class chosen by the
    error's code (error_class, with cls as the context), its message the Go
    message without the code tag."""
    code, msg = split_code(str(exc))
    err = error_class(code, cls)(msg)
    err.code = code or "UNKNOWN"
    return err
