"""Shared fixtures for Kiln's cross-language tests."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
        [os.environ.get("KILN_PYTHON", "python3"), str(ROOT / "examples/demo/make_model.py"), str(out)],
        check=True,
    )
    return out
