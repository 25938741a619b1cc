#!/usr/bin/env python3
"""A pyarrow flight.FlightServerBase server doing what Kiln's Flight service
does, for bench/flight to compare against.

  DoPut ["datasets", NAME]: writes the stream to an Arrow IPC file in DATA
      through a temporary file renamed at the end, fsync'ing every batch
      before acknowledging it with a PutResult (JSON progress).
  DoExchange ["models", NAME]: runs each input batch's FixedSizeList /
      fixed_shape_tensor column "x" through the TorchScript model MODEL with
      torch, and answers with a batch of its output "y" (fixed_shape_tensor).

Usage: pyserver.py --data DIR [--model model.pt] [--threads N]
Prints the port it listens on (127.0.0.1) on stdout, then serves until
stdin closes.
"""
import argparse
import json
import os
import sys
import tempfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl


class Server(fl.FlightServerBase):
    def __init__(self, data, model, **kw):
        super().__init__("grpc://127.0.0.1:0", **kw)
        self.data = data
        self.model = model

    def do_put(self, context, descriptor, reader, writer):
        path = [p.decode() for p in descriptor.path]
        if len(path) != 2 or path[0] != "datasets":
            raise fl.FlightServerError("expected [datasets, NAME]")
        fd, tmp = tempfile.mkstemp(dir=self.data, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as f:
                sink = pa.PythonFile(f, mode="w")
                w = pa.ipc.new_file(sink, reader.schema)
                batches = rows = 0
                for chunk in reader:
                    w.write_batch(chunk.data)
                    f.flush()
                    os.fsync(f.fileno())
                    batches += 1
                    rows += chunk.data.num_rows
                    writer.write(pa.py_buffer(json.dumps({"batches": batches, "rows": rows}).encode()))
                w.close()
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, os.path.join(self.data, path[1] + ".arrow"))
        except BaseException:
            os.unlink(tmp)
            raise

    def do_exchange(self, context, descriptor, reader, writer):
        import torch

        started = False
        for chunk in reader:
            batch = chunk.data
            col = batch.column("x")
            if isinstance(col.type, pa.FixedShapeTensorType):
                col = col.storage
            width = col.type.list_size
            x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            with torch.no_grad():
                y = self.model(torch.from_numpy(x)).numpy()
            out = pa.record_batch({"y": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(y))})
            if not started:
                writer.begin(out.schema)
                started = True
            writer.write_batch(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    model = None
    if args.model:
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        model = torch.jit.load(args.model).eval()
    server = Server(args.data, model)
    print(server.port, flush=True)
    threading.Thread(target=server.serve, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
