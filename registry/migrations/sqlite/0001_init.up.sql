-- Kiln's model registry, SQLite. Times are UTC text with nine fractional
-- digits (they sort as they compare); JSON is text.
CREATE TABLE registered_models (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    description    TEXT NOT NULL DEFAULT '',
    latest_version INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT NOT NULL,
    created_by     TEXT NOT NULL
);

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    model_name       TEXT NOT NULL DEFAULT '',
    status           TEXT NOT NULL,
    started_at       TEXT NOT NULL,
    ended_at         TEXT,
    duration_seconds REAL,
    error            TEXT NOT NULL DEFAULT '',
    final_metrics    TEXT NOT NULL DEFAULT '{}',
    created_by       TEXT NOT NULL
);
CREATE INDEX runs_model_started ON runs (model_name, started_at);

CREATE TABLE run_params (
    run_id TEXT NOT NULL REFERENCES runs (id),
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);

CREATE TABLE run_metrics (
    run_id    TEXT NOT NULL REFERENCES runs (id),
    key       TEXT NOT NULL,
    step      INTEGER NOT NULL,
    value     REAL NOT NULL,
    logged_at TEXT NOT NULL,
    PRIMARY KEY (run_id, key, step)
);

CREATE TABLE model_versions (
    model_id        INTEGER NOT NULL REFERENCES registered_models (id),
    version         INTEGER NOT NULL,
    digest          TEXT NOT NULL,
    size            INTEGER NOT NULL,
    run_id          TEXT REFERENCES runs (id),
    parent_model_id INTEGER,
    parent_version  INTEGER,
    lineage         TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    created_at      TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    PRIMARY KEY (model_id, version),
    FOREIGN KEY (parent_model_id, parent_version) REFERENCES model_versions (model_id, version)
);

-- Versions are immutable.
CREATE TRIGGER model_versions_immutable BEFORE UPDATE ON model_versions
BEGIN
    SELECT RAISE(ABORT, 'model versions are immutable');
END;
CREATE TRIGGER model_versions_undeletable BEFORE DELETE ON model_versions
BEGIN
    SELECT RAISE(ABORT, 'model versions are immutable');
END;

CREATE TABLE evaluations (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id   INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    verdict    TEXT NOT NULL,
    evidence   TEXT NOT NULL,
    run_id     TEXT REFERENCES runs (id),
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);

CREATE TABLE aliases (
    model_id   INTEGER NOT NULL REFERENCES registered_models (id),
    alias      TEXT NOT NULL,
    version    INTEGER NOT NULL,
    revision   INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (model_id, alias),
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);

CREATE TABLE alias_events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id      INTEGER NOT NULL REFERENCES registered_models (id),
    alias         TEXT NOT NULL,
    from_version  INTEGER,
    to_version    INTEGER,
    actor         TEXT NOT NULL,
    reason        TEXT NOT NULL DEFAULT '',
    verdict       TEXT NOT NULL DEFAULT '',
    evaluation_id INTEGER REFERENCES evaluations (id),
    at            TEXT NOT NULL
);
CREATE INDEX alias_events_alias ON alias_events (model_id, alias, id);
