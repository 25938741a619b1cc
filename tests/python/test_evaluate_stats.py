"""The evaluation gate's statistics (core/evaluate, core/evaluate/stats)
against statsmodels and SciPy.

core/evaluate/internal/statscheck runs the Go implementation on crafted
inputs. McNemar's test must equal statsmodels' mcnemar(table, exact=...,
correction=True) in both forms. The paired bootstrap is compared twice:
with the very resample indices Go drew (a numpy/scikit-learn replica of
the statistic on each resample and numpy's linear quantiles: equal to
rounding), and with scipy.stats.bootstrap(paired=True, method='percentile')
drawing its own resamples (equal within the Monte-Carlo error of a
percentile from B resamples, derived below)."""
import json
import math
import subprocess

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from statsmodels.stats.contingency_tables import mcnemar

from conftest import ROOT


@pytest.fixture(scope="module")
def statscheck(tmp_path_factory):
    """Builds core/evaluate/internal/statscheck once and returns a function
    that runs it on a request (a dict) and returns its JSON answer."""
    path = tmp_path_factory.mktemp("statscheck") / "statscheck"
    subprocess.run(["go", "build", "-o", str(path), "./core/evaluate/internal/statscheck"], cwd=ROOT, check=True)

    def run(request):
        p = subprocess.run([str(path)], input=json.dumps(request), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    return run


# (b, c): no discordant pair, ties, one-sided, small (exact region, b+c < 25),
# the boundary, and large tables.
TABLES = [(0, 0), (0, 1), (1, 0), (3, 9), (5, 5), (0, 12), (2, 22), (12, 12), (10, 15),
          (24, 0), (30, 12), (100, 80), (400, 330), (1000, 1000), (5, 40), (2500, 2350)]


def test_mcnemar_matches_statsmodels(statscheck):
    got = statscheck({"mcnemar": [{"b": b, "c": c} for b, c in TABLES]})["mcnemar"]
    for (b, c), g in zip(TABLES, got):
        table = np.array([[7, b], [c, 11]])  # the concordant cells do not enter the test
        ex = mcnemar(table, exact=True, correction=True)
        assert g["exact"]["statistic"] == pytest.approx(float(ex.statistic), rel=1e-14, abs=0)
        assert g["exact"]["p_value"] == pytest.approx(float(ex.pvalue), rel=1e-11, abs=0), (b, c)
        assert (g["exact"]["b"], g["exact"]["c"]) == (b, c)
        if b + c == 0:
            # statsmodels divides by zero here (statistic inf, p 0); Kiln
            # reports no evidence of a difference (documented departure).
            assert (g["chi2"]["statistic"], g["chi2"]["p_value"]) == (0, 1)
        else:
            ch = mcnemar(table, exact=False, correction=True)
            assert g["chi2"]["statistic"] == pytest.approx(float(ch.statistic), rel=1e-14, abs=0)
            assert g["chi2"]["p_value"] == pytest.approx(float(ch.pvalue), rel=1e-11, abs=0), (b, c)
        # The gate's rule: exact below 25 discordant pairs.
        assert g["auto"] == (g["exact"] if b + c < 25 else g["chi2"])


def _regression_data(n, seed):
    rng = np.random.default_rng(seed)
    truth = rng.normal(3.0, 2.0, n)
    cand = truth + rng.normal(0.0, 0.6, n)
    base = truth + rng.normal(0.2, 0.9, n)
    return truth, cand, base


SKLEARN = {"mse": mean_squared_error, "mae": mean_absolute_error, "r2": lambda t, p: r2_score(t, p)}


@pytest.mark.parametrize("metric", ["mse", "mae", "r2"])
def test_bootstrap_replicates_with_the_same_indices(statscheck, metric):
    truth, cand, base = _regression_data(60, 7)
    req = {"kind": "regression", "metric": metric, "truth": truth.tolist(), "candidate": cand.tolist(),
           "baseline": base.tolist(), "resamples": 2000, "seed": 11, "level": 0.9, "indices": True}
    got = statscheck({"bootstrap": [req]})["bootstrap"][0]
    idx = np.array(got["indices"])
    assert idx.shape == (2000, 60)
    f = SKLEARN[metric]
    dist = np.array([f(truth[i], cand[i]) - f(truth[i], base[i]) for i in idx])
    iv = got["interval"]
    assert iv["estimate"] == pytest.approx(f(truth, cand) - f(truth, base), rel=1e-12)
    assert iv["low"] == pytest.approx(np.quantile(dist, 0.05), rel=1e-12)
    assert iv["high"] == pytest.approx(np.quantile(dist, 0.95), rel=1e-12)
    assert iv["std_err"] == pytest.approx(np.std(dist, ddof=1), rel=1e-9)
    assert (iv["method"], iv["resamples"], iv["seed"], iv["rows"], iv["level"]) == ("percentile", 2000, 11, 60, 0.9)


def test_accuracy_bootstrap_replicates_with_the_same_indices(statscheck):
    rng = np.random.default_rng(3)
    cand = (rng.random(80) < 0.85).astype(float)
    base = (rng.random(80) < 0.75).astype(float)
    req = {"kind": "accuracy", "candidate": cand.tolist(), "baseline": base.tolist(),
           "resamples": 1000, "seed": 5, "level": 0.95, "indices": True}
    got = statscheck({"bootstrap": [req]})["bootstrap"][0]
    idx = np.array(got["indices"])
    dist = cand[idx].mean(axis=1) - base[idx].mean(axis=1)
    iv = got["interval"]
    assert iv["estimate"] == pytest.approx(cand.mean() - base.mean(), rel=1e-12)
    assert iv["low"] == pytest.approx(np.quantile(dist, 0.025), rel=1e-12, abs=1e-15)
    assert iv["high"] == pytest.approx(np.quantile(dist, 0.975), rel=1e-12, abs=1e-15)


def _vectorized(metric):
    def stat(t, c, b, axis=-1):
        def m(p):
            if metric == "mse":
                return np.mean((p - t) ** 2, axis=axis)
            if metric == "mae":
                return np.mean(np.abs(p - t), axis=axis)
            sst = np.sum((t - np.mean(t, axis=axis, keepdims=True)) ** 2, axis=axis)
            return 1 - np.sum((p - t) ** 2, axis=axis) / sst
        return m(c) - m(b)
    return stat


@pytest.mark.parametrize("metric", ["mse", "mae", "r2"])
def test_bootstrap_agrees_with_scipy_within_monte_carlo_error(statscheck, metric):
    """SciPy draws other resamples, so the ends differ by Monte-Carlo error.
    The p-quantile of B draws has standard error sqrt(p(1-p)/B)/f(q_p)
    (the asymptotic variance of a sample quantile); taking the bootstrap
    distribution as normal with SciPy's standard error s, f(q_p) =
    phi(z_p)/s. Two independent estimates differ with standard error
    sqrt(2) times that; the test allows 5 of them (B = 20000: about
    0.13 s, a two-sided chance below 1e-6 of failing by chance)."""
    truth, cand, base = _regression_data(120, 21)
    B, level = 20000, 0.95
    req = {"kind": "regression", "metric": metric, "truth": truth.tolist(), "candidate": cand.tolist(),
           "baseline": base.tolist(), "resamples": B, "seed": 2, "level": level}
    iv = statscheck({"bootstrap": [req]})["bootstrap"][0]["interval"]
    res = scipy.stats.bootstrap((truth, cand, base), _vectorized(metric), paired=True, vectorized=True,
                                method="percentile", n_resamples=B, confidence_level=level,
                                rng=np.random.default_rng(2))
    s = res.standard_error
    p = (1 - level) / 2
    se_q = math.sqrt(p * (1 - p) / B) / (scipy.stats.norm.pdf(scipy.stats.norm.ppf(p)) / s)
    tol = 5 * math.sqrt(2) * se_q
    assert abs(iv["low"] - res.confidence_interval.low) < tol, (iv, res.confidence_interval, tol)
    assert abs(iv["high"] - res.confidence_interval.high) < tol, (iv, res.confidence_interval, tol)
    assert iv["std_err"] == pytest.approx(s, rel=0.05)
