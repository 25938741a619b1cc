"""Process-wide settings of the Go core and libtorch."""
from ._errors import KilnError, translate
from ._native import bindings as _b

__version__: str = _b.Version()

# The one place the process is configured on import (threads from
# $KILN_NUM_THREADS, else the CPUs): Go's bindings.Init.
try:
    _b.Init()
except RuntimeError as _e:
    raise translate(_e, KilnError) from None


def torch_version() -> str:
    """The version of the libtorch Kiln runs on."""
    return _b.TorchVersion()


def set_num_threads(n: int) -> None:
    """Sets libtorch's intra-op thread count (like torch.set_num_threads)."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"thread count must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    try:
        _b.SetNumThreads(n)
    except RuntimeError as e:
        raise translate(e, KilnError) from None


def get_num_threads() -> int:
    """libtorch's intra-op thread count."""
    return _b.NumThreads()
