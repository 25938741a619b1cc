"""MLServer runtime for bench/serve: a TorchScript file (the model settings'
parameters.uri) run with torch.jit.load, its forward under torch.no_grad(),
one intra-op thread per worker process (like Kiln's instances and
TorchServe's workers). The request's first input is the batch (FP32, any
shape; MLServer's adaptive batching concatenates one-row requests along
dimension 0 before predict and splits the output after); the answer is one
FP32 output "y"."""
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class TorchScriptModel(MLModel):
    async def load(self) -> bool:
        torch.set_num_threads(1)
        uri = await get_model_uri(self._settings)
        self._model = torch.jit.load(uri).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = torch.from_numpy(NumpyCodec.decode_input(payload.inputs[0]))
        with torch.no_grad():
            y = self._model(x)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output("y", y.numpy())],
        )
