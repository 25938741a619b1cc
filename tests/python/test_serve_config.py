"""kiln.serve and `kiln serve` are one composition (Go's serving.Run): the
same options, under the flags' names, with the same defaults; TLS and auth
work in process as on the command line."""
import inspect
import re
import subprocess

import numpy as np
import pytest

import kiln

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

# Options that only one side has, on purpose: the CLI's --log-format (Python
# logs through the process) and --threads is a root flag of the kiln command.
CLI_ONLY = {"log_format"}
# Python keeps its shorter established names for two of them.
RENAMED = {"model_repository": "repository", "load_model": "load_models", "model_control_mode": "model_control"}


def cli_defaults(kiln_bin):
    """`kiln serve --help` flags and defaults, as {python_name: default text}."""
    out = subprocess.run([str(kiln_bin), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    flags = {}
    for m in re.finditer(r"^\s+--([a-z-]+)(?: (\w+))?\s+(.*?)$", out, re.M):
        name = m.group(1).replace("-", "_")
        d = re.search(r"\(default (\S+?)\)$", m.group(3))
        flags[RENAMED.get(name, name)] = d.group(1).strip('"') if d else None
    return flags


def test_same_options_and_defaults_as_cli(kiln_bin):
    cli = cli_defaults(kiln_bin)
    params = inspect.signature(kiln.serve).parameters
    py = {n: p.default for n, p in params.items() if p.kind == p.KEYWORD_ONLY}
    py["repository"] = None
    cli.pop("help", None)
    missing = set(cli) - set(py) - CLI_ONLY
    assert not missing, f"kiln.serve lacks the CLI options {sorted(missing)}"
    extra = set(py) - set(cli) - {"threads"}
    assert not extra, f"kiln.serve has options the CLI lacks: {sorted(extra)}"
    for name, text in cli.items():
        if name in CLI_ONLY or text is None:
            continue
        want = py[name]
        if text.startswith("$"):  # from the environment, read by Go for both
            assert want in ("", None), name
        elif name == "repository_poll_secs":
            assert want is None and float(text) == 15.0  # None: the Go default, 15 s
        elif name in ("data_dir", "max_message_bytes", "shutdown_timeout", "read_header_timeout", "read_timeout",
                      "registry_poll_interval", "rollback_grace", "pipeline_debounce"):
            assert want is None, name  # None: the Go default, the same the CLI shows
        else:
            assert str(want) == text, f"{name}: Python {want!r}, CLI {text!r}"


def test_tls_and_auth_in_process(tmp_path, kiln_bin):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    m = kiln.Sequential([kiln.layers.Linear(4), kiln.layers.ReLU(), kiln.layers.Linear()])
    m.fit(x, y, epochs=2, verbose=0)
    m.deploy(tmp_path / "repo", "toy")
    with pytest.raises(kiln.KilnError, match="at least 16"):
        kiln.serve(tmp_path / "repo", host="127.0.0.1", grpc_port=0, http_port=-1, metrics_port=-1,
                   flight_port=-1, auth_token="short")
    token = "in-process-token-0123456789"
    with kiln.serve(tmp_path / "repo", host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=-1,
                    flight_port=-1, tls_cert=cert, tls_key=key, auth_token=token, auth_inference=True) as s:
        c = httpclient.InferenceServerClient(url=s.http, ssl=True,
                                             ssl_context_factory=lambda: __import__("ssl").create_default_context(cafile=str(cert)))
        assert c.is_server_live()
        inp = httpclient.InferInput("x", [2, 3], "FP32")
        inp.set_data_from_numpy(x[:2])
        with pytest.raises(InferenceServerException) as e:
            c.infer("toy", [inp])
        assert e.value.status() == "401"
        out = c.infer("toy", [inp], headers={"Authorization": "Bearer " + token}).as_numpy("y")
        np.testing.assert_allclose(out, m.predict(x[:2]).reshape(out.shape), atol=1e-5)


def test_rollout_options_in_process(tmp_path):
    """rollout_policy, rollout_state: a canary started over REST follows the
    policy file's steps, and its state is kept in rollout_state; a bad
    policy file is a KilnError naming the file."""
    import json
    import urllib.request

    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    models = []
    for _ in range(2):
        m = kiln.Sequential([kiln.layers.Linear(4), kiln.layers.ReLU(), kiln.layers.Linear()])
        m.fit(x, y, epochs=1, verbose=0)
        models.append(m)
    assert models[0].deploy(tmp_path / "repo", "toy") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: {steps: [50, 20]}\n")
    with pytest.raises(kiln.KilnError, match="bad.yaml"):
        kiln.serve(tmp_path / "repo", host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=-1,
                   flight_port=-1, rollout_policy=bad)
    policy = tmp_path / "rollout.yaml"
    policy.write_text("default: {steps: [25, 100], window: 1h, min_requests: 1000}\n")
    state = tmp_path / "rollouts"
    with kiln.serve(tmp_path / "repo", host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=-1,
                    flight_port=-1, rollout_policy=policy, rollout_state=state) as s:
        assert models[1].deploy(tmp_path / "repo", "toy") == 2  # the candidate, next to the served v1
        url = f"http://{s.http}/v2/rollouts/toy"
        req = urllib.request.Request(url + "/start", data=json.dumps({"candidate": 2}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        with urllib.request.urlopen(url, timeout=30) as r:
            st = json.load(r)
        assert st["state"] == "running" and (st["production"], st["candidate"]) == (1, 2), st
        assert st["steps"] == [25, 100], st  # from the policy file, not the defaults
        assert (state / "toy.json").is_file()
