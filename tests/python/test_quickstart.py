"""examples/quickstart.py runs end to end (train, evaluate, save, deploy,
serve in process, query), and kiln.serve / Model.deploy behave."""
import os
import runpy

import numpy as np
import pytest

import kiln
from conftest import ROOT


def test_quickstart_runs(tmp_path):
    mod = runpy.run_path(os.path.join(ROOT, "examples", "quickstart.py"))
    acc = mod["main"](str(tmp_path))
    assert acc >= 0.93
    assert (tmp_path / "repository" / "breast_cancer" / "config.yaml").exists()
    assert (tmp_path / "repository" / "breast_cancer" / "1" / "model.pt").exists()


def test_deploy_versions_and_serve_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    y = np.where(x[:, 0] + x[:, 1] > 0, "pos", "neg")
    m = kiln.Sequential([kiln.layers.Linear(8), kiln.layers.ReLU(), kiln.layers.Linear()])
    with pytest.raises(kiln.KilnError, match="fit"):
        m.deploy(tmp_path / "repo", "toy")
    m.fit(x, y, epochs=5, verbose=0)
    assert m.deploy(tmp_path / "repo", "toy") == 1
    assert m.deploy(tmp_path / "repo", "toy") == 2
    with pytest.raises(kiln.KilnError, match="name"):
        m.deploy(tmp_path / "repo", "../escape")
    with pytest.raises(kiln.KilnError, match="no model repository"):
        kiln.serve(tmp_path / "missing")
    with kiln.serve(tmp_path / "repo", grpc_port=0, http_port=-1, metrics_port=-1, flight_port=0,
                    data_dir=tmp_path / "data") as s:
        assert s.ready and s.http == "" and s.flight
        out = kiln.Client(s.grpc).infer("toy", {"x": x[:4]})["y"]
        np.testing.assert_allclose(out, m.predict(x[:4]), atol=1e-5)
        # A second server cannot take the same port: a clear error, the first keeps serving.
        with pytest.raises(kiln.KilnError, match="address already in use"):
            kiln.serve(tmp_path / "repo", grpc_port=int(s.grpc.rsplit(":", 1)[1]), http_port=-1,
                       metrics_port=-1, flight_port=-1)
        assert kiln.Client(s.grpc).is_ready()
    assert "stopped" in repr(s)
