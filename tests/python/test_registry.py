"""kiln.Registry and model.register on SQLite and PostgreSQL: versions,
aliases by compare-and-swap (two processes racing), runs recorded by fit,
select_model and quantize (also seen by `kiln registry runs`), tampered
and encrypted artifacts, clear errors."""
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone

import numpy as np
import pytest

import kiln

ROOT = pathlib.Path(__file__).resolve().parents[2]


# PostgreSQL from Debian's package, run by the tests in a temporary
# directory on a Unix socket (no TCP port), as internal/testkit does for Go.

def _pg_bin():
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(pathlib.Path(d).parent.name), reverse=True)
    for d in dirs:
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run scripts/install-deps")


class _Postgres:
    def __init__(self):
        import pwd

        self.bin = _pg_bin()
        self.dir = os.path.abspath(__import__("tempfile").mkdtemp(prefix="kiln-pg-"))
        self.user = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name).pw_uid
                    os.chown(self.dir, self.user, pwd.getpwnam(name).pw_gid)
                    break
                except KeyError:
                    continue
        data = os.path.join(self.dir, "data")
        self._run("initdb", "-D", data, "-U", "kiln", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
        self.log = open(os.path.join(self.dir, "postgres.log"), "w")
        self.proc = subprocess.Popen(self._cmd("postgres", "-D", data, "-k", self.dir, "-c", "listen_addresses=",
                                               "-c", "fsync=off", "-c", "synchronous_commit=off",
                                               "-c", "full_page_writes=off", "-c", "max_connections=50"),
                                     stdout=self.log, stderr=self.log, cwd=self.dir, user=self.user,
                                     env={**os.environ, "LC_ALL": "C"})
        deadline = time.monotonic() + 60
        while subprocess.run(self._cmd("pg_isready", "-q", "-h", self.dir, "-U", "kiln", "-d", "postgres"),
                             cwd=self.dir, user=self.user).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("postgres did not start: " + pathlib.Path(self.dir, "postgres.log").read_text())
            time.sleep(0.05)
        self.dbs = 0

    def _cmd(self, name, *args):
        return [os.path.join(self.bin, name), *args]

    def _run(self, name, *args):
        subprocess.run(self._cmd(name, *args), check=True, capture_output=True, cwd=self.dir, user=self.user,
                       env={**os.environ, "LC_ALL": "C"})

    def new_database(self) -> str:
        self.dbs += 1
        name = f"kiln_py_{self.dbs}"
        self._run("createdb", "-h", self.dir, "-U", "kiln", name)
        return f"postgres://kiln@/{name}?host={self.dir}&sslmode=disable"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: fast shutdown
            self.proc.wait(timeout=60)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    pg = _Postgres()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def reg_env(request, tmp_path):
    """(uri, env) of an empty registry of each backend: env is the
    environment a child process needs to open the same registry by default
    (KILN_REGISTRY, KILN_HOME for a PostgreSQL registry's artifacts)."""
    home = tmp_path / "home"
    if request.param == "sqlite":
        uri = str(tmp_path / "registry.db")
    else:
        uri = request.getfixturevalue("postgres").new_database()
    env = {**os.environ, "KILN_HOME": str(home), "KILN_REGISTRY": uri}
    env.pop("KILN_REGISTRY_KEY", None)
    env.pop("KILN_REGISTRY_KEY_FILE", None)
    return uri, env


def data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    centers = {"a": (0, 3), "b": (3, 0), "c": (0, -3)}
    labels = np.array(["a", "b", "c"] * (n // 3))
    x = np.stack([np.array(centers[l]) + rng.normal(0, 0.4, 2) for l in labels]).astype(np.float32)
    return x, labels


LAYERS = [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear"}]


def child(code, env, check=True):
    """Runs Python code in a child process with env (the Go core reads
    KILN_* once, when kiln is imported); returns the CompletedProcess."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        pytest.fail(f"child failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_registry_end_to_end(reg_env, tmp_path):
    uri, env = reg_env
    # A PostgreSQL registry keeps its artifacts in $KILN_HOME/artifacts, and
    # the Go core reads KILN_HOME when kiln is imported: the test runs in a
    # child with its own KILN_HOME (both backends, the same code).
    code = f"""
        import json, numpy as np, kiln
        from datetime import timezone
        rng = np.random.default_rng(0)
        centers = {{"a": (0, 3), "b": (3, 0), "c": (0, -3)}}
        y = np.array(["a", "b", "c"] * 30)
        x = np.stack([np.array(centers[l]) + rng.normal(0, 0.4, 2) for l in y]).astype(np.float32)
        with kiln.Registry({uri!r}) as reg:
            m = kiln.Sequential({LAYERS!r})
            h = m.fit(x, y, epochs=3, verbose=0, registry=reg, register="blobs")
            assert h.run_id and h["run_id"] == h.run_id == m.run_id, (h.run_id, m.run_id)
            v1 = h["registered"]
            assert isinstance(v1, kiln.ModelVersion) and v1.version == 1 and v1.run_id == h.run_id, v1
            assert len(v1.digest) == 64 and v1.size > 0 and v1.parent is None
            assert v1.created_at.tzinfo == timezone.utc
            assert v1.lineage["spec"]["layers"][0]["type"] == "linear", v1.lineage
            assert "hyperparameters" in v1.lineage and "preprocessing" in v1.lineage
            assert [mm.name for mm in reg.list_models()] == ["blobs"]
            ev = reg.set_alias("blobs", "production", 1, expected=0, reason="first")
            assert (ev.from_version, ev.to_version, ev.reason) == (None, 1, "first"), ev
            assert reg.get_version_by_alias("blobs", "production").digest == v1.digest
            prod = reg.load("models:/blobs@production")
            assert prod.registered.version == 1 and prod.run_id == h.run_id
            np.testing.assert_allclose(prod.predict(x[:5]), m.predict(x[:5]), rtol=1e-5)

            # An optimized variant of the registered version: parent recorded.
            rec = prod.quantize("int8", x, y, register="blobs", registry=reg)
            v2 = rec["registered"]
            assert v2.version == 2 and v2.parent == "models:/blobs/1", v2
            assert v2.run_id == rec["run_id"] == prod.run_id
            assert v2.lineage.get("optimization"), v2.lineage
            try:
                reg.set_alias("blobs", "production", 2, expected=2)
                raise SystemExit("a stale expected version moved the alias")
            except kiln.AliasConflictError as e:
                assert "version 1" in str(e), e
            reg.set_alias("blobs", "production", 2)  # expected: read, then swapped
            hist = reg.alias_history("blobs", "production")
            assert [(e.from_version, e.to_version) for e in hist] == [(None, 1), (1, 2)], hist
            assert reg.get_model("blobs").aliases == {{"production": 2}}
            assert [v.version for v in reg.list_versions("blobs")] == [2, 1]
            assert reg.get_version("blobs", 2).aliases == ["production"]

            # Model selection, recorded.
            board, best = kiln.select_model([{LAYERS!r}, [{{"type": "linear"}}]], x, y, epochs=2, verbose=0,
                                            registry=reg)
            assert board.run_id and best.run_id == board.run_id

            runs = {{r.run_id: r for r in reg.list_runs()}}
            train, opt, sel = runs[h.run_id], runs[rec["run_id"]], runs[board.run_id]
            assert (train.kind, train.status, train.model) == ("train", "FINISHED", "blobs"), train
            assert train.params["epochs"] == "3" and train.params["data"] == "numpy", train.params
            assert "val_accuracy" in train.metrics and train.metrics["epochs"] == 3, train.metrics
            assert train.duration > 0 and train.ended_at >= train.started_at
            assert (opt.kind, opt.status, opt.params["quantize"]) == ("optimize", "FINISHED", "int8"), opt
            assert (sel.kind, sel.status) == ("select", "FINISHED") and sel.params["winner"], sel
            full = reg.get_run(h.run_id)
            assert sorted(m.step for m in full.history if m.key == "loss") == [1, 2, 3], full.history
            assert [r.run_id for r in reg.list_runs(model="blobs")] == [rec["run_id"], h.run_id]

            # Unknown names are clear errors.
            for call, what in [(lambda: reg.get_model("nope"), "nope"),
                               (lambda: reg.get_version("blobs", 9), "version 9"),
                               (lambda: reg.get_version_by_alias("blobs", "staging"), "staging"),
                               (lambda: reg.load("models:/nope@production"), "nope"),
                               (lambda: reg.get_run("0" * 32), "0" * 32)]:
                try:
                    call()
                    raise SystemExit(f"no error for {{what}}")
                except kiln.NotFoundError as e:
                    assert what in str(e), e
            try:
                reg.load("models:/blobs")
                raise SystemExit("a URI without version accepted")
            except kiln.InvalidArgumentError as e:
                assert "models:/blobs" in str(e)
        print(json.dumps({{"train": h.run_id, "optimize": rec["run_id"], "select": board.run_id}}))
    """
    p = child(code, env)
    ids = json.loads(p.stdout.strip().splitlines()[-1])
    # The same runs through `kiln registry runs`.
    kiln_bin = ROOT / "bin" / "kiln"
    if not kiln_bin.exists():
        subprocess.run(["go", "build", "-o", str(kiln_bin), "./cmd/kiln"], cwd=ROOT, check=True)
    out = subprocess.run([str(kiln_bin), "registry", "runs", "--registry", uri], env=env, capture_output=True,
                         text=True, check=True).stdout
    for kind, rid in ids.items():
        assert rid in out and kind in out, out


def test_alias_race_two_processes(reg_env, tmp_path):
    uri, env = reg_env
    child(f"""
        import numpy as np, kiln
        x = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32); y = np.arange(30) % 2
        with kiln.Registry({uri!r}) as reg:
            m = kiln.Sequential([{{"type": "linear"}}]); m.fit(x, y, epochs=1, verbose=0, record=False)
            for _ in range(3):
                m.register("race", registry=reg)
            reg.set_alias("race", "production", 1, expected=0)
    """, env)
    go = tmp_path / "go"
    racer = f"""
        import os, sys, time, kiln
        with kiln.Registry({uri!r}) as reg:
            reg.list_models()  # connected and migrated before the start
            open(sys.argv[1] + ".ready", "w").close()
            while not os.path.exists({str(go)!r}):
                time.sleep(0.001)
            try:
                reg.set_alias("race", "production", int(sys.argv[2]), expected=1, reason="race")
                print("won")
            except kiln.AliasConflictError as e:
                print("lost:", e)
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(racer), str(tmp_path / f"r{to}"), str(to)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for to in (2, 3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"r{to}.ready").exists() for to in (2, 3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [o.strip() for o, _ in outs]
    assert sorted(r.split(":")[0] for r in results) == ["lost", "won"], outs
    winner = (2, 3)[[r.startswith("won") for r in results].index(True)]
    loser = [r for r in results if r.startswith("lost")][0]
    assert f"is at version {winner}" in loser, loser
    # Reading aliases needs no artifacts: this process opens it directly.
    with kiln.Registry(uri) as reg:
        assert reg.get_version_by_alias("race", "production").version == winner
        assert [(e.from_version, e.to_version) for e in reg.alias_history("race", "production")] == [(None, 1), (1, winner)]


def test_tampered_artifact_refused(tmp_path):
    uri = str(tmp_path / "registry.db")
    x, y = data()
    m = kiln.Sequential(LAYERS)
    m.fit(x, y, epochs=1, verbose=0, record=False)
    with kiln.Registry(uri) as reg:
        v = m.register("t", registry=reg)
        assert reg.load("models:/t/1").predict(x[:2]).shape == (2, 3)
        blob = pathlib.Path(reg.artifact_dir) / "sha256" / v.digest
        assert blob.exists()
        raw = bytearray(blob.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        blob.chmod(0o644)
        blob.write_bytes(bytes(raw))
        with pytest.raises(kiln.InternalError) as e:
            reg.load("models:/t/1")
        assert v.digest in str(e.value) and "digest" in str(e.value)


def test_encrypted_round_trip_and_missing_key(tmp_path):
    uri = str(tmp_path / "registry.db")
    key = "11" * 32
    env = {**os.environ, "KILN_HOME": str(tmp_path / "home"), "KILN_REGISTRY_KEY": key}
    env.pop("KILN_REGISTRY_KEY_FILE", None)
    env.pop("KILN_REGISTRY", None)
    p = child(f"""
        import numpy as np, kiln, pathlib
        x = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32); y = np.arange(30) % 2
        m = kiln.Sequential([{{"type": "linear"}}]); m.fit(x, y, epochs=1, verbose=0, record=False)
        with kiln.Registry({uri!r}) as reg:
            v = m.register("secret", registry=reg)
            blob = (pathlib.Path(reg.artifact_dir) / "sha256" / v.digest).read_bytes()
            assert b"model.pt" not in blob and b"manifest.json" not in blob, "artifact stored in clear"
            back = reg.load("models:/secret/1")
            np.testing.assert_allclose(back.predict(x), m.predict(x), rtol=1e-6)
        print("ok")
    """, env)
    assert p.stdout.strip().endswith("ok")
    assert key not in p.stdout + p.stderr
    del env["KILN_REGISTRY_KEY"]
    p = child(f"""
        import kiln
        with kiln.Registry({uri!r}) as reg:
            try:
                reg.load("models:/secret/1")
            except kiln.FailedPreconditionError as e:
                print("refused:", e)
    """, env)
    assert "refused:" in p.stdout and "key" in p.stdout, p.stdout


def test_fit_records_by_default_only_with_a_registry(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "KILN_HOME": str(home)}
    for k in ("KILN_REGISTRY", "KILN_REGISTRY_KEY", "KILN_REGISTRY_KEY_FILE"):
        env.pop(k, None)
    code = """
        import numpy as np, kiln
        x = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32); y = np.arange(30) % 2
        m = kiln.Sequential([{"type": "linear"}]); h = m.fit(x, y, epochs=2, verbose=0)
        print(h.run_id)
    """
    p = child(code, env)
    assert p.stdout.strip() == "None"
    assert not (home / "registry.db").exists(), "fit without a registry wrote one"
    env["KILN_REGISTRY"] = str(tmp_path / "r.db")
    p = child(code, env)
    run_id = p.stdout.strip()
    assert len(run_id) == 32
    with kiln.Registry(tmp_path / "r.db") as reg:
        run = reg.get_run(run_id)
        assert (run.kind, run.status) == ("train", "FINISHED")
        assert run.started_at <= datetime.now(timezone.utc)
    # record=False records nothing even then; register then is a mistake.
    p = child(code.replace("verbose=0)", "verbose=0, record=False)"), env)
    assert p.stdout.strip() == "None"
    with pytest.raises(ValueError, match="record=False"):
        x, y = data()
        kiln.Sequential(LAYERS).fit(x, y, epochs=1, verbose=0, record=False, register="x")


def test_closed_registry_and_bad_uri(tmp_path):
    reg = kiln.Registry(tmp_path / "r.db")
    assert reg.backend == "sqlite" and reg.list_models() == []
    reg.close()
    reg.close()
    with pytest.raises(kiln.KilnError, match="closed"):
        reg.list_models()
    with pytest.raises(kiln.InvalidArgumentError, match="mysql"):
        kiln.Registry("mysql://x/y")
    with pytest.raises(kiln.KilnError, match="registered"):
        kiln.Sequential(LAYERS).register("x", registry=str(tmp_path / "r.db"))


@pytest.fixture
def s3_server(tmp_path):
    """A versitygw S3 server (build/tools/versitygw, which
    scripts/install-deps builds, as internal/testkit runs it for Go) on a
    free loopback port with the bucket "kiln"; yields the AWS environment
    pointing at it."""
    import socket

    binary = os.environ.get("KILN_VERSITYGW") or str(ROOT / "build" / "tools" / "versitygw")
    if not os.path.exists(binary):
        pytest.fail(f"the S3 server versitygw is not installed ({binary}): run scripts/install-deps")
    data_dir = tmp_path / "s3"
    (data_dir / "kiln").mkdir(parents=True)  # a bucket of the POSIX backend is a directory
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = "127.0.0.1:%d" % s.getsockname()[1]
    access, secret = "KILNPYACCESSKEY", "kiln-py-secret-key-0123456789"
    log = open(tmp_path / "versitygw.log", "w")
    proc = subprocess.Popen([binary, "--access", access, "--secret", secret, "--region", "us-east-1",
                             "--port", addr, "--quiet", "posix", str(data_dir)], stdout=log, stderr=log,
                            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(tuple([addr.split(":")[0], int(addr.split(":")[1])]), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("versitygw did not start: " + (tmp_path / "versitygw.log").read_text())
            time.sleep(0.05)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KILN_REGISTRY"))}
    env.update({"AWS_ENDPOINT_URL_S3": "http://" + addr, "AWS_ACCESS_KEY_ID": access,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
                "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true", "KILN_HOME": str(tmp_path / "home")})
    yield env, data_dir
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def test_shared_registry_artifacts_on_s3(postgres, s3_server):
    """kiln.Registry(dsn, artifacts="s3://...") as two servers sharing a
    PostgreSQL registry use it: one registers, the other (a second process,
    the root from $KILN_REGISTRY_ARTIFACTS) loads; errors are Kiln's."""
    env, data_dir = s3_server
    dsn = postgres.new_database()
    p = child(f"""
        import numpy as np, kiln
        x = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32); y = np.arange(30) % 2
        m = kiln.Sequential([{{"type": "linear"}}]); m.fit(x, y, epochs=1, verbose=0, record=False)
        np.save("{data_dir}/../x.npy", x); np.save("{data_dir}/../p.npy", m.predict(x))
        with kiln.Registry({dsn!r}, artifacts="s3://kiln/reg") as reg:
            assert reg.artifact_dir == "s3://kiln/reg", reg.artifact_dir
            v = m.register("iris", registry=reg)
            reg.set_alias("iris", "production", v.version)
            print(v.digest)
    """, env)
    digest = p.stdout.strip().splitlines()[-1]
    blob = data_dir / "kiln" / "reg" / "sha256" / digest
    assert blob.exists(), "the artifact is the object reg/sha256/<hex>"
    p = child(f"""
        import numpy as np, kiln
        x = np.load("{data_dir}/../x.npy")
        with kiln.Registry({dsn!r}) as reg:
            np.testing.assert_allclose(reg.load("models:/iris@production").predict(x), np.load("{data_dir}/../p.npy"), rtol=1e-6)
        try:
            kiln.Registry({dsn!r}, artifacts="s3://absent/x")
        except kiln.FailedPreconditionError as e:
            assert 'bucket "absent" does not exist' in str(e), e
            print("ok")
    """, {**env, "KILN_REGISTRY_ARTIFACTS": "s3://kiln/reg"})
    assert p.stdout.strip().endswith("ok")

    # A corrupt object is refused, never loaded.
    blob.write_bytes(b"not the archive")
    p = child(f"""
        import kiln
        with kiln.Registry({dsn!r}, artifacts="s3://kiln/reg") as reg:
            try:
                reg.load("models:/iris@production")
            except kiln.InternalError as e:
                assert "{digest}" in str(e) and "digest" in str(e), e
                print("ok")
    """, env)
    assert p.stdout.strip().endswith("ok")
    with pytest.raises(kiln.InvalidArgumentError):
        kiln.Registry(dsn, artifacts="s3://Not_A_Bucket/x")
