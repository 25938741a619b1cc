"""Builds the kiln Python package: the Go core (bindings/) compiled by gopy
into a CPython extension for the interpreter running this build, plus the
pure-Python API in python/kiln.

    pip install .            # Go >= 1.26 and libtorch as for `make build`
    pip wheel .              # a wheel for this interpreter
    LIBTORCH=/path/to/torch pip install .   # link another libtorch

The Go side builds against LIBTORCH's libtorch when it is set; else, when the
building interpreter has a pip `torch` (a package directory with include/
and lib/), against that torch's own libtorch, so that `import torch` and
`import kiln` load one libtorch in one process; else against Debian's
(scripts/env.sh). KILN_LIBTORCH=system skips the pip torch detection.
"""
import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
GOPY_NAME = "kilngo"  # gopy ignores names starting with "_" (Go skips such files)


def kiln_version() -> str:
    for line in (ROOT / "core" / "threads.go").read_text().splitlines():
        if line.startswith("const Version"):
            return line.split('"')[1]
    raise RuntimeError("Version not found in core/threads.go")


def pip_torch_dir():
    """The package directory of the interpreter's pip-installed torch when
    it carries a libtorch tree (include/torch/script.h and lib/libtorch.so,
    as scripts/env.sh needs for LIBTORCH), else None. Debian's python3-torch
    lives in dist-packages and uses the system libtorch that env.sh picks by
    default, so it is not taken."""
    if os.environ.get("KILN_LIBTORCH") == "system":
        return None
    # pip builds in an isolated environment that hides the target's
    # site-packages: ask the same interpreter in isolated mode (-I: its own
    # sys.path, without the build's PYTHONPATH overlay) where torch lies.
    # find_spec locates the package without importing it.
    probe = ("import importlib.util as u; s = u.find_spec('torch'); "
             "print(list(s.submodule_search_locations or [''])[0] if s else '')")
    try:
        where = subprocess.run([sys.executable, "-I", "-c", probe], check=True, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    if not where:
        return None
    d = pathlib.Path(where).resolve()
    if "dist-packages" in d.parts:
        return None
    if (d / "include" / "torch" / "script.h").exists() and (d / "lib" / "libtorch.so").exists():
        return d
    return None


def build_env() -> dict:
    """The environment `make build` uses (cgo flags for libtorch), plus what
    gopy's generated cgo needs."""
    env = dict(os.environ)
    if not env.get("LIBTORCH"):
        torch_dir = pip_torch_dir()
        if torch_dir is not None:
            print(f"kiln: linking the pip torch's libtorch in {torch_dir} (KILN_LIBTORCH=system to skip)")
            env["LIBTORCH"] = str(torch_dir)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "env.sh"), "--print"], check=True, capture_output=True, text=True, env=env
    ).stdout
    for line in out.splitlines():
        name, _, value = line[len("export "):].partition("=")
        env[name] = value.strip("'")
    # gopy writes Python's own link flags (e.g. -fwrapv) into #cgo lines.
    env["CGO_LDFLAGS_ALLOW"] = ".*"
    env["CGO_CFLAGS_ALLOW"] = ".*"
    # gopy replaces CGO_LDFLAGS for its final link: carry a LIBTORCH's
    # library path and rpath through the linker's environment instead.
    if env.get("LIBTORCH"):
        lib = str(pathlib.Path(env["LIBTORCH"]).resolve() / "lib")
        env["LIBRARY_PATH"] = lib + os.pathsep + env.get("LIBRARY_PATH", "")
        env["LD_RUN_PATH"] = lib
    return env


def generate_grpc_stubs(dest: pathlib.Path) -> None:
    """Generates the KServe v2 gRPC stubs for kiln.Client from proto/ into
    dest (the kiln._proto package) with the build's grpcio-tools."""
    from grpc_tools import protoc

    dest.mkdir(parents=True, exist_ok=True)
    protos = ["model_config.proto", "grpc_service.proto"]
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
            f"--python_out={dest}", f"--grpc_python_out={dest}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("kiln: generating gRPC stubs from proto/ failed")
    # protoc writes top-level imports between the generated modules; make
    # them relative so that they resolve inside the package.
    # tritonclient registers the same protocol (package "inference") in
    # protobuf's default descriptor pool; ours goes into a private pool so
    # that both clients can live in one process.
    for f in dest.glob("*_pb2*.py"):
        text = f.read_text()
        for mod in ("model_config_pb2", "grpc_service_pb2"):
            text = text.replace(f"import {mod} as", f"from . import {mod} as")
        if "_descriptor_pool.Default()" in text:
            text = text.replace("_descriptor_pool.Default()", "_KILN_POOL")
            text = text.replace("from google.protobuf.internal import builder as _builder\n",
                                "from google.protobuf.internal import builder as _builder\n"
                                "from . import POOL as _KILN_POOL\n", 1)
        f.write_text(text)
    shutil.copy2(ROOT / "python" / "kiln" / "_proto" / "__init__.py", dest / "__init__.py")


class GopyBuildExt(build_ext):
    """Runs `go tool gopy build` and places its output in kiln/_native;
    generates the gRPC stubs into kiln/_proto."""

    def run(self):
        for ext in self.extensions:
            self.build_gopy(ext)
            generate_grpc_stubs(pathlib.Path(self.get_ext_fullpath(ext.name)).parent.parent / "_proto")

    def build_gopy(self, ext):
        if shutil.which("go") is None and not pathlib.Path("/usr/local/go/bin/go").exists():
            raise RuntimeError("kiln: building needs Go >= 1.26 on PATH (run scripts/install-deps)")
        dest = pathlib.Path(self.get_ext_fullpath(ext.name)).parent
        # gopy's output directory must lie inside the Go module.
        work = ROOT / "build" / "_gopy" / f"py{sys.version_info[0]}{sys.version_info[1]}"
        if work.exists():
            shutil.rmtree(work)
        cmd = [
            "go", "tool", "gopy", "build",
            f"-vm={sys.executable}", f"-output={work}", f"-name={GOPY_NAME}",
            "-dynamic-link=true", "-no-make=true", "./bindings",
        ]
        self.announce("kiln: " + " ".join(cmd), level=2)
        subprocess.run(cmd, cwd=ROOT, env=build_env(), check=True)
        sos = list(work.glob(f"_{GOPY_NAME}*.so"))
        if not sos:
            raise RuntimeError(f"kiln: gopy produced no extension in {work}")
        dest.mkdir(parents=True, exist_ok=True)
        for f in [*sos, work / "go.py", work / "bindings.py"]:
            shutil.copy2(f, dest / f.name)
        (dest / "__init__.py").write_text('"""gopy-generated bindings over Kiln\'s Go core (bindings/)."""\n')


setup(
    name="kiln",
    version=kiln_version(),
    description="Kiln: train, optimize, deploy and serve PyTorch-family models (Go core over libtorch)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    package_dir={"": "python"},
    packages=["kiln", "kiln._native", "kiln._proto"],
    ext_modules=[Extension(f"kiln._native._{GOPY_NAME}", sources=[])],
    cmdclass={"build_ext": GopyBuildExt},
    install_requires=["numpy>=1.21", "grpcio>=1.71", "protobuf>=6.30,<7"],
    zip_safe=False,
)
