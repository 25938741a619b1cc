"""kiln.flight.FlightClient against kiln.serve's Flight service: upload,
list, download, train a model on the stored dataset, and predict with it."""
import numpy as np
import pyarrow as pa
import pytest
from sklearn.datasets import load_iris

import kiln
import kiln.flight

SPEC = """
model:
  layers:
    - {type: linear, out: 16}
    - {type: relu}
    - {type: linear}
split: {val: 0.2, test: 0.2, stratify: true}
"""


def test_flight_client_round_trip_train_and_predict(tmp_path):
    iris = load_iris()
    cols = {f"f{i}": iris.data[:, i].astype(np.float32) for i in range(4)}
    cols["species"] = pa.array(np.asarray(iris.target_names)[iris.target])
    table = pa.table(cols)
    (tmp_path / "repo").mkdir()
    with kiln.serve(tmp_path / "repo", grpc_port=0, http_port=-1, metrics_port=-1, flight_port=0,
                    data_dir=tmp_path / "data") as server, kiln.flight.FlightClient(server.flight) as fc:
        ack = fc.upload("iris", table)
        assert ack["committed"] and ack["rows"] == 150
        assert fc.datasets() == ["iris"]
        assert fc.download("iris").equals(table)

        job = fc.train("iris", target="species", spec=SPEC, model="iris_mlp", epochs=60, lr=0.01, seed=1)
        st = fc.wait(job, timeout=300)
        assert st["state"] == "SUCCEEDED", st
        assert st["result"]["version"] == 1

        feats = table.drop_columns(["species"])
        out = fc.predict("iris_mlp", feats)
        logits = np.stack(out.column(0).combine_chunks().to_numpy_ndarray())
        acc = (logits.argmax(1) == iris.target).mean()
        assert acc >= 0.9

        with pytest.raises(pa.ArrowException, match="no dataset|not found|NOT_FOUND|unknown"):
            fc.train("missing", target="y", spec=SPEC)
