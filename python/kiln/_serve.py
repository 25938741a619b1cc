"""kiln.serve: Kiln's inference server inside this process."""
import json
import os
from typing import Optional, Sequence

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


def serve(repository, *, host: str = "", grpc_port: int = 8001, http_port: int = 8000, single_port: bool = False,
          metrics_port: int = 8002, flight_port: int = 8815, data_dir: Optional[str] = None,
          model_control: str = "none", repository_poll_secs: Optional[float] = None,
          load_models: Optional[Sequence[str]] = None, strict_model_config: bool = False,
          auth_token: str = "", auth_token_file: Optional[str] = None, auth_inference: bool = False,
          tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
          max_message_bytes: Optional[int] = None, max_decompressed_bytes: int = 67108864,
          max_inputs: int = 64, max_tensor_elements: int = 268435456,
          max_inflight_bytes: int = 1073741824, read_header_timeout: Optional[float] = None,
          read_timeout: Optional[float] = None, max_concurrent_streams: int = 128,
          max_streams: int = 64, shutdown_timeout: Optional[float] = None, registry: Optional[str] = None,
          registry_artifacts: Optional[str] = None, registry_key_file: Optional[str] = None,
          serve_alias: str = "production", registry_poll_interval: Optional[float] = None,
          rollback_grace: Optional[float] = None, pipeline: Optional[str] = None,
          watch_dataset: Optional[str] = None, pipeline_debounce: Optional[float] = None,
          repository_cache: Optional[str] = None, rollout_policy: str = "",
          rollout_state: str = "", rollout_manual: bool = False,
          threads: int = 0) -> Server:
    """Serves a model repository from this process in the background and
    returns a handle with ``.stop()``: the same server as `kiln serve`
    (Go's serving.Run), with the same options under the flags' names and
    the same defaults.

    host: "" listens on every interface; IPv6 as "::1" or "[::1]".
    grpc_port, http_port, metrics_port, flight_port: 0 picks a free port,
    -1 turns that listener off (not gRPC, unless single_port).
    single_port: serve gRPC on http_port too (HTTP/1.1, h2c and TLS ALPN
    h2 on one listener). data_dir: Flight's datasets
    (default "kiln-data"). model_control: "none", "poll" (every
    repository_poll_secs, default 15) or "explicit" (load_models at
    start). auth_token / auth_token_file (at least 16 characters; default
    $KILN_AUTH_TOKEN / $KILN_AUTH_TOKEN_FILE): the repository API and
    Flight's datasets and jobs need it, inference too with auth_inference.
    tls_cert, tls_key: PEM files serving gRPC, HTTP and Flight over TLS.
    max_message_bytes: largest message / HTTP body (default 64 MiB; a larger
    HTTP body is answered 413). max_decompressed_bytes: largest HTTP body
    once gzip/deflate-decoded. max_inputs: inputs per request.
    max_tensor_elements: elements per input tensor (rows per Flight record
    batch). max_inflight_bytes: bytes of inference requests admitted at
    once (beyond: RESOURCE_EXHAUSTED / HTTP 503). read_header_timeout,
    read_timeout: seconds to read an HTTP request's headers / the whole
    request (default 30 / 60). max_concurrent_streams: gRPC and Flight
    streams per connection. max_streams: client-streaming calls
    (ModelStreamInfer, Flight DoPut and DoExchange) open at once over the
    whole server (beyond: RESOURCE_EXHAUSTED); each of their messages
    counts in max_inflight_bytes.
    shutdown_timeout: seconds a shutdown waits for requests in flight when
    the process ends the server (stop() takes its own). threads: libtorch
    intra-op threads (0: $KILN_NUM_THREADS, else CPUs / instance_count).
    registry: serve the versions a model registry's alias (serve_alias,
    "production") names: a SQLite file or postgres://... DSN
    (registry_artifacts: its artifact root, a directory or
    s3://bucket/prefix, default $KILN_REGISTRY_ARTIFACTS; registry_key_file, default
    $KILN_REGISTRY_KEY_FILE: the key of encrypted artifacts). A move of the
    alias loads the new version before it switches; the previous one stays
    loaded for rollback_grace seconds (default 300).
    registry_poll_interval: seconds between polls of the registry (default
    2).
    pipeline: continuous training (needs registry): run this pipeline file
    (as `kiln pipeline run`) on the Flight dataset watch_dataset (default:
    the file's data.dataset) pipeline_debounce seconds (default 30) after
    each commit, one run at a time.
    rollout_policy: a rollout policy file (YAML/JSON, as `kiln serve
    --rollout-policy`: default and per-model canary steps, analysis window,
    thresholds, shadow share, sticky key; empty: the defaults).
    rollout_state: the directory keeping rollouts across restarts (default
    $KILN_HOME/rollouts). rollout_manual: with registry, do not start a
    rollout when a model's "candidate" alias moves (start one over REST
    /v2/rollouts or `kiln rollout start`).
    repository may also be "s3://bucket/prefix", a repository in
    S3-compatible storage (endpoint and credentials from the AWS_*
    environment variables), downloaded into repository_cache (default: a
    temporary directory) and, with model_control "poll", synced every
    repository_poll_secs.

    Raises KilnError (a subclass by the error's code) when an option is
    invalid or a listener cannot open."""
    repository = os.fspath(repository)
    if not repository.startswith("s3://") and not os.path.isdir(repository):
        raise KilnError(f"kiln: no model repository at {repository}")
    opts = {
        "model_repository": repository, "host": host, "grpc_port": grpc_port, "http_port": http_port,
        "metrics_port": metrics_port, "flight_port": flight_port, "model_control": model_control,
        "single_port": single_port,
        "strict_model_config": strict_model_config, "auth_token": auth_token,
        "auth_inference": auth_inference, "threads": threads,
        "max_decompressed_bytes": max_decompressed_bytes, "max_inputs": max_inputs,
        "max_tensor_elements": max_tensor_elements, "max_inflight_bytes": max_inflight_bytes,
        "max_concurrent_streams": max_concurrent_streams, "max_streams": max_streams,
        "serve_alias": serve_alias, "rollout_manual": rollout_manual,
    }
    optional = {
        "data_dir": data_dir and os.fspath(data_dir), "repository_poll_secs": repository_poll_secs,
        "load_models": list(load_models) if load_models else None,
        "auth_token_file": auth_token_file and os.fspath(auth_token_file),
        "tls_cert": tls_cert and os.fspath(tls_cert), "tls_key": tls_key and os.fspath(tls_key),
        "max_message_bytes": max_message_bytes,
        # Go durations: nanoseconds.
        "read_header_timeout": None if read_header_timeout is None else int(read_header_timeout * 1e9),
        "read_timeout": None if read_timeout is None else int(read_timeout * 1e9),
        "shutdown_timeout_ms": None if shutdown_timeout is None else int(shutdown_timeout * 1000),
        "registry": registry and os.fspath(registry),
        "registry_artifacts": registry_artifacts and os.fspath(registry_artifacts),
        "registry_key_file": registry_key_file and os.fspath(registry_key_file),
        "registry_poll_interval": None if registry_poll_interval is None else int(registry_poll_interval * 1e9),
        "rollback_grace": None if rollback_grace is None else int(rollback_grace * 1e9),
        "pipeline": pipeline and os.fspath(pipeline), "watch_dataset": watch_dataset,
        "pipeline_debounce": None if pipeline_debounce is None else int(pipeline_debounce * 1e9),
        "repository_cache": repository_cache and os.fspath(repository_cache),
        "rollout_policy": rollout_policy and os.fspath(rollout_policy),
        "rollout_state": rollout_state and os.fspath(rollout_state),
    }
    opts.update({k: v for k, v in optional.items() if v is not None})
    try:
        return Server(_b.Serve(json.dumps(opts)))
    except RuntimeError as e:
        raise translate(e, KilnError) from None
