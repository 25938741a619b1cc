"""Shared fixtures for Kiln's cross-language tests."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# PYTHON is the interpreter with torch that fixture scripts run with:
# $KILN_PYTHON, else the one running the tests.
PYTHON = os.environ.get("KILN_PYTHON", sys.executable)


def make_fixture(name, out) -> pathlib.Path:
    """Writes fixture name of tests/fixtures/kiln_fixtures.py (serving-repo,
    flight-repo, torch-models, datasets, ...) into directory out, with
    PYTHON, and returns out as a Path."""
    subprocess.run([PYTHON, str(ROOT / "tests/fixtures/kiln_fixtures.py"), name, str(out)], check=True)
    return pathlib.Path(out)


@pytest.fixture(scope="session")
def kiln_bin() -> pathlib.Path:
    """The kiln CLI, built by `make build` (or built here when missing)."""
    path = ROOT / "bin" / "kiln"
    if not path.exists():
        subprocess.run(["go", "build", "-o", str(path), "./cmd/kiln"], cwd=ROOT, check=True)
    return path


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> pathlib.Path:
    """The demo's iris classifier, exported by Python torch into a temp dir."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [PYTHON, str(ROOT / "examples/demo/make_model.py"), str(out)],
        check=True,
    )
    return out
