"""kiln.flight: helpers over pyarrow.flight for Kiln's Arrow Flight service
(`kiln serve`, port 8815): datasets, batch inference and training jobs.

>>> fc = kiln.flight.FlightClient("localhost:8815")
>>> fc.upload("iris", table)
>>> fc.predict("iris_model", table)          # a pyarrow Table of predictions
>>> job = fc.train("iris", target="species", spec=SPEC, model="iris_model")
>>> fc.wait(job)["state"]                     # "SUCCEEDED"
"""
import json
import time
from typing import List, Optional

import pyarrow as pa
import pyarrow.flight as fl

from ._errors import KilnError


class FlightClient:
    """A client of Kiln's Flight service. token, when the server requires
    one, is sent as a bearer token."""

    def __init__(self, location: str = "localhost:8815", token: Optional[str] = None, tls: bool = False):
        scheme = "grpc+tls" if tls else "grpc"
        self.location = location if "://" in location else f"{scheme}://{location}"
        self._client = fl.connect(self.location)
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._opts = fl.FlightCallOptions(headers=headers)

    def upload(self, name: str, data) -> dict:
        """Stores a pyarrow Table (or RecordBatch, or pandas DataFrame) as
        dataset `name`; returns the server's final acknowledgement."""
        if not isinstance(data, pa.Table):
            data = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else pa.Table.from_pandas(data)
        writer, reader = self._client.do_put(fl.FlightDescriptor.for_path("datasets", name), data.schema,
                                             options=self._opts)
        writer.write_table(data)
        writer.done_writing()
        last = {}
        while True:
            try:
                buf = reader.read()
            except StopIteration:
                break
            if buf is None:
                break
            last = json.loads(buf.to_pybytes())
        writer.close()
        return last

    def datasets(self) -> List[str]:
        """Names of the stored datasets."""
        return [f.descriptor.path[1].decode() for f in self._client.list_flights(options=self._opts)
                if f.descriptor.path[:1] == [b"datasets"]]

    def download(self, name: str) -> pa.Table:
        """Reads dataset `name` back."""
        info = self._client.get_flight_info(fl.FlightDescriptor.for_path("datasets", name), options=self._opts)
        return self._client.do_get(info.endpoints[0].ticket, options=self._opts).read_all()

    def predict(self, model: str, data: pa.Table, version: str = "") -> pa.Table:
        """Streams the rows of `data` through model (columns named as its
        inputs, or feature columns) and returns the predictions."""
        path = ["models", model] + ([version] if version else [])
        writer, reader = self._client.do_exchange(fl.FlightDescriptor.for_path(*path), options=self._opts)
        writer.begin(data.schema)
        writer.write_table(data)
        writer.done_writing()
        out = reader.read_all()
        writer.close()
        return out

    def _action(self, kind: str, body: dict) -> dict:
        [res] = self._client.do_action(fl.Action(kind, json.dumps(body).encode()), options=self._opts)
        return json.loads(res.body.to_pybytes())

    def train(self, dataset: str, *, target: str, spec, model: Optional[str] = None,
              register: Optional[str] = None, **hyper) -> str:
        """Starts training on a stored dataset (spec: a `kiln train` spec,
        dict or YAML text; hyper: epochs, batch_size, lr, seed, ...); the
        package becomes the model's next version. On a server with a
        registry (``kiln serve --registry``) the job is recorded as a run
        (its id in the job status' "run_id") and ``register="NAME"``
        registers the result (the result's "registered"). Returns the job
        id."""
        body = {"dataset": dataset, "target": target, "spec": spec, **hyper}
        if model:
            body["model"] = model
        if register:
            body["register"] = register
        return self._action("train", body)["job_id"]

    def job_status(self, job_id: str) -> dict:
        """A job's state, progress and (when done) result or error."""
        return self._action("job-status", {"job_id": job_id})

    def cancel(self, job_id: str) -> dict:
        """Cancels a running job."""
        return self._action("cancel", {"job_id": job_id})

    def wait(self, job_id: str, timeout: float = 3600, interval: float = 0.2) -> dict:
        """Polls until the job is no longer running; returns its status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.job_status(job_id)
            if st["state"] != "RUNNING":
                return st
            if time.monotonic() > deadline:
                raise KilnError(f"job {job_id} still running after {timeout} s")
            time.sleep(interval)

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"kiln.flight.FlightClient({self.location!r})"
