"""kiln.pipeline_run: `kiln pipeline run` from Python (package pipeline in
the Go core, run as a Go job that Python polls)."""
import json
import os
from typing import Callable, Optional

from ._native import bindings as _b
from ._train import _run_job


def pipeline_run(path, *, registry: Optional[str] = None, registry_artifacts: Optional[str] = None,
                 runs_dir: Optional[str] = None,
                 resume: Optional[str] = None, actor: Optional[str] = None,
                 progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Runs the pipeline file at path — data, preprocess, train/select,
    optimize, evaluate against the alias (production), register, promote —
    as `kiln pipeline run PATH` does, and returns its result: a dict with
    run_id, model, trained and candidate ({"model", "version"}), verdict
    ("PROMOTE", "HOLD" or "REJECT"), reason, first (no version at the alias
    before), alias, baseline and serving (the alias's version before and
    after; 0: none), promoted (bool) and evaluation_id.

    registry: a SQLite file or postgres://... DSN (default $KILN_REGISTRY,
    else $KILN_HOME/registry.db); registry_artifacts: its artifact root, a
    directory or s3://bucket/prefix (default $KILN_REGISTRY_ARTIFACTS, else
    beside a SQLite file, $KILN_HOME/artifacts for PostgreSQL); runs_dir:
    the run directories (default $KILN_HOME/pipelines); resume: the id of an interrupted run of this file
    to continue from its first unfinished stage; actor: who runs it (default
    the OS user). progress, when given, receives each progress event (a
    dict: run_id, stage, index, stages, message, and epoch, epochs and
    metrics for an epoch).

    The GIL is free while the pipeline runs; Ctrl-C cancels it (the run is
    recorded KILLED). Raises kiln.InvalidArgumentError for a bad pipeline
    file (naming the line and the field) or data whose columns do not fit,
    before any work; kiln.NotFoundError for a missing file;
    kiln.FailedPreconditionError for a run that cannot resume; KilnError
    (by its code) when a stage fails."""
    opts = {"registry": registry and os.fspath(registry),
            "registry_artifacts": registry_artifacts and os.fspath(registry_artifacts),
            "runs_dir": runs_dir and os.fspath(runs_dir),
            "resume": resume, "actor": actor}
    def on_event(e, _bar):
        if progress is not None:
            progress(e)

    report, _ = _run_job(lambda: _b.StartPipeline(os.fspath(path), json.dumps({k: v for k, v in opts.items() if v})),
                         None, on_event)
    return report
