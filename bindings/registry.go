package bindings

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/registry/runlog"
)

// Registry is an open model registry, Python's kiln.Registry. Every method
// answers JSON (the registry package's types as JSON) or an error tagged
// with its code.
type Registry struct {
	r *registry.Registry
}

// openRegistry opens the registry dsn names, or, for "", $KILN_REGISTRY or
// registry.db in $KILN_HOME (default ~/.kiln), with its artifacts at
// artifacts, else $KILN_REGISTRY_ARTIFACTS, else the default, and the key
// from $KILN_REGISTRY_KEY or $KILN_REGISTRY_KEY_FILE: what the kiln
// command opens (kilnenv.Vars.RegistryLocation).
func openRegistry(ctx context.Context, dsn, artifacts string) (*registry.Registry, error) {
	vars, err := kilnenv.Load(os.Getenv)
	if err != nil {
		return nil, core.Errorf(core.InvalidArgument, "kiln: %v", err)
	}
	dsn, artifacts, err = vars.RegistryLocation(dsn, artifacts)
	if err != nil {
		return nil, core.Errorf(core.FailedPrecondition, "kiln: registry: %v", err)
	}
	key, err := registry.LoadKey(vars.RegistryKey, vars.RegistryKeyFile)
	if err != nil {
		return nil, fmt.Errorf("kiln: %w", err)
	}
	return registry.Open(ctx, dsn, registry.Options{ArtifactDir: artifacts, Key: key, S3PathStyle: vars.S3PathStyle})
}

// OpenRegistry opens a registry: dsn is a SQLite file path, sqlite://PATH
// or postgres://...; "" is the default ($KILN_REGISTRY, else
// $KILN_HOME/registry.db). artifacts is its artifact root, a directory or
// s3://bucket/prefix; "" is the default ($KILN_REGISTRY_ARTIFACTS, else
// beside a SQLite file, $KILN_HOME/artifacts for PostgreSQL).
func OpenRegistry(dsn, artifacts string) (_ *Registry, err error) {
	defer guard(&err)
	r, err := openRegistry(context.Background(), dsn, artifacts)
	if err != nil {
		return nil, err
	}
	return &Registry{r: r}, nil
}

// RegistryConfigured reports whether $KILN_REGISTRY names a registry: fit,
// select_model and the optimizations record runs by default only then.
func RegistryConfigured() (_ bool, err error) {
	defer guard(&err)
	vars, err := kilnenv.Load(os.Getenv)
	if err != nil {
		return false, core.Errorf(core.InvalidArgument, "kiln: %v", err)
	}
	return vars.RegistryConfigured(""), nil
}

// Close closes the registry's database.
func (g *Registry) Close() (err error) {
	defer guard(&err)
	return g.r.Close()
}

// InfoJSON says where the registry lives: {"backend", "artifacts"}.
func (g *Registry) InfoJSON() string {
	return jsonText(map[string]string{"backend": string(g.r.Backend()), "artifacts": g.r.ArtifactDir()})
}

func jsonText(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return "null"
	}
	return string(b)
}

// ModelsJSON lists the registered models.
func (g *Registry) ModelsJSON() (_ string, err error) {
	defer guard(&err)
	ms, err := g.r.Models(context.Background())
	return jsonText(ms), err
}

// ModelJSON returns one registered model; an unknown name is NotFound.
func (g *Registry) ModelJSON(name string) (_ string, err error) {
	defer guard(&err)
	m, err := g.r.Model(context.Background(), name)
	return jsonText(m), err
}

// VersionsJSON lists a model's versions, newest first.
func (g *Registry) VersionsJSON(name string) (_ string, err error) {
	defer guard(&err)
	if _, err := g.r.Model(context.Background(), name); err != nil {
		return "", err
	}
	vs, err := g.r.Versions(context.Background(), name)
	return jsonText(vs), err
}

// VersionJSON returns one version.
func (g *Registry) VersionJSON(name string, version int) (_ string, err error) {
	defer guard(&err)
	v, err := g.r.Version(context.Background(), name, version)
	return jsonText(v), err
}

// ResolveJSON returns the version a model URI names (models:/NAME/VERSION,
// models:/NAME@ALIAS, models:/NAME/latest).
func (g *Registry) ResolveJSON(uri string) (_ string, err error) {
	defer guard(&err)
	v, err := g.r.Resolve(context.Background(), uri)
	return jsonText(v), err
}

