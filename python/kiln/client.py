"""kiln.Client: a typed client for Kiln's KServe v2 / Open Inference
Protocol gRPC service (and any other server speaking it, such as Triton).

>>> c = kiln.Client("localhost:8001")
>>> c.infer("iris", {"x": features})["y"]
"""
from typing import Dict, List, Mapping, Optional, Sequence

import grpc
import numpy as np

from ._errors import InferenceError, KilnError, ModelLoadError, error_class
from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc

_TO_V2 = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}
_FROM_V2 = {v: k for k, v in _TO_V2.items()}


class ServerError(KilnError):
    """The server answered with an error status; ``code`` is the gRPC code
    (``grpc.StatusCode``), ``message`` the server's message.

    The exception raised is also an instance of the Kiln class of that code,
    as the in-process API raises it: INVALID_ARGUMENT is an InferenceError
    (a ValueError), NOT_FOUND a NotFoundError (a LookupError),
    RESOURCE_EXHAUSTED a ResourceExhaustedError, UNAVAILABLE an
    UnavailableError, DEADLINE_EXCEEDED a DeadlineExceededError (a
    TimeoutError), ...; codes without a Kiln class (UNAUTHENTICATED,
    PERMISSION_DENIED, ...) are a plain ServerError."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


_SERVER_CLASSES: Dict[str, type] = {}


def _server_class(code: grpc.StatusCode) -> type:
    """ServerError combined with the Kiln class of code (error_class in the
    context of running a model, so INVALID_ARGUMENT is an InferenceError)."""
    cls = _SERVER_CLASSES.get(code.name)
    if cls is None:
        name = {"UNIMPLEMENTED": "UNSUPPORTED"}.get(code.name, code.name)
        kiln_cls = error_class(name, InferenceError if code == grpc.StatusCode.INVALID_ARGUMENT else KilnError)
        if kiln_cls is KilnError:
            cls = ServerError
        else:
            cls = type("Server" + kiln_cls.__name__, (ServerError, kiln_cls), {
                "__module__": __name__,
                "__doc__": f"ServerError with code {code.name} ({kiln_cls.__name__}).",
            })
        _SERVER_CLASSES[code.name] = cls
    return cls


def _raise(e: grpc.RpcError):
    code, msg = e.code(), e.details()
    raise _server_class(code)(code, msg) from None


class Client:
    """A KServe v2 gRPC client.

    url is "host:port" (Kiln serves gRPC on 8001). token, when given, is
    sent as a bearer token; max_message_bytes bounds both directions."""

    def __init__(self, url: str = "localhost:8001", token: Optional[str] = None,
                 max_message_bytes: int = 1 << 30, timeout: Optional[float] = None):
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)]
        self.url = url
        self._channel = grpc.insecure_channel(url, options=opts)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._meta = [("authorization", f"Bearer {token}")] if token else None
        self._timeout = timeout

    def _call(self, name: str, req):
        try:
            return getattr(self._stub, name)(req, metadata=self._meta, timeout=self._timeout)
        except grpc.RpcError as e:
            _raise(e)

    def is_live(self) -> bool:
        """Whether the server answers at all."""
        return self._call("ServerLive", pb.ServerLiveRequest()).live

    def is_ready(self) -> bool:
        """Whether the server is ready for inference (models loaded, warm)."""
        return self._call("ServerReady", pb.ServerReadyRequest()).ready

    def is_model_ready(self, model: str, version: str = "") -> bool:
        """Whether a model (version) is loaded and ready."""
        return self._call("ModelReady", pb.ModelReadyRequest(name=model, version=version)).ready

    def server_metadata(self) -> dict:
        """Server name, version and protocol extensions."""
        r = self._call("ServerMetadata", pb.ServerMetadataRequest())
        return {"name": r.name, "version": r.version, "extensions": list(r.extensions)}

    def model_metadata(self, model: str, version: str = "") -> dict:
        """A model's versions, platform, and input/output names, datatypes and shapes."""
        r = self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version))

        def tensors(ts):
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

        return {"name": r.name, "versions": list(r.versions), "platform": r.platform,
                "inputs": tensors(r.inputs), "outputs": tensors(r.outputs)}

    def repository_index(self) -> List[dict]:
        """Every model and version in the repository with its state."""
        r = self._call("RepositoryIndex", pb.RepositoryIndexRequest())
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in r.models]

    def load_model(self, model: str) -> None:
        """Loads (or reloads) a model; the server must allow explicit control."""
        try:
            self._stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model),
                                           metadata=self._meta, timeout=self._timeout)
        except grpc.RpcError as e:
            raise ModelLoadError(f"{e.code().name}: {e.details()}") from None

    def unload_model(self, model: str) -> None:
        """Unloads a model."""
        self._call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model))

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None,
              version: str = "", request_id: str = "") -> Dict[str, np.ndarray]:
        """Runs inference. inputs maps input names to arrays (sent as raw
        little-endian bytes); returns output name -> array."""
        req = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, value in inputs.items():
            a = np.asarray(value)
            v2 = _TO_V2.get(a.dtype)
            if v2 is None:
                raise TypeError(f"input {name!r}: dtype {a.dtype} has no v2 datatype")
            t = req.inputs.add()
            t.name, t.datatype = name, v2
            t.shape.extend(a.shape)
            req.raw_input_contents.append(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
        for name in outputs or ():
            req.outputs.add().name = name
        r = self._call("ModelInfer", req)
        res = {}
        for i, t in enumerate(r.outputs):
            dt = _FROM_V2.get(t.datatype)
            if dt is None:
                raise KilnError(f"output {t.name!r}: datatype {t.datatype} is not numeric")
            res[t.name] = np.frombuffer(r.raw_output_contents[i], dtype=dt.newbyteorder("<")).reshape(tuple(t.shape))
        return res

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"kiln.Client({self.url!r})"
