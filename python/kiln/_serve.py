"""kiln.serve: Kiln's inference server inside this process."""
import json
import os
from typing import Optional

from ._errors import KilnError, translate
from ._native import bindings as _b


class Server:
    """A running server; ``grpc``, ``http``, ``metrics`` and ``flight`` are
    the "host:port" addresses it listens on ("" when off)."""

    def __init__(self, handle):
        self._h = handle
        addrs = json.loads(handle.AddressesJSON())
        self.grpc, self.http = addrs["grpc"], addrs["http"]
        self.metrics, self.flight = addrs["metrics"], addrs["flight"]

    @property
    def ready(self) -> bool:
        """Whether every model is loaded and warm."""
        return self._h is not None and self._h.Ready()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops accepting requests, finishes those in flight (up to
        timeout seconds) and closes the listeners. Idempotent."""
        if self._h is not None:
            h, self._h = self._h, None
            try:
                h.Stop(int(timeout * 1000))
            except RuntimeError as e:
                raise translate(e, KilnError) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._h is None else ("ready" if self.ready else "not ready")
        return f"kiln.Server(grpc={self.grpc!r}, http={self.http!r}, flight={self.flight!r}, {state})"


def serve(repository, *, host: str = "127.0.0.1", grpc_port: int = 8001, http_port: int = 8000,
          metrics_port: int = 8002, flight_port: int = 8815, data_dir: Optional[str] = None,
          model_control: str = "none", auth_token: str = "", threads: int = 0) -> Server:
    """Serves a model repository from this process in the background (the
    same server as `kiln serve`) and returns a handle with ``.stop()``.
    A port of 0 picks a free one; -1 turns that listener off."""
    repository = os.fspath(repository)
    if not os.path.isdir(repository):
        raise KilnError(f"kiln: no model repository at {repository}")
    opts = {
        "repository": repository, "host": host, "grpc_port": grpc_port, "http_port": http_port,
        "metrics_port": metrics_port, "flight_port": flight_port,
        "data_dir": os.fspath(data_dir) if data_dir else os.path.join(repository, os.pardir, "kiln-data"),
        "model_control": model_control, "auth_token": auth_token, "threads": threads,
    }
    try:
        return Server(_b.Serve(json.dumps(opts)))
    except RuntimeError as e:
        raise translate(e, KilnError) from None
