package registry

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
)

// Model is a registered model: a name under which versions are numbered
// 1, 2, ...
type Model struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	// LatestVersion is the highest version number (0: none yet).
	LatestVersion int       `json:"latest_version"`
	CreatedAt     time.Time `json:"created_at"`
	CreatedBy     string    `json:"created_by"`
	// Aliases maps each alias to the version it points at.
	Aliases map[string]int `json:"aliases,omitempty"`
}

// Ref names one model version.
type Ref struct {
	Model   string `json:"model"`
	Version int    `json:"version"`
}

// String is models:/NAME/VERSION.
func (r Ref) String() string { return fmt.Sprintf("models:/%s/%d", r.Model, r.Version) }

// Lineage is what a version came from: the data, the network, the
// hyper-parameters, the preprocessing, the optimization and the metrics,
// read from the package's manifest (LineageOf), plus what only the caller
// knows (a Flight dataset's version, a source TorchScript file).
type Lineage struct {
	// DataSHA256 is the training table's fingerprint; DataSource where it
	// was read from; DatasetVersion a Flight dataset's version, if any.
	DataSHA256     string `json:"data_sha256,omitempty"`
	DataSource     string `json:"data_source,omitempty"`
	DatasetVersion string `json:"dataset_version,omitempty"`
	Rows           int    `json:"rows,omitempty"`
	// Spec is the network spec (core/nn); SourceTorchScript a TorchScript
	// file the model came from instead.
	Spec              json.RawMessage `json:"spec,omitempty"`
	SourceTorchScript string          `json:"source_torchscript,omitempty"`
	Hyperparameters   json.RawMessage `json:"hyperparameters,omitempty"`
	Preprocessing     json.RawMessage `json:"preprocessing,omitempty"`
	// Optimization is core/optimize's record with its report.
	Optimization json.RawMessage `json:"optimization,omitempty"`
	// Metrics maps a split to metric to value.
	Metrics map[string]map[string]float64 `json:"metrics,omitempty"`
	Task    string                        `json:"task,omitempty"`
	// KilnVersion and TorchVersion made the package.
	KilnVersion  string `json:"kiln_version,omitempty"`
	TorchVersion string `json:"torch_version,omitempty"`
}

// LineageOf reads the lineage a package's manifest records.
func LineageOf(m modelpkg.Manifest) Lineage {
	l := Lineage{
		DataSHA256: m.Lineage.DataSHA256, DataSource: m.Lineage.DataSource, Rows: m.Lineage.Rows,
		Hyperparameters: m.Lineage.Hyperparameters, Optimization: m.Optimization, Metrics: m.Metrics,
		Task: string(m.Task), KilnVersion: m.Lineage.KilnVersion, TorchVersion: m.Lineage.TorchVersion,
	}
	if b, err := json.Marshal(m.Spec); err == nil && string(b) != "null" {
		l.Spec = b
	}
	if m.Preprocessing != nil {
		if b, err := json.Marshal(m.Preprocessing); err == nil {
			l.Preprocessing = b
		}
	}
	return l
}

