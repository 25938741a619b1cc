-- Kiln's model registry, PostgreSQL. The same tables as SQLite's, with
-- PostgreSQL's types.
CREATE TABLE registered_models (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    description    TEXT NOT NULL DEFAULT '',
    latest_version INTEGER NOT NULL DEFAULT 0,
    created_at     TIMESTAMPTZ NOT NULL,
    created_by     TEXT NOT NULL
);

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    model_name       TEXT NOT NULL DEFAULT '',
    status           TEXT NOT NULL,
    started_at       TIMESTAMPTZ NOT NULL,
    ended_at         TIMESTAMPTZ,
    duration_seconds DOUBLE PRECISION,
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
    value     DOUBLE PRECISION NOT NULL,
    logged_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (run_id, key, step)
);

CREATE TABLE model_versions (
    model_id        BIGINT NOT NULL REFERENCES registered_models (id),
    version         INTEGER NOT NULL,
    digest          TEXT NOT NULL,
    size            BIGINT NOT NULL,
    run_id          TEXT REFERENCES runs (id),
    parent_model_id BIGINT,
    parent_version  INTEGER,
    lineage         TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    created_at      TIMESTAMPTZ NOT NULL,
    created_by      TEXT NOT NULL,
    PRIMARY KEY (model_id, version),
    FOREIGN KEY (parent_model_id, parent_version) REFERENCES model_versions (model_id, version)
);

-- Versions are immutable.
CREATE FUNCTION kiln_model_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'model versions are immutable';
END;
$$;
CREATE TRIGGER model_versions_immutable BEFORE UPDATE ON model_versions
    FOR EACH ROW EXECUTE FUNCTION kiln_model_versions_immutable();
CREATE TRIGGER model_versions_undeletable BEFORE DELETE ON model_versions
    FOR EACH ROW EXECUTE FUNCTION kiln_model_versions_immutable();

CREATE TABLE evaluations (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id   BIGINT NOT NULL,
    version    INTEGER NOT NULL,
    verdict    TEXT NOT NULL,
    evidence   TEXT NOT NULL,
    run_id     TEXT REFERENCES runs (id),
    created_at TIMESTAMPTZ NOT NULL,
    created_by TEXT NOT NULL,
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);

CREATE TABLE aliases (
    model_id   BIGINT NOT NULL REFERENCES registered_models (id),
    alias      TEXT NOT NULL,
    version    INTEGER NOT NULL,
    revision   INTEGER NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (model_id, alias),
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);

CREATE TABLE alias_events (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id      BIGINT NOT NULL REFERENCES registered_models (id),
    alias         TEXT NOT NULL,
    from_version  INTEGER,
    to_version    INTEGER,
    actor         TEXT NOT NULL,
    reason        TEXT NOT NULL DEFAULT '',
    verdict       TEXT NOT NULL DEFAULT '',
    evaluation_id BIGINT REFERENCES evaluations (id),
    at            TIMESTAMPTZ NOT NULL
);
CREATE INDEX alias_events_alias ON alias_events (model_id, alias, id);
