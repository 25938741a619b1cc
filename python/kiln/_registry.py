"""Kiln's model registry from Python: ``kiln.Registry``, with MLflow's
names (registered model, model version, run, alias). The registry itself
is Go's (package registry): SQLite by default, PostgreSQL by DSN; this
module turns its answers into plain Python objects."""
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional, Union

from ._errors import FailedPreconditionError, KilnError, translate
from ._native import bindings as _b


class AliasConflictError(FailedPreconditionError):
    """A compare-and-swap on an alias lost: another writer moved the alias
    first, so it was not where ``expected`` said (FAILED_PRECONDITION).
    The message says where the alias is now."""


def _time(s: Optional[str]) -> Optional[datetime]:
    """An RFC 3339 time from Go as an aware datetime in UTC (None for
    None). Go writes up to nanoseconds; datetime keeps microseconds."""
    if not s:
        return None
    s = s.replace("Z", "+00:00")
    head, sep, rest = s.partition(".")
    if sep:  # trim the fraction to 6 digits: fromisoformat takes no more
        digits = len(rest) - len(rest.lstrip("0123456789"))
        rest = rest[:min(digits, 6)].ljust(6, "0") + rest[digits:]
        s = head + "." + rest
    return datetime.fromisoformat(s).astimezone(timezone.utc)


