"""Data-parallel training from Python: Model.fit(workers=N) runs N ranks of
a c10d Gloo group in the Go core; two ranks with batch 32 train as one
process with batch 64 (rank 0's weights broadcast, gradients averaged)."""
import numpy as np
import pytest
from sklearn.datasets import load_diabetes

import kiln
from kiln import layers


def _regression():
    d = load_diabetes()
    x = d.data[:384].astype(np.float32)
    y = ((d.target[:384] - d.target.mean()) / d.target.std()).astype(np.float32)
    return x, y


def test_two_workers_equal_one_with_double_batch(tmp_path):
    x, y = _regression()
    spec = [layers.Linear(16), layers.ReLU(), layers.Linear()]
    one = kiln.Sequential(spec)
    h1 = one.fit(x, y, epochs=3, batch_size=64, validation_split=0, optimizer="sgd", lr=0.05, seed=3, verbose=0)
    two = kiln.Sequential(spec)
    h2 = two.fit(x, y, epochs=3, batch_size=32, validation_split=0, optimizer="sgd", lr=0.05, seed=3, verbose=0,
                 workers=2)
    np.testing.assert_allclose(h2["loss"], h1["loss"], atol=1e-5)
    np.testing.assert_allclose(two.predict(x[:50]), one.predict(x[:50]), atol=1e-5)


def test_workers_must_be_positive():
    x, y = _regression()
    m = kiln.Sequential([layers.Linear()])
    with pytest.raises(ValueError, match="workers"):
        m.fit(x, y, epochs=1, verbose=0, workers=0)


def test_sync_batchnorm_two_workers_equal_one_with_double_batch():
    # With sync_batchnorm the two ranks' batch-norm layers normalize with
    # the statistics of both ranks' 32 rows: as one process with batch 64.
    x, y = _regression()
    spec = [layers.Linear(16), layers.BatchNorm1d(), layers.ReLU(), layers.Linear()]
    one = kiln.Sequential(spec)
    h1 = one.fit(x, y, epochs=3, batch_size=64, validation_split=0, optimizer="sgd", lr=0.05, seed=3, verbose=0)
    fit2 = dict(epochs=3, batch_size=32, validation_split=0, optimizer="sgd", lr=0.05, seed=3, verbose=0, workers=2)
    sync = kiln.Sequential(spec)
    h2 = sync.fit(x, y, sync_batchnorm=True, **fit2)
    np.testing.assert_allclose(h2["loss"], h1["loss"], atol=1e-5)
    np.testing.assert_allclose(sync.predict(x[:50]), one.predict(x[:50]), atol=1e-5)
    per_rank = kiln.Sequential(spec)
    h3 = per_rank.fit(x, y, **fit2)
    assert np.max(np.abs(np.asarray(h3["loss"]) - np.asarray(h1["loss"]))) > 1e-4


def test_sync_batchnorm_must_be_bool():
    x, y = _regression()
    m = kiln.Sequential([layers.Linear()])
    with pytest.raises(ValueError, match="sync_batchnorm"):
        m.fit(x, y, epochs=1, verbose=0, workers=2, sync_batchnorm="yes")