// Version is one immutable model version.
type Version struct {
	Model   string `json:"model"`
	Version int    `json:"version"`
	// Digest is the artifact's hex SHA-256, Size its bytes.
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
	// RunID is the run that made it, if recorded.
	RunID string `json:"run_id,omitempty"`
	// Parent is the version it was derived from (an optimized variant's
	// source), if any.
	Parent      *Ref      `json:"parent,omitempty"`
	Lineage     Lineage   `json:"lineage"`
	Description string    `json:"description,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
	CreatedBy   string    `json:"created_by"`
	// Aliases point at this version.
	Aliases []string `json:"aliases,omitempty"`
}

// Ref names v.
func (v Version) Ref() Ref { return Ref{v.Model, v.Version} }

// CreateModel registers a model without versions. An existing name is
// AlreadyExists.
func (r *Registry) CreateModel(ctx context.Context, name, description, actor string) (Model, error) {
	if err := checkModelName(name); err != nil {
		return Model{}, err
	}
	now := time.Now().UTC()
	_, err := r.db.ExecContext(ctx, r.q(`INSERT INTO registered_models (name, description, created_at, created_by) VALUES (?, ?, ?, ?)`),
		name, description, r.ts(now), actorOr(actor))
	if isUnique(err) {
		return Model{}, core.Errorf(core.AlreadyExists, "registry: model %q already exists", name)
	}
	if err != nil {
		return Model{}, dbErr(err, "create model %q", name)
	}
	return r.Model(ctx, name)
}

// Model returns a registered model with its aliases; an unknown name is
// NotFound.
func (r *Registry) Model(ctx context.Context, name string) (Model, error) {
	ms, err := r.models(ctx, name)
	if err != nil {
		return Model{}, err
	}
	if len(ms) == 0 {
		return Model{}, r.notFoundModel(ctx, name)
	}
	return ms[0], nil
}

// Models returns every registered model, by name.
func (r *Registry) Models(ctx context.Context) ([]Model, error) { return r.models(ctx, "") }

func (r *Registry) models(ctx context.Context, name string) ([]Model, error) {
	query := `SELECT name, description, latest_version, created_at, created_by FROM registered_models`
	var args []any
	if name != "" {
		query += ` WHERE name = ?`
		args = append(args, name)
	}
	rows, err := r.db.QueryContext(ctx, r.q(query+` ORDER BY name`), args...)
	if err != nil {
		return nil, dbErr(err, "list models")
	}
	defer rows.Close()
	var out []Model
	for rows.Next() {
		var m Model
		var at dbTime
		if err := rows.Scan(&m.Name, &m.Description, &m.LatestVersion, &at, &m.CreatedBy); err != nil {
			return nil, dbErr(err, "list models")
		}
		m.CreatedAt = at.T
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		return nil, dbErr(err, "list models")
	}
	aq := `SELECT m.name, a.alias, a.version FROM aliases a JOIN registered_models m ON m.id = a.model_id`
	if name != "" {
		aq += ` WHERE m.name = ?`
	}
	arows, err := r.db.QueryContext(ctx, r.q(aq), args...)
	if err != nil {
		return nil, dbErr(err, "list aliases")
	}
	defer arows.Close()
	idx := map[string]int{}
	for i, m := range out {
		idx[m.Name] = i
	}
	for arows.Next() {
		var mn, alias string
		var v int
		if err := arows.Scan(&mn, &alias, &v); err != nil {
			return nil, dbErr(err, "list aliases")
		}
		if i, ok := idx[mn]; ok {
			if out[i].Aliases == nil {
				out[i].Aliases = map[string]int{}
			}
			out[i].Aliases[alias] = v
		}
	}
	return out, dbErr(arows.Err(), "list aliases")
}

// notFoundModel is the NotFound error for an unknown model, listing up to
// ten known names.
func (r *Registry) notFoundModel(ctx context.Context, name string) error {
	if err := checkModelName(name); err != nil {
		return err
	}
	var names []string
	if rows, err := r.db.QueryContext(ctx, `SELECT name FROM registered_models ORDER BY name LIMIT 10`); err == nil {
		for rows.Next() {
			var n string
			if rows.Scan(&n) == nil {
				names = append(names, n)
			}
		}
		rows.Close()
	}
	if len(names) == 0 {
		return core.Errorf(core.NotFound, "registry: model %q not found (the registry has no models)", name)
	}
	return core.Errorf(core.NotFound, "registry: model %q not found (models: %s)", name, strings.Join(names, ", "))
}

// RegisterOptions describe a new version beyond its package.
type RegisterOptions struct {
	// RunID is the run that made the package (must exist), if any.
	RunID string
	// Parent is the version the package was derived from, if any.
	Parent *Ref
	// Lineage adds what the manifest cannot know (DatasetVersion,
	// SourceTorchScript); its other fields, when set, override the
	// manifest's.
	Lineage Lineage
	// Description is free text.
	Description string
	// Actor registers it (a user or a token's name).
	Actor string
}

// RegisterVersion stores the model package in pkgDir as the next version
// of the registered model name, creating the model when it is new: the
// package (its manifest validated) is archived, stored content-addressed
// under its SHA-256 (encrypted with the registry's key, if any), and the
// version recorded with digest, size, lineage, parent, run and creation
// time and actor, in one transaction.
func (r *Registry) RegisterVersion(ctx context.Context, name, pkgDir string, o RegisterOptions) (Version, error) {
	if err := checkModelName(name); err != nil {
		return Version{}, err
	}
	archive, man, err := pack(pkgDir)
	if err != nil {
		return Version{}, fmt.Errorf("registry: register %s: %w", name, err)
	}
	digest, err := r.storeBlob(ctx, archive)
	if err != nil {
		return Version{}, err
	}
	lin := mergeLineage(LineageOf(man), o.Lineage)
	linJSON, err := json.Marshal(lin)
	if err != nil {
		return Version{}, fmt.Errorf("registry: lineage: %w", err)
	}
	actor := actorOr(o.Actor)
	now := time.Now().UTC()
	var version int
	err = r.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, r.q(`INSERT INTO registered_models (name, created_at, created_by) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING`),
			name, r.ts(now), actor); err != nil {
			return dbErr(err, "register %s", name)
		}
		var modelID int64
		if err := tx.QueryRowContext(ctx, r.q(`UPDATE registered_models SET latest_version = latest_version + 1 WHERE name = ? RETURNING id, latest_version`), name).
			Scan(&modelID, &version); err != nil {
			return dbErr(err, "register %s", name)
		}
		var parentID, parentVersion any
		if o.Parent != nil {
			id, err := r.versionID(ctx, tx, *o.Parent)
			if err != nil {
				return fmt.Errorf("registry: parent: %w", err)
			}
			parentID, parentVersion = id, o.Parent.Version
		}
		var runID any
		if o.RunID != "" {
			if err := r.runExists(ctx, tx, o.RunID); err != nil {
				return err
			}
			runID = o.RunID
		}
		_, err := tx.ExecContext(ctx, r.q(`INSERT INTO model_versions
			(model_id, version, digest, size, run_id, parent_model_id, parent_version, lineage, description, created_at, created_by)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`),
			modelID, version, digest, int64(len(archive)), runID, parentID, parentVersion, string(linJSON), o.Description, r.ts(now), actor)
		return dbErr(err, "register %s version %d", name, version)
	})
	if err != nil {
		return Version{}, err
	}
	r.log.Info("registry: version registered", "model", name, "version", version, "digest", "sha256:"+digest, "bytes", len(archive), "actor", actor)
	return r.Version(ctx, name, version)
}

// mergeLineage returns base with the fields set in extra replacing its own.
func mergeLineage(base, extra Lineage) Lineage {
	b, _ := json.Marshal(extra)
	json.Unmarshal(b, &base)
	return base
}

// versionID returns the model id of an existing version (NotFound else).
func (r *Registry) versionID(ctx context.Context, q querier, ref Ref) (int64, error) {
	var id int64
	err := q.QueryRowContext(ctx, r.q(`SELECT m.id FROM registered_models m JOIN model_versions v ON v.model_id = m.id WHERE m.name = ? AND v.version = ?`),
		ref.Model, ref.Version).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		if _, err := r.modelID(ctx, q, ref.Model); err != nil {
			return 0, err
		}
		return 0, core.Errorf(core.NotFound, "registry: model %q has no version %d", ref.Model, ref.Version)
	}
	return id, dbErr(err, "look up %s", ref)
}

// modelID returns a model's id (NotFound else).
func (r *Registry) modelID(ctx context.Context, q querier, name string) (int64, error) {
	var id int64
	err := q.QueryRowContext(ctx, r.q(`SELECT id FROM registered_models WHERE name = ?`), name).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, r.notFoundModel(ctx, name)
	}
	return id, dbErr(err, "look up model %q", name)
}

// querier is *sql.DB or *sql.Tx.
type querier interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

const versionColumns = `m.name, v.version, v.digest, v.size, v.run_id, pm.name, v.parent_version, v.lineage, v.description, v.created_at, v.created_by
	FROM model_versions v JOIN registered_models m ON m.id = v.model_id LEFT JOIN registered_models pm ON pm.id = v.parent_model_id`

// Version returns one version of a model; unknown ones are NotFound.
func (r *Registry) Version(ctx context.Context, name string, version int) (Version, error) {
	vs, err := r.versions(ctx, `WHERE m.name = ? AND v.version = ?`, name, version)
	if err != nil {
		return Version{}, err
	}
	if len(vs) == 0 {
		if _, err := r.modelID(ctx, r.db, name); err != nil {
			return Version{}, err
		}
		return Version{}, core.Errorf(core.NotFound, "registry: model %q has no version %d", name, version)
	}
	return vs[0], nil
}

// Versions returns a model's versions, newest first; an unknown model is
// NotFound.
func (r *Registry) Versions(ctx context.Context, name string) ([]Version, error) {
	if _, err := r.modelID(ctx, r.db, name); err != nil {
		return nil, err
	}
	return r.versions(ctx, `WHERE m.name = ?`, name)
}

func (r *Registry) versions(ctx context.Context, where string, args ...any) ([]Version, error) {
	rows, err := r.db.QueryContext(ctx, r.q(`SELECT `+versionColumns+` `+where+` ORDER BY v.version DESC`), args...)
	if err != nil {
		return nil, dbErr(err, "list versions")
	}
	defer rows.Close()
	var out []Version
	for rows.Next() {
		var v Version
		var runID, parentModel sql.NullString
		var parentVersion sql.NullInt64
		var lineage string
		var at dbTime
		if err := rows.Scan(&v.Model, &v.Version, &v.Digest, &v.Size, &runID, &parentModel, &parentVersion, &lineage, &v.Description, &at, &v.CreatedBy); err != nil {
			return nil, dbErr(err, "list versions")
		}
		v.RunID, v.CreatedAt = runID.String, at.T
		if parentModel.Valid {
			v.Parent = &Ref{parentModel.String, int(parentVersion.Int64)}
		}
		if err := json.Unmarshal([]byte(lineage), &v.Lineage); err != nil {
			return nil, core.Errorf(core.Internal, "registry: %s/%d: stored lineage: %v", v.Model, v.Version, err)
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, dbErr(err, "list versions")
	}
	if len(out) > 0 {
		aliases, err := r.aliasesOf(ctx, out[0].Model)
		if err != nil {
			return nil, err
		}
		for i := range out {
			for a, v := range aliases {
				if v == out[i].Version {
					out[i].Aliases = append(out[i].Aliases, a)
				}
			}
			sort.Strings(out[i].Aliases)
		}
	}
	return out, nil
}

func (r *Registry) aliasesOf(ctx context.Context, name string) (map[string]int, error) {
	m, err := r.Model(ctx, name)
	if err != nil {
		return nil, err
	}
	return m.Aliases, nil
}

// URIScheme starts a model URI: models:/NAME/VERSION, models:/NAME@ALIAS
// or models:/NAME/latest, as MLflow spells them.
const URIScheme = "models:/"

// ParseURI splits a model URI into the model name and either a version
// (alias "") or an alias (version 0); "latest" is returned as the alias
// "latest".
func ParseURI(uri string) (name string, version int, alias string, err error) {
	rest, ok := strings.CutPrefix(uri, URIScheme)
	if !ok {
		return "", 0, "", core.Errorf(core.InvalidArgument, "registry: model URI %q: want models:/NAME/VERSION, models:/NAME@ALIAS or models:/NAME/latest", uri)
	}
	if n, a, ok := strings.Cut(rest, "@"); ok {
		if err := checkModelName(n); err != nil {
			return "", 0, "", err
		}
		if err := checkAlias(a); err != nil {
			return "", 0, "", err
		}
		return n, 0, a, nil
	}
	n, v, ok := strings.Cut(rest, "/")
	if !ok {
		return "", 0, "", core.Errorf(core.InvalidArgument, "registry: model URI %q names no version or alias (want models:/%s/VERSION or models:/%s@ALIAS)", uri, rest, rest)
	}
	if err := checkModelName(n); err != nil {
		return "", 0, "", err
	}
	if v == "latest" {
		return n, 0, "latest", nil
	}
	num, err := strconv.Atoi(v)
	if err != nil || num < 1 {
		return "", 0, "", core.Errorf(core.InvalidArgument, "registry: model URI %q: version %q is not a positive integer", uri, v)
	}
	return n, num, "", nil
}

// Resolve returns the version a model URI names (see ParseURI): a version
// number, the version an alias points at, or the latest version.
func (r *Registry) Resolve(ctx context.Context, uri string) (Version, error) {
	name, version, alias, err := ParseURI(uri)
	if err != nil {
		return Version{}, err
	}
	switch alias {
	case "":
	case "latest":
		m, err := r.Model(ctx, name)
		if err != nil {
			return Version{}, err
		}
		if m.LatestVersion == 0 {
			return Version{}, core.Errorf(core.NotFound, "registry: model %q has no versions", name)
		}
		version = m.LatestVersion
	default:
		if version, err = r.Alias(ctx, name, alias); err != nil {
			return Version{}, err
		}
	}
	return r.Version(ctx, name, version)
}

// Fetch writes version's package into dir (which must not exist) after
// verifying its artifact (ReadArtifact) and returns the version.
func (r *Registry) Fetch(ctx context.Context, ref Ref, dir string) (Version, error) {
	v, err := r.Version(ctx, ref.Model, ref.Version)
	if err != nil {
		return Version{}, err
	}
	archive, err := r.ReadArtifact(ctx, v.Digest)
	if err != nil {
		return Version{}, fmt.Errorf("%s: %w", ref, err)
	}
	if err := writePackage(archive, dir); err != nil {
		return Version{}, fmt.Errorf("%s: %w", ref, err)
	}
	return v, nil
}
