// Package follower makes a server serve what a registry alias names
// (issue 13: "serving follows the registry"). For every registered model
// with the alias (production by default), a Follower installs the version
// the alias points at into the served repository under the registry's
// version number (fetched from the registry, its artifact's SHA-256
// verified), loads and warms it up, and then makes it answer the requests
// that name no version: the manager's atomic switch (manager.SetRoute).
// The version that served before stays loaded for a grace period, so that
// moving the alias back is immediate; after the grace period it is
// unloaded.
//
// The follower polls the registry (every Options.Interval); one Sync is one
// pass. A version that fails to fetch or load leaves the previous one
// serving; the failure is logged, reported by Status and retried after
// Options.RetryAfter.
package follower

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
)

// Defaults of Options.
const (
	DefaultAlias      = "production"
	DefaultInterval   = 2 * time.Second
	DefaultGrace      = 5 * time.Minute
	DefaultRetryAfter = time.Minute
)

// MarkerFile is the file a follower writes into each version directory it
// installs: the registry version's artifact digest and the SHA-256 of its
// model file, checked again before the directory is used after a restart.
const MarkerFile = "registry.json"

// Options configure a Follower.
type Options struct {
	// Registry is the registry to follow (required).
	Registry *registry.Registry
	// Manager serves the repository at Repository (required).
	Manager *manager.Manager
	// Repository is the served repository's root directory (required).
	Repository string
	// Alias is the alias to serve (default DefaultAlias).
	Alias string
	// Models restricts the models followed; empty: every registered model
	// that has the alias.
	Models []string
	// Interval is the time between two polls of the registry (default
	// DefaultInterval).
	Interval time.Duration
	// Grace is how long the version that served before an alias move
	// stays loaded (default DefaultGrace; negative: unloaded at once).
	Grace time.Duration
	// RetryAfter is how long a version that failed to install or load is
	// left alone before it is tried again (default DefaultRetryAfter).
	RetryAfter time.Duration
	// MaxBatchSize is the max_batch_size of the config written for a model
	// new to the repository (0: repository.DefaultInstallMaxBatchSize).
	MaxBatchSize int
	// Logger receives the follower's events (default slog.Default()).
	Logger *slog.Logger
	// Now is the clock (default time.Now); tests set it.
	Now func() time.Time
}

// Follower keeps a server's models at the versions a registry alias names.
// Its methods are safe for concurrent use.
type Follower struct {
	o  Options
	mu sync.Mutex // serializes Sync; guards models
	// models holds what the follower did for each model.
	models map[string]*state
}

type state struct {
	serving  int             // the version serving as the alias (0: none yet)
	previous int             // the version kept loaded for rollback (0: none)
	since    time.Time       // when serving started to serve
	failed   map[int]failure // versions that failed, and when
	checked  map[int]bool    // version directories verified in this process
	events   []Event         // recent switches, newest last
	lastErr  string          // the last failure, "" after a success
	aliasSet bool            // the model had the alias at the last poll
}

type failure struct {
	at  time.Time
	err string
}

// Event is one switch of the version that answers a model's unversioned
// requests.
type Event struct {
	At   time.Time `json:"at"`
	From int       `json:"from"`
	To   int       `json:"to"`
	// Rollback is set when To was still loaded (kept for the grace
	// period), so that the switch loaded nothing.
	Rollback bool `json:"rollback,omitempty"`
}

// ModelStatus is what Status reports of one followed model.
type ModelStatus struct {
	Model string `json:"model"`
	Alias string `json:"alias"`
	// Serving is the version that answers unversioned requests; Previous
	// the one kept loaded for rollback until PreviousUntil.
	Serving       int        `json:"serving"`
	Previous      int        `json:"previous,omitempty"`
	PreviousUntil *time.Time `json:"previous_until,omitempty"`
	// Error is the last failure to follow the alias ("" when none).
	Error  string  `json:"error,omitempty"`
	Events []Event `json:"events,omitempty"`
}

// New returns a follower for o; it does nothing until Sync or Run.
func New(o Options) (*Follower, error) {
	if o.Registry == nil || o.Manager == nil || o.Repository == "" {
		return nil, core.Errorf(core.InvalidArgument, "follower: a registry, a manager and a repository are required")
	}
	if o.Alias == "" {
		o.Alias = DefaultAlias
	}
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	if o.Grace == 0 {
		o.Grace = DefaultGrace
	}
	if o.RetryAfter <= 0 {
		o.RetryAfter = DefaultRetryAfter
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	for _, m := range o.Models {
		if err := repository.ValidModelName(m); err != nil {
			return nil, core.Errorf(core.InvalidArgument, "follower: %v", err)
		}
	}
	return &Follower{o: o, models: map[string]*state{}}, nil
}

// Run polls the registry every Interval and Syncs until ctx is done.
func (f *Follower) Run(ctx context.Context) {
	t := time.NewTicker(f.o.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := f.Sync(ctx); err != nil && ctx.Err() == nil {
				f.o.Logger.Debug("registry follower: sync", "err", err)
			}
		}
	}
}