@dataclass(frozen=True)
class ModelVersion:
    """One immutable version of a registered model.

    name, version: the registered model and the version number (1, 2, ...).
    digest: the hex SHA-256 of the stored artifact (the package archive);
    size: its bytes. run_id: the run that made it ("" when none). parent:
    the version it was derived from, as "models:/NAME/VERSION" (None when
    none). lineage: what it came from (data fingerprint, spec,
    hyperparameters, preprocessing, optimization report, metrics, ...), a
    dict. created_at: a datetime in UTC; created_by: who registered it.
    aliases: the aliases pointing at it. description: free text."""

    name: str
    version: int
    digest: str
    size: int
    run_id: str
    parent: Optional[str]
    lineage: dict
    created_at: datetime
    created_by: str
    aliases: List[str] = field(default_factory=list)
    description: str = ""

    @property
    def uri(self) -> str:
        """models:/NAME/VERSION."""
        return f"models:/{self.name}/{self.version}"

    @classmethod
    def _from(cls, d: dict) -> "ModelVersion":
        p = d.get("parent")
        return cls(name=d["model"], version=d["version"], digest=d["digest"], size=d["size"],
                   run_id=d.get("run_id", ""), parent=f"models:/{p['model']}/{p['version']}" if p else None,
                   lineage=d.get("lineage") or {}, created_at=_time(d["created_at"]), created_by=d["created_by"],
                   aliases=list(d.get("aliases") or []), description=d.get("description", ""))


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model: name, latest_version (0: none yet), aliases
    (alias -> version), created_at (UTC), created_by, description."""

    name: str
    latest_version: int
    aliases: Dict[str, int]
    created_at: datetime
    created_by: str
    description: str = ""

    @classmethod
    def _from(cls, d: dict) -> "RegisteredModel":
        return cls(name=d["name"], latest_version=d["latest_version"], aliases=dict(d.get("aliases") or {}),
                   created_at=_time(d["created_at"]), created_by=d["created_by"], description=d.get("description", ""))


@dataclass(frozen=True)
class Metric:
    """One logged metric value: key, step (an epoch; a variant's index for
    an optimization), value, at (UTC)."""

    key: str
    step: int
    value: float
    at: datetime


@dataclass(frozen=True)
class Run:
    """A recorded job (MLflow's run).

    run_id: 32 hex digits. kind: "train", "select", "optimize", ...
    model: the registered model it was for ("" when none). status:
    "RUNNING", "FINISHED", "FAILED" or "KILLED". params: name -> text.
    metrics: the final metrics, name -> float. started_at, ended_at: UTC
    datetimes (ended_at None while running). duration: seconds (0 while
    running). error: why it failed. created_by: who ran it. history: the
    metrics logged per step (get_run fills it; list_runs leaves it
    empty)."""

    run_id: str
    kind: str
    model: str
    status: str
    params: Dict[str, str]
    metrics: Dict[str, float]
    started_at: datetime
    ended_at: Optional[datetime]
    duration: float
    error: str
    created_by: str
    history: List[Metric] = field(default_factory=list)

    @classmethod
    def _from(cls, d: dict, history=()) -> "Run":
        return cls(run_id=d["run_id"], kind=d["kind"], model=d.get("model", ""), status=d["status"],
                   params=dict(d.get("params") or {}), metrics=dict(d.get("metrics") or {}),
                   started_at=_time(d["started_at"]), ended_at=_time(d.get("ended_at")),
                   duration=d.get("seconds", 0.0), error=d.get("error", ""), created_by=d["created_by"],
                   history=[Metric(m["key"], m["step"], m["value"], _time(m["at"])) for m in history])


@dataclass(frozen=True)
class AliasEvent:
    """One move of an alias, as the audit history keeps it: id, model,
    alias, from_version and to_version (None: the alias did not exist /
    was removed), actor, reason, verdict (an evaluation gate's), at
    (UTC)."""

    id: int
    model: str
    alias: str
    from_version: Optional[int]
    to_version: Optional[int]
    actor: str
    reason: str
    verdict: str
    at: datetime

    @classmethod
    def _from(cls, d: dict) -> "AliasEvent":
        return cls(id=d["id"], model=d["model"], alias=d["alias"], from_version=d.get("from") or None,
                   to_version=d.get("to") or None, actor=d["actor"], reason=d.get("reason", ""),
                   verdict=d.get("verdict", ""), at=_time(d["at"]))


class Registry:
    """Kiln's model registry (MLflow's names: registered models, immutable
    versions, runs, aliases).

    uri: a SQLite file path, ``sqlite://PATH`` or ``postgres://...``; None
    opens what ``kiln`` opens: ``$KILN_REGISTRY``, else
    ``$KILN_HOME/registry.db`` (KILN_HOME defaulting to ~/.kiln).

    artifacts: the artifact root, a directory or ``s3://bucket/prefix``
    (objects in S3-compatible storage; endpoint, region and credentials
    from the AWS environment: ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``,
    ``AWS_ACCESS_KEY_ID``, ..., ``KILN_S3_PATH_STYLE``); None:
    ``$KILN_REGISTRY_ARTIFACTS``, else ``artifacts/`` beside a SQLite file
    and ``$KILN_HOME/artifacts`` for PostgreSQL. Servers sharing a
    PostgreSQL registry share this root. A missing bucket or refused
    credentials raise ``FailedPreconditionError``, an unreachable endpoint
    ``UnavailableError``.
    Artifacts are encrypted (AES-256-GCM) with the key in
    ``$KILN_REGISTRY_KEY`` or ``$KILN_REGISTRY_KEY_FILE`` when one is set.

    Use it as a context manager, or call ``close()``, to release the
    database. Errors are Kiln's exceptions: an unknown model, version,
    alias or run is a ``NotFoundError`` (a ``LookupError``); a lost
    compare-and-swap an ``AliasConflictError``; a tampered artifact an
    ``InternalError`` naming its digest; an encrypted artifact without
    the key a ``FailedPreconditionError``.

    >>> with kiln.Registry() as reg:
    ...     v = model.register("iris", registry=reg)
    ...     reg.set_alias("iris", "production", v.version)
    ...     prod = reg.load("models:/iris@production")
    """

    def __init__(self, uri: Optional[Union[str, os.PathLike]] = None, *,
                 artifacts: Optional[Union[str, os.PathLike]] = None):
        self.uri = os.fspath(uri) if uri is not None else None
        self.artifacts = os.fspath(artifacts) if artifacts is not None else None
        self._h = self._call(_b.OpenRegistry, self.uri or "", self.artifacts or "", handle=False)
        info = json.loads(self._h.InfoJSON())
        self.backend: str = info["backend"]
        self.artifact_dir: str = info["artifacts"]

    def _call(self, fn, *args, handle=True):
        if handle and self._h is None:
            raise KilnError("the registry is closed")
        try:
            return fn(*args)
        except RuntimeError as e:
            raise translate(e, KilnError) from None

    def _json(self, method: str, *args):
        if self._h is None:
            raise KilnError("the registry is closed")
        return json.loads(self._call(getattr(self._h, method), *args))

    # Registered models and versions.

    def list_models(self) -> List[RegisteredModel]:
        """Every registered model, by name."""
        return [RegisteredModel._from(d) for d in self._json("ModelsJSON") or []]

    def get_model(self, name: str) -> RegisteredModel:
        """One registered model; NotFoundError names the ones there are."""
        return RegisteredModel._from(self._json("ModelJSON", name))

    def list_versions(self, name: str) -> List[ModelVersion]:
        """A model's versions, newest first (as MLflow lists them)."""
        return [ModelVersion._from(d) for d in self._json("VersionsJSON", name) or []]

    def get_version(self, name: str, version: int) -> ModelVersion:
        """Version ``version`` (an int >= 1) of model ``name``."""
        return ModelVersion._from(self._json("VersionJSON", name, int(version)))

    def get_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        """The version alias ``alias`` of model ``name`` points at."""
        return ModelVersion._from(self._json("ResolveJSON", f"models:/{name}@{alias}"))

    def resolve(self, ref: str) -> ModelVersion:
        """The version a model URI names: ``models:/NAME/VERSION``,
        ``models:/NAME@ALIAS`` or ``models:/NAME/latest``."""
        return ModelVersion._from(self._json("ResolveJSON", ref))

    def register(self, model, name: str, *, run_id: str = "", parent: Optional[str] = None,
                 description: str = "", actor: str = "", lineage: Optional[dict] = None) -> ModelVersion:
        """Stores a model package as the next immutable version of
        registered model ``name`` (created when new) and returns it.

        model: a package directory (path) or a ``kiln.Model`` trained,
        loaded from a package or optimized (see ``Model.register``, which
        fills run_id and parent from what the model knows). run_id: the
        run that made it. parent: the version it derives from,
        ``models:/NAME/VERSION`` (an optimized variant's source). lineage:
        fields added to what the manifest records (e.g.
        ``{"dataset_version": "..."}``). actor: who registers it (default:
        the OS user)."""
        from ._model import Model

        if isinstance(model, Model):
            return model.register(name, registry=self, run_id=run_id or None, parent=parent,
                                  description=description, actor=actor, lineage=lineage)
        opts = {"run_id": run_id, "description": description, "actor": actor}
        if parent:
            opts["parent"] = _parse_ref(parent)
        if lineage:
            opts["lineage"] = lineage
        return ModelVersion._from(self._json("Register", name, os.path.abspath(os.fspath(model)), json.dumps(opts)))

    def download(self, ref: str, dst: Union[str, os.PathLike]) -> ModelVersion:
        """Writes the package of the version ``ref`` names (a model URI)
        into the directory dst, which must not exist, after verifying its
        SHA-256 (and decrypting it); returns the version."""
        return ModelVersion._from(self._json("Fetch", ref, os.path.abspath(os.fspath(dst))))

    def load(self, ref: str):
        """Loads the version a model URI names (``models:/NAME/VERSION``,
        ``models:/NAME@ALIAS``, ``models:/NAME/latest``) as a
        ``kiln.Model``: its artifact's digest verified (a mismatch is an
        InternalError naming the digest) and decrypted with the registry
        key. The model's ``registered`` attribute is the ModelVersion, so
        an optimized variant of it registers with it as parent."""
        from ._model import load

        tmp = tempfile.mkdtemp(prefix="kiln-registry-")
        pkg = os.path.join(tmp, "package")
        v = self.download(ref, pkg)
        m = load(pkg)
        m.registered = v
        m.run_id = v.run_id or None
        return m

    # Aliases.

    def set_alias(self, name: str, alias: str, version: int, *, expected: Optional[int] = None,
                  reason: str = "", actor: str = "") -> AliasEvent:
        """Points alias ``alias`` of model ``name`` at ``version`` by
        compare-and-swap, recording the move (who, when, from -> to,
        reason) in the alias history, and returns that event.

        expected: the version the alias must point at now (0: the alias
        must not exist yet); None reads where it is now and swaps from
        there. When another writer moved it in between, nothing changes
        and ``AliasConflictError`` says where it is."""
        return self._move(name, alias, int(version), expected, reason, actor)

    def delete_alias(self, name: str, alias: str, *, expected: Optional[int] = None, reason: str = "",
                     actor: str = "") -> AliasEvent:
        """Removes an alias by compare-and-swap (expected as in
        set_alias); the removal is an event of its history."""
        return self._move(name, alias, 0, expected, reason, actor)

    def _move(self, name, alias, to, expected, reason, actor) -> AliasEvent:
        if expected is None:
            expected = -1
        elif int(expected) < 0:
            raise ValueError(f"expected must be a version >= 1, 0 (no alias yet) or None, got {expected}")
        res = self._json("SetAlias", name, alias, to, int(expected), actor, reason)
        if "conflict" in res:
            err = AliasConflictError(res["conflict"])
            err.code = "FAILED_PRECONDITION"
            raise err
        return AliasEvent._from(res["event"])

    def alias_history(self, name: str, alias: Optional[str] = None) -> List[AliasEvent]:
        """The moves of one alias (every alias of the model when None),
        oldest first."""
        return [AliasEvent._from(d) for d in self._json("HistoryJSON", name, alias or "") or []]

    # Runs.

    def list_runs(self, model: Optional[str] = None, limit: int = 0) -> List[Run]:
        """Runs, newest first: those for registered model ``model`` when
        given, at most ``limit`` when > 0."""
        return [Run._from(d) for d in self._json("RunsJSON", model or "", int(limit)) or []]

    def get_run(self, run_id: str) -> Run:
        """One run with its per-step metric history."""
        d = self._json("RunJSON", run_id)
        return Run._from(d["run"], d.get("history") or [])

    # Lifetime.

    def close(self) -> None:
        """Closes the database (idempotent)."""
        if self._h is not None:
            h, self._h = self._h, None
            try:
                h.Close()
            except RuntimeError as e:
                raise translate(e, KilnError) from None

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        where = self.uri or "default"
        return f"kiln.Registry({where!r}, {getattr(self, 'backend', '?')}{', closed' if self._h is None else ''})"


def _parse_ref(ref: str) -> dict:
    """{"model", "version"} of models:/NAME/VERSION."""
    rest = ref[len("models:/"):] if ref.startswith("models:/") else None
    name, _, ver = (rest or "").rpartition("/")
    if not name or not ver.isdigit() or int(ver) < 1:
        raise ValueError(f"parent must be models:/NAME/VERSION, got {ref!r}")
    return {"model": name, "version": int(ver)}


def record_spec(record: Optional[bool], register: Optional[str], registry) -> str:
    """How a Python job is recorded, as JSON for the bindings, or "" for
    not at all. record None (the default) records when a registry is
    given, ``register`` is set or ``$KILN_REGISTRY`` names one (as the
    kiln command does); True always (the default registry when none is
    given); False never (register then fails: nothing to register
    with)."""
    if record is False:
        if register:
            raise ValueError("register needs the run recorded: drop record=False")
        return ""
    if record is None and registry is None and not register:
        try:
            if not _b.RegistryConfigured():
                return ""
        except RuntimeError as e:
            raise translate(e, KilnError) from None
    uri = registry.uri if isinstance(registry, Registry) else registry
    artifacts = registry.artifacts if isinstance(registry, Registry) else None
    return json.dumps({"registry": os.fspath(uri) if uri else "", "artifacts": artifacts or "",
                       "model": register or ""})


def open_for(registry):
    """(Registry, close_after) for a registry argument: a Registry (kept
    open), a URI (opened, to close after) or None (the default)."""
    if isinstance(registry, Registry):
        return registry, False
    return Registry(registry), True
