"""TorchServe handler for bench/serve: each request body is one row of raw
little-endian float32 values; TorchServe's batching hands several requests
at once, which run as one forward pass; each response is the row's raw
float32 output."""
import json
import os

import torch


class RawHandler:
    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        torch.set_num_threads(1)  # 2 workers x 1 thread, like Kiln's 2 instances
        model_dir = context.system_properties["model_dir"]
        self.model = torch.jit.load(os.path.join(model_dir, "model.pt")).eval()
        with open(os.path.join(model_dir, "shape.json")) as f:
            self.shape = json.load(f)
        self.initialized = True

    def handle(self, data, context):
        rows = []
        for req in data:
            body = req.get("body") or req.get("data")
            rows.append(torch.frombuffer(bytearray(body), dtype=torch.float32).reshape(self.shape))
        with torch.no_grad():
            out = self.model(torch.stack(rows))
        return [bytes(o.contiguous().numpy().tobytes()) for o in out]


_service = RawHandler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