// Sync makes one pass: every followed model serves the version its alias
// names (installed and loaded first when new), and versions kept past
// their grace period are unloaded. It returns the failures joined; each
// failed model keeps serving what it served.
func (f *Follower) Sync(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	targets, err := f.targets(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(targets)) {
		if err := f.follow(ctx, name, targets[name]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// targets maps each followed model to the version its alias names (0: the
// model has no such alias).
func (f *Follower) targets(ctx context.Context) (map[string]int, error) {
	out := map[string]int{}
	if len(f.o.Models) > 0 {
		for _, name := range f.o.Models {
			v, err := f.o.Registry.Alias(ctx, name, f.o.Alias)
			switch {
			case core.CodeOf(err) == core.NotFound:
				out[name] = 0
			case err != nil:
				return nil, fmt.Errorf("registry follower: %w", err)
			default:
				out[name] = v
			}
		}
		return out, nil
	}
	models, err := f.o.Registry.Models(ctx)
	if err != nil {
		return nil, fmt.Errorf("registry follower: %w", err)
	}
	for _, m := range models {
		if v, ok := m.Aliases[f.o.Alias]; ok {
			out[m.Name] = v
		}
	}
	// Models followed before whose alias went away are reported too.
	for name := range f.models {
		if _, ok := out[name]; !ok {
			out[name] = 0
		}
	}
	return out, nil
}

// follow brings model name to version want (0: the alias is unset).
func (f *Follower) follow(ctx context.Context, name string, want int) error {
	st := f.models[name]
	if st == nil {
		st = &state{failed: map[int]failure{}, checked: map[int]bool{}}
		f.models[name] = st
	}
	now := f.o.Now()
	if want == 0 {
		if st.aliasSet {
			f.o.Logger.Warn("registry follower: alias removed; the model keeps serving its version",
				"model", name, "alias", f.o.Alias, "version", st.serving)
		}
		st.aliasSet = false
		return nil
	}
	st.aliasSet = true
	if want == st.serving {
		if st.previous != 0 && now.Sub(st.since) >= f.o.Grace {
			if err := f.o.Manager.SetRoute(name, manager.Route{Default: int64(want)}); err != nil {
				return f.fail(st, name, want, fmt.Errorf("unload version %d after its grace period: %w", st.previous, err))
			}
			f.o.Logger.Info("registry follower: previous version unloaded after its grace period",
				"model", name, "version", st.previous, "grace", f.o.Grace)
			st.previous = 0
		}
		return nil
	}
	if fl, ok := st.failed[want]; ok && now.Sub(fl.at) < f.o.RetryAfter {
		return fmt.Errorf("model %q version %d: %s (retried after %s)", name, want, fl.err, f.o.RetryAfter)
	}
	loaded := slices.Contains(f.o.Manager.Versions(name), int64(want))
	if err := f.install(ctx, name, want, st); err != nil {
		return f.fail(st, name, want, err)
	}
	route := manager.Route{Default: int64(want)}
	if st.serving != 0 && f.o.Grace > 0 {
		route.Keep = []int64{int64(st.serving)}
	}
	if err := f.o.Manager.SetRoute(name, route); err != nil {
		return f.fail(st, name, want, err)
	}
	ev := Event{At: now, From: st.serving, To: want, Rollback: loaded}
	f.o.Logger.Info("registry follower: serving alias", "model", name, "alias", f.o.Alias,
		"version", want, "previous", st.serving, "rollback", loaded)
	st.previous, st.serving, st.since = st.serving, want, now
	if f.o.Grace <= 0 {
		st.previous = 0
	}
	delete(st.failed, want)
	st.lastErr = ""
	st.events = append(st.events, ev)
	if len(st.events) > 32 {
		st.events = st.events[len(st.events)-32:]
	}
	return nil
}

// Install puts version v of model name into the served repository (its
// artifact fetched from the registry and verified, as for the alias's
// versions) without serving it, so that the manager can load it: a
// rollout's candidate. A version installed before is verified again.
func (f *Follower) Install(ctx context.Context, name string, v int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.models[name]
	if st == nil {
		st = &state{failed: map[int]failure{}, checked: map[int]bool{}}
		f.models[name] = st
	}
	return f.install(ctx, name, v, st)
}

func (f *Follower) fail(st *state, name string, version int, err error) error {
	err = fmt.Errorf("registry follower: model %q version %d (alias %q): %w", name, version, f.o.Alias, err)
	st.failed[version] = failure{at: f.o.Now(), err: err.Error()}
	st.lastErr = err.Error()
	f.o.Logger.Error("registry follower: the alias's version cannot serve; the previous one keeps serving",
		"model", name, "version", version, "alias", f.o.Alias, "serving", st.serving, "err", err)
	return err
}

// marker is the content of MarkerFile.
type marker struct {
	Model        string `json:"model"`
	Version      int    `json:"version"`
	Digest       string `json:"digest"`
	ModelFile    string `json:"model_file"`
	ModelSHA256  string `json:"model_sha256"`
	RegistryTime string `json:"installed_at"`
}

// install puts version v of model name into the repository as
// <repository>/<name>/<v>, fetched from the registry (which verifies the
// artifact's digest), unless a directory this follower installed for the
// same artifact is there and its model file still has the recorded
// SHA-256. A directory that is not such a copy is refused (FAILED_PRECONDITION):
// the follower never overwrites what it did not write.
func (f *Follower) install(ctx context.Context, name string, v int, st *state) error {
	if st.checked[v] {
		return nil
	}
	rv, err := f.o.Registry.Version(ctx, name, v)
	if err != nil {
		return err
	}
	dir := filepath.Join(f.o.Repository, name, strconv.Itoa(v))
	if _, err := os.Stat(dir); err == nil {
		if err := verifyInstalled(dir, rv); err != nil {
			return err
		}
		st.checked[v] = true
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	staging, err := repository.NewStaging(f.o.Repository, name)
	if err != nil {
		return err
	}
	defer os.RemoveAll(staging)
	pkg := filepath.Join(staging, "pkg")
	if _, err := f.o.Registry.Fetch(ctx, rv.Ref(), pkg); err != nil {
		return err
	}
	sum, err := fileSHA256(filepath.Join(pkg, modelpkg.ModelFile))
	if err != nil {
		return err
	}
	m := marker{Model: name, Version: v, Digest: rv.Digest, ModelFile: modelpkg.ModelFile, ModelSHA256: sum,
		RegistryTime: f.o.Now().UTC().Format(time.RFC3339)}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(pkg, MarkerFile), append(b, '\n'), 0o644); err != nil {
		return err
	}
	if _, err := repository.Install(f.o.Repository, name, pkg, repository.InstallOptions{
		Move: true, Version: int64(v), MaxBatchSize: f.o.MaxBatchSize,
	}); err != nil {
		return err
	}
	f.o.Logger.Info("registry follower: version installed", "model", name, "version", v,
		"digest", "sha256:"+rv.Digest, "dir", dir)
	st.checked[v] = true
	return nil
}

// verifyInstalled checks that dir is this follower's copy of rv, unchanged.
func verifyInstalled(dir string, rv registry.Version) error {
	raw, err := os.ReadFile(filepath.Join(dir, MarkerFile))
	if err != nil {
		return core.Errorf(core.FailedPrecondition,
			"%s exists but was not installed from the registry (no %s); remove it or serve another repository", dir, MarkerFile)
	}
	var m marker
	if err := json.Unmarshal(raw, &m); err != nil {
		return core.Errorf(core.FailedPrecondition, "%s: %s: %v", dir, MarkerFile, err)
	}
	if m.Digest != rv.Digest {
		return core.Errorf(core.FailedPrecondition, "%s holds artifact sha256:%s, but %s is sha256:%s; remove the directory to fetch it again",
			dir, m.Digest, rv.Ref(), rv.Digest)
	}
	file := m.ModelFile
	if file == "" || filepath.Base(file) != file {
		file = modelpkg.ModelFile
	}
	sum, err := fileSHA256(filepath.Join(dir, file))
	if err != nil {
		return err
	}
	if sum != m.ModelSHA256 {
		return core.Errorf(core.FailedPrecondition, "%s/%s has sha256:%s, but sha256:%s was installed from %s (sha256:%s): it was changed; remove the directory to fetch it again",
			dir, file, sum, m.ModelSHA256, rv.Ref(), rv.Digest)
	}
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Status reports each followed model: the version serving as the alias,
// the one kept for rollback and until when, the last failure and the
// recent switches.
func (f *Follower) Status() []ModelStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []ModelStatus
	for _, name := range slices.Sorted(maps.Keys(f.models)) {
		st := f.models[name]
		s := ModelStatus{Model: name, Alias: f.o.Alias, Serving: st.serving, Previous: st.previous,
			Error: st.lastErr, Events: slices.Clone(st.events)}
		if st.previous != 0 {
			until := st.since.Add(f.o.Grace)
			s.PreviousUntil = &until
		}
		out = append(out, s)
	}
	return out
}