// SetAlias moves alias of model name to version to (0 removes it) when it
// is at expected now (0: it must not exist; -1: wherever it is now, read
// first), recording the move with actor and reason. The answer is JSON:
// {"event": AliasEvent} when it moved, {"conflict": message} when another
// writer moved it first (the compare-and-swap lost).
func (g *Registry) SetAlias(name, alias string, to, expected int, actor, reason string) (_ string, err error) {
	defer guard(&err)
	ctx := context.Background()
	if expected < 0 {
		if _, err := g.r.Model(ctx, name); err != nil {
			return "", err
		}
		cur, err := g.r.Alias(ctx, name, alias)
		switch {
		case err == nil:
			expected = cur
		case core.HasCode(err, core.NotFound):
			expected = 0
		default:
			return "", err
		}
		if expected == 0 && to == 0 {
			return "", core.Errorf(core.NotFound, "registry: model %q has no alias %q", name, alias)
		}
	}
	if actor == "" {
		actor = runlog.DefaultActor()
	}
	ev, err := g.r.CompareAndSwap(ctx, registry.Move{Model: name, Alias: alias, Expected: expected, To: to, Actor: actor, Reason: reason})
	if errors.Is(err, registry.ErrConflict) {
		return jsonText(map[string]string{"conflict": err.Error()}), nil
	}
	if err != nil {
		return "", err
	}
	return jsonText(map[string]any{"event": ev}), nil
}

// HistoryJSON lists the moves of a model's alias (all aliases for ""),
// oldest first.
func (g *Registry) HistoryJSON(name, alias string) (_ string, err error) {
	defer guard(&err)
	evs, err := g.r.History(context.Background(), name, alias)
	return jsonText(evs), err
}

// RunsJSON lists runs, newest first: of model when it is not "", at most
// limit when limit > 0.
func (g *Registry) RunsJSON(model string, limit int) (_ string, err error) {
	defer guard(&err)
	runs, err := g.r.Runs(context.Background(), model, limit)
	return jsonText(runs), err
}

// RunJSON returns a run with its logged metric history:
// {"run": Run, "history": [Metric, ...]}.
func (g *Registry) RunJSON(id string) (_ string, err error) {
	defer guard(&err)
	ctx := context.Background()
	run, err := g.r.Run(ctx, id)
	if err != nil {
		return "", err
	}
	hist, err := g.r.RunMetrics(ctx, id)
	if err != nil {
		return "", err
	}
	return jsonText(map[string]any{"run": run, "history": hist}), nil
}

// Fetch writes the package of the version uri names into dir (which must
// not exist), its artifact's digest verified and decrypted with the key,
// and returns the version as JSON.
func (g *Registry) Fetch(uri, dir string) (_ string, err error) {
	defer guard(&err)
	ctx := context.Background()
	v, err := g.r.Resolve(ctx, uri)
	if err != nil {
		return "", err
	}
	v, err = g.r.Fetch(ctx, v.Ref(), dir)
	return jsonText(v), err
}

// registerOptions are Register's options as JSON.
type registerOptions struct {
	RunID       string            `json:"run_id"`
	Parent      *registry.Ref     `json:"parent"`
	Description string            `json:"description"`
	Actor       string            `json:"actor"`
	Lineage     *registry.Lineage `json:"lineage"`
}

// Register stores the model package in pkgDir as the next version of the
// registered model name and returns the version as JSON. optionsJSON holds
// {"run_id", "parent": {"model", "version"}, "description", "actor",
// "lineage"} (each optional; the lineage adds to what the manifest
// records).
func (g *Registry) Register(name, pkgDir, optionsJSON string) (_ string, err error) {
	defer guard(&err)
	var o registerOptions
	if optionsJSON != "" {
		if err := json.Unmarshal([]byte(optionsJSON), &o); err != nil {
			return "", core.Errorf(core.InvalidArgument, "kiln: register: options: %v", err)
		}
	}
	if o.Actor == "" {
		o.Actor = runlog.DefaultActor()
	}
	ro := registry.RegisterOptions{RunID: o.RunID, Parent: o.Parent, Description: o.Description, Actor: o.Actor}
	if o.Lineage != nil {
		ro.Lineage = *o.Lineage
	}
	v, err := g.r.RegisterVersion(context.Background(), name, pkgDir, ro)
	return jsonText(v), err
}

// recordSpec is how a Python job is recorded, as JSON: the registry's DSN
// and artifact root ("" for the defaults), the registered model the run
// is for, the actor.
type recordSpec struct {
	Registry  string `json:"registry"`
	Artifacts string `json:"artifacts"`
	Model     string `json:"model"`
	Actor     string `json:"actor"`
}

// startTracking starts a run of kind with params as recordJSON says; ""
// records nothing (a nil tracker). The tracker owns the registry it
// opened.
func startTracking(recordJSON, kind string, params map[string]string) (*runlog.Tracker, error) {
	if recordJSON == "" {
		return nil, nil
	}
	var spec recordSpec
	if err := json.Unmarshal([]byte(recordJSON), &spec); err != nil {
		return nil, core.Errorf(core.InvalidArgument, "kiln: record: %v", err)
	}
	ctx := context.Background()
	r, err := openRegistry(ctx, spec.Registry, spec.Artifacts)
	if err != nil {
		return nil, err
	}
	tr, err := runlog.Start(ctx, r, kind, params, runlog.Options{Model: spec.Model, Actor: spec.Actor, CloseRegistry: true})
	if err != nil {
		r.Close()
		return nil, err
	}
	return tr, nil
}
