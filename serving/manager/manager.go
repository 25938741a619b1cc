// Package manager loads the models of a repository and keeps track of the
// versions that serve: loads are atomic (a new version loads and warms up
// before it takes traffic; a version that fails to load leaves the old one
// serving and records why), unloads wait for requests in flight, and each
// version keeps statistics.
package manager

import (
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/serving/batcher"
	"github.com/kilnml/kiln/serving/repository"
)

// ErrNotFound is wrapped by errors about unknown models and versions; its
// code is core.NotFound.
var ErrNotFound error = &core.Error{Code: core.NotFound, Message: "not found"}

// ErrUnavailable is wrapped by errors about models that exist but have no
// version able to serve; its code is core.Unavailable.
var ErrUnavailable error = &core.Error{Code: core.Unavailable, Message: "unavailable"}

// States of a model version in the repository index.
const (
	StateReady       = "READY"
	StateUnavailable = "UNAVAILABLE"
	StateLoading     = "LOADING"
)

// Version is one loaded, serving version of a model.
type Version struct {
	model   *repository.Model
	number  int64
	module  *core.Module
	batcher *batcher.Batcher
	// ident identifies what the version was loaded from (configuration,
	// labels, model file); a reload with the same ident keeps the instance.
	ident string

	// ent is the model's entry in the manager that loaded the version
	// (nil during warmup): its split decides shadowing and roles.
	ent *entry

	mu       sync.Mutex
	refs     int
	retiring bool
	idle     *sync.Cond
}

// Name returns the model's name.
func (v *Version) Name() string { return v.model.Name }

// Number returns the version number.
func (v *Version) Number() int64 { return v.number }

// Config returns the configuration the version was loaded with.
func (v *Version) Config() *repository.Config { return v.model.Config }

// Labels returns the labels of output name's classes, or nil.
func (v *Version) Labels(output string) []string { return v.model.Labels[output] }

// Stats returns the version's statistics.
func (v *Version) Stats() *batcher.Stats { return v.batcher.Stats() }

// QueueLen returns the number of requests waiting for execution.
func (v *Version) QueueLen() int { return v.batcher.QueueLen() }

// Infer runs one request through the version's batcher (see
// batcher.Batcher.Submit), then applies the configuration's
// post-processing (softmax) to the outputs.
//
// With a Columns config, inputs are the record's columns, each float32
// [batch, 1] (category strings already mapped to their codes by the
// decoder); they are assembled into the model's one float32 [batch,
// columns] input before the batcher, so requests still batch together.
func (v *Version) Infer(ctx context.Context, inputs []batcher.Tensor) ([]batcher.Tensor, error) {
	orig := inputs
	if v.model.Config.Columns {
		x, err := AssembleColumns(inputs)
		if err != nil {
			return nil, err
		}
		inputs = []batcher.Tensor{x}
	}
	outs, err := v.batcher.Submit(ctx, inputs)
	if err != nil {
		return nil, err
	}
	if err := postprocess(v.model.Config, outs); err != nil {
		return nil, &batcher.ExecError{Err: err}
	}
	v.maybeShadow(orig, outs)
	return outs, nil
}

// ForwardTensors runs a whole batch of C tensors through the version in
// one execution on one of its instances, without copying inputs or outputs
// (see batcher.Batcher.ForwardTensors: max_batch_size does not bound it),
// then applies the configuration's post-processing (softmax) to the
// outputs in place. The caller closes the inputs, after it returns, and
// owns the outputs.
//
// With a Columns config, inputs are the record's columns (float32 [batch,
// 1], as for Infer), assembled into the model's one input first (a copy).
func (v *Version) ForwardTensors(ctx context.Context, inputs []*core.Tensor) ([]*core.Tensor, error) {
	if v.model.Config.Columns {
		x, err := assembleTensors(inputs)
		if err != nil {
			return nil, err
		}
		defer x.Close()
		inputs = []*core.Tensor{x}
	}
	outs, err := v.batcher.ForwardTensors(ctx, inputs)
	if err != nil {
		return nil, err
	}
	if err := postprocessTensors(v.model.Config, outs); err != nil {
		core.CloseAll(outs)
		return nil, &batcher.ExecError{Err: err}
	}
	return outs, nil
}

// postprocessTensors applies postprocess to C tensors, in place: an output
// that needs softmax is made contiguous first (a copy only if it was not).
func postprocessTensors(cfg *repository.Config, outs []*core.Tensor) error {
	for i, o := range cfg.Outputs {
		if !o.Softmax || i >= len(outs) {
			continue
		}
		c, err := outs[i].Contiguous()
		if err != nil {
			return fmt.Errorf("output %q: %w", o.Name, err)
		}
		outs[i].Close()
		outs[i] = c
		data, err := c.Bytes()
		if err != nil {
			return fmt.Errorf("output %q: %w", o.Name, err)
		}
		t := []batcher.Tensor{{DType: c.DType(), Shape: c.Shape(), Data: data}}
		one := &repository.Config{Outputs: []repository.TensorSpec{o}}
		if err := postprocess(one, t); err != nil {
			return err
		}
	}
	return nil
}

// Release ends a use of the version that Manager.Acquire began.
func (v *Version) Release() {
	v.mu.Lock()
	v.refs--
	if v.refs == 0 {
		v.idle.Broadcast()
	}
	v.mu.Unlock()
}

func (v *Version) acquire() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.retiring {
		return false
	}
	v.refs++
	return true
}

// retire waits for uses in flight, then stops the batcher and frees the
// module.
func (v *Version) retire() {
	v.mu.Lock()
	v.retiring = true
	for v.refs > 0 {
		v.idle.Wait()
	}
	v.mu.Unlock()
	v.batcher.Close()
	v.module.Close()
}

type entry struct {
	loadMu sync.Mutex // serializes loads and unloads of the model

	mu       sync.RWMutex
	loading  bool
	versions map[int64]*Version
	failed   map[int64]string // versions that failed their last load
	reason   string           // why the last load failed as a whole
	remote   string           // the remote repository's problem with the model (see repository.RemoteStatus)
	unloaded bool
	fp       string // the repository's fingerprint of the model at its last load
	route    *Route // set by SetRoute: the versions to load, overriding the policy
	def      int64  // the version that answers unversioned requests (0: the highest)
	pending  int64  // a split's candidate being loaded (SetSplit), 0 otherwise

	// split divides unversioned requests with a candidate (SetSplit).
	split atomic.Pointer[Split]
	// shadowSem bounds the shadow requests in flight; shadowed and
	// shadowDropped count those sent and those skipped for it.
	shadowSem               chan struct{}
	shadowed, shadowDropped atomic.Uint64
}

// Route overrides, for one model, the versions its config's version policy
// selects: the manager loads exactly Default and Keep, and Default answers
// the requests that name no version (otherwise the highest loaded version
// does, as Triton's policies do). A server that serves a registry alias
// sets the alias's version as Default and keeps the previous one loaded
// for a grace period, so that moving the alias back is immediate.
type Route struct {
	// Default is the version that answers requests naming no version.
	Default int64 `json:"default"`
	// Keep lists further versions to keep loaded (served when a request
	// names them).
	Keep []int64 `json:"keep,omitempty"`
}

// Versions returns Default and Keep, ascending, without duplicates.
func (r Route) Versions() []int64 {
	vs := append([]int64{r.Default}, r.Keep...)
	slices.Sort(vs)
	return slices.Compact(vs)
}

// Options configure a Manager.
type Options struct {
	// Logger receives the manager's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Manager holds the loaded models of one repository. It is safe for
// concurrent use.
type Manager struct {
	repo *repository.Repository
	log  *slog.Logger

	mu      sync.RWMutex
	models  map[string]*entry
	retired sync.WaitGroup
	closed  bool
}

// New returns a manager for repo with nothing loaded.
func New(repo *repository.Repository, opts Options) *Manager {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Manager{repo: repo, log: log, models: map[string]*entry{}}
}

// Repository returns the manager's repository.
func (m *Manager) Repository() *repository.Repository { return m.repo }

func (m *Manager) entry(name string, create bool) *entry {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.models[name]
	if e == nil && create && !m.closed {
		e = &entry{versions: map[int64]*Version{}, failed: map[int64]string{}, shadowSem: make(chan struct{}, maxShadowInFlight)}
		m.models[name] = e
	}
	return e
}

// LoadAll loads every model of the repository and returns the failures
// joined.
func (m *Manager) LoadAll() error {
	names, err := m.repo.Names()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		if err := m.Load(n); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Load loads or reloads model name from the repository: every version its
// policy selects is loaded and warmed up, then all of them replace the
// serving versions at once. A version that fails keeps its previous
// instance serving, if any; the error lists each failure.
func (m *Manager) Load(name string) error {
	for {
		e := m.entry(name, true)
		if e == nil {
			return core.Errorf(core.Unavailable, "model manager is closed")
		}
		e.loadMu.Lock()
		if !m.current(name, e) { // dropped by a failed load while we waited
			e.loadMu.Unlock()
			continue
		}
		err := m.load(name, e)
		e.loadMu.Unlock()
		return err
	}
}

// load is Load with e's loadMu held.
func (m *Manager) load(name string, e *entry) error {
	e.mu.Lock()
	e.loading = true
	e.mu.Unlock()
	defer func() {
		e.mu.Lock()
		e.loading = false
		e.mu.Unlock()
	}()

	start := time.Now()
	fp, _ := m.repo.Fingerprint(name)
	e.mu.Lock()
	e.fp = fp
	e.mu.Unlock()
	remoteWide, remoteVersions := m.repo.Problem(name)
	e.mu.Lock()
	e.remote = remoteWide
	e.mu.Unlock()
	rm, err := m.repo.Model(name)
	if err != nil {
		if remoteWide != "" {
			err = fmt.Errorf("%w; repository: %s", err, remoteWide)
		}
		e.mu.Lock()
		e.reason = err.Error()
		e.mu.Unlock()
		m.log.Error("model load failed", "model", name, "err", err)
		if errors.Is(err, repository.ErrNotFound) {
			m.dropIfEmpty(name, e)
			return fmt.Errorf("%w: %w", ErrNotFound, err)
		}
		return err
	}
	fresh := map[int64]*Version{}
	failed := map[int64]string{}
	var errs []error
	e.mu.RLock()
	current := maps.Clone(e.versions)
	e.mu.RUnlock()
	reused := 0
	selected, err := m.selected(rm, e)
	if err != nil {
		e.mu.Lock()
		e.reason = err.Error()
		e.mu.Unlock()
		return err
	}
	for _, v := range selected {
		ident, identErr := versionIdent(rm, v)
		if o := current[v]; o != nil && identErr == nil && o.ident == ident {
			fresh[v] = o // unchanged: keep the serving instance
			reused++
			continue
		}
		ver, err := m.loadVersion(rm, v, ident)
		if ver != nil {
			ver.ent = e
		}
		if err != nil {
			failed[v] = err.Error()
			errs = append(errs, fmt.Errorf("version %d: %w", v, err))
			m.log.Error("model version load failed", "model", name, "version", v, "err", err)
			continue
		}
		fresh[v] = ver
	}

	e.mu.Lock()
	old := e.versions
	next := map[int64]*Version{}
	maps.Copy(next, fresh)
	for v := range failed {
		if o, ok := old[v]; ok {
			next[v] = o // keep the previous instance serving
		}
	}
	if len(next) == 0 && len(old) > 0 {
		next = old // nothing loaded: keep everything that served
	}
	e.versions = next
	e.failed = failed
	e.unloaded = false
	if e.route != nil && next[e.route.Default] != nil {
		e.def = e.route.Default
	} else if e.route == nil || next[e.def] == nil {
		e.def = 0
	}
	for v, why := range remoteVersions {
		if _, ok := next[v]; !ok {
			if _, ok := failed[v]; !ok {
				failed[v] = "repository: " + why
			}
		}
	}
	e.reason = ""
	if len(errs) > 0 {
		e.reason = errors.Join(errs...).Error()
	}
	if remoteWide != "" {
		e.reason = strings.TrimPrefix(e.reason+"; repository: "+remoteWide, "; ")
	}
	e.mu.Unlock()
	for v, o := range old {
		if next[v] != o {
			m.retireAsync(o)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("model %q: %w", name, errors.Join(errs...))
	}
	if reused < len(fresh) || len(old) != len(next) {
		m.log.Info("model loaded", "model", name, "versions", slices.Sorted(maps.Keys(fresh)), "duration", time.Since(start))
	}
	return nil
}

// selected returns the versions to load: the route's, when one is set
// (each must be a version directory of rm: NOT_FOUND otherwise), else the
// config's version policy's.
func (m *Manager) selected(rm *repository.Model, e *entry) ([]int64, error) {
	e.mu.RLock()
	route, pending := e.route, e.pending
	e.mu.RUnlock()
	var vs []int64
	if route == nil {
		vs = rm.Selected()
	} else {
		vs = route.Versions()
	}
	for _, c := range []int64{pending, splitCandidate(e)} {
		if c != 0 && !slices.Contains(vs, c) {
			vs = append(vs, c)
		}
	}
	slices.Sort(vs)
	if route == nil && pending == 0 && splitCandidate(e) == 0 {
		return vs, nil
	}
	for _, v := range vs {
		if !slices.Contains(rm.Versions, v) {
			return nil, fmt.Errorf("%w: model %q has no version %d in the repository", ErrNotFound, rm.Name, v)
		}
	}
	return vs, nil
}

func splitCandidate(e *entry) int64 {
	if s := e.split.Load(); s != nil {
		return s.Candidate
	}
	return 0
}

// SetRoute loads model name with exactly the versions of r (versions that
// already serve are kept as they are; new ones load and warm up first),
// then makes r.Default answer the requests that name no version: the
// switch is atomic, as every load is, and versions outside r are retired
// once their requests in flight finish. The route stays in force for later
// loads and polls of the model. A zero Route (Default 0) returns the model
// to its config's version policy.
//
// Errors: a version the repository lacks is NOT_FOUND; when a version
// fails to load, nothing switches (the previous route and default stay)
// and the load's error is returned.
func (m *Manager) SetRoute(name string, r Route) error {
	if r.Default < 0 || slices.ContainsFunc(r.Keep, func(v int64) bool { return v < 1 }) || (r.Default == 0 && len(r.Keep) > 0) {
		return core.Errorf(core.InvalidArgument, "model %q: route %+v: versions must be positive, with a default", name, r)
	}
	for {
		e := m.entry(name, true)
		if e == nil {
			return core.Errorf(core.Unavailable, "model manager is closed")
		}
		e.loadMu.Lock()
		if !m.current(name, e) {
			e.loadMu.Unlock()
			continue
		}
		e.mu.Lock()
		prev, prevDef := e.route, e.def
		if r.Default == 0 {
			e.route = nil
		} else {
			e.route = &Route{Default: r.Default, Keep: slices.Clone(r.Keep)}
		}
		e.mu.Unlock()
		err := m.load(name, e)
		if err != nil {
			e.mu.Lock()
			e.route = prev
			if e.versions[prevDef] != nil {
				e.def = prevDef
			}
			e.mu.Unlock()
		} else {
			m.log.Info("model route set", "model", name, "default", r.Default, "keep", r.Keep)
		}
		e.loadMu.Unlock()
		return err
	}
}

// RouteOf returns model name's route and whether one is set.
func (m *Manager) RouteOf(name string) (Route, bool) {
	e := m.entry(name, false)
	if e == nil {
		return Route{}, false
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.route == nil {
		return Route{}, false
	}
	return Route{Default: e.route.Default, Keep: slices.Clone(e.route.Keep)}, true
}

// current reports whether e is still the manager's entry of name.
func (m *Manager) current(name string, e *entry) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.models[name] == e
}

// dropIfEmpty forgets the entry of a name that is not a model of the
// repository, unless it serves versions (a model whose directory went away
// keeps serving until it is unloaded or polled away), so that a load of a
// missing model leaves no trace: the index does not list it, readiness does
// not wait for it, and its model endpoints answer NOT_FOUND.
func (m *Manager) dropIfEmpty(name string, e *entry) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e.mu.RLock()
	empty := len(e.versions) == 0
	e.mu.RUnlock()
	if empty && m.models[name] == e {
		delete(m.models, name)
	}
}

func (m *Manager) retireAsync(v *Version) {
	m.retired.Add(1)
	go func() {
		defer m.retired.Done()
		v.retire()
		m.log.Info("model version retired", "model", v.Name(), "version", v.number)
	}()
}

// versionIdent identifies version v of rm: its configuration, labels and
// model file (path, size, modification time).
func versionIdent(rm *repository.Model, v int64) (string, error) {
	st, err := os.Stat(rm.ModelPath(v))
	if err != nil {
		return "", err
	}
	cfg, err := json.Marshal(rm.Config)
	if err != nil {
		return "", err
	}
	labels, err := json.Marshal(rm.Labels)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s\x00%s\x00%s\x00%d\x00%d", cfg, labels, rm.ModelPath(v), st.Size(), st.ModTime().UnixNano()), nil
}

// loadVersion loads and warms up one version.
func (m *Manager) loadVersion(rm *repository.Model, v int64, ident string) (*Version, error) {
	cfg := rm.Config
	mod, err := modelpkg.LoadModule(rm.ModelPath(v)) // a Kiln int8 package loads under its engine
	if err != nil {
		return nil, err
	}
	if d := cfg.DeviceName(); d != core.CPU {
		// Placed once, before warmup: forward copies inputs to the
		// device and outputs back.
		if err := mod.To(d); err != nil {
			mod.Close()
			return nil, err
		}
	} else if cfg.OptimizeForInferenceEnabled() {
		// Frozen and optimized once, before warmup; a model the passes
		// refuse is served as it is.
		if err := mod.OptimizeForInference(); err != nil {
			m.log.Warn("serving the model without optimize_for_inference", "model", rm.Name, "version", v, "error", err)
		}
	}
	wantArgs := len(cfg.Inputs)
	if cfg.Columns {
		wantArgs = 1 // the assembled record
	}
	if args := mod.Inputs(); len(args) != wantArgs {
		mod.Close()
		names := make([]string, len(args))
		for i, a := range args {
			names[i] = a.Name
		}
		return nil, fmt.Errorf("forward takes %d inputs (%s), the config declares %d", len(args), strings.Join(names, ", "), len(cfg.Inputs))
	}
	opts := batcher.Options{
		MaxBatchSize: cfg.MaxBatchSize,
		Instances:    cfg.Instances(),
		Logger:       m.log.With("model", rm.Name, "version", v),
	}
	if d := cfg.DynamicBatching; d != nil {
		opts.Dynamic = true
		opts.MaxQueueDelay = time.Duration(d.MaxQueueDelayUS) * time.Microsecond
		opts.PreferredBatchSizes = d.PreferredBatchSizes
		opts.MaxQueueSize = d.MaxQueueSize
	}
	b, err := batcher.New(func(ins []*core.Tensor) ([]*core.Tensor, error) { return mod.Forward(ins...) }, opts)
	if err != nil {
		mod.Close()
		return nil, err
	}
	ver := &Version{model: rm, number: v, module: mod, batcher: b, ident: ident}
	ver.idle = sync.NewCond(&ver.mu)
	if cfg.WarmupEnabled() {
		if err := warmup(ver); err != nil {
			b.Close()
			mod.Close()
			return nil, fmt.Errorf("warmup: %w", err)
		}
	}
	return ver, nil
}

// warmup runs the version once on zeros (variable dims as 1, a batch of 1)
// and checks the outputs against the configuration.
func warmup(v *Version) error {
	cfg := v.Config()
	ins := make([]batcher.Tensor, len(cfg.Inputs))
	for i, in := range cfg.Inputs {
		dt, _ := in.DataType.DType()
		if cfg.Columns {
			dt = core.Float32 // a column's values or category codes
		}
		var shape []int64
		if cfg.MaxBatchSize > 0 {
			shape = append(shape, 1)
		}
		n := int64(1)
		for _, d := range in.Dims {
			if d < 0 {
				d = 1
			}
			shape = append(shape, d)
			n *= d
		}
		ins[i] = batcher.Tensor{DType: dt, Shape: shape, Data: make([]byte, n*int64(dt.Size()))}
	}
	if cfg.Columns {
		x, err := AssembleColumns(ins)
		if err != nil {
			return err
		}
		ins = []batcher.Tensor{x}
	}
	outs, err := v.batcher.Submit(context.Background(), ins)
	if err != nil {
		return err
	}
	v.batcher.Stats().Reset()
	return CheckOutputs(cfg, outs)
}

// assembleTensors is AssembleColumns over C tensors: a new float32
// [batch, len(cols)] tensor the caller closes.
func assembleTensors(cols []*core.Tensor) (*core.Tensor, error) {
	bt := make([]batcher.Tensor, len(cols))
	for j, c := range cols {
		if c.DType() != core.Float32 {
			return nil, core.Errorf(core.InvalidArgument, "column %d: %v, want float32 [batch, 1]", j, c.DType())
		}
		cc, err := c.Contiguous()
		if err != nil {
			return nil, err
		}
		vals, err := core.Data[float32](cc)
		if err != nil {
			cc.Close()
			return nil, err
		}
		b := make([]byte, 4*len(vals))
		for i, f := range vals {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
		}
		cc.Close()
		bt[j] = batcher.Tensor{DType: core.Float32, Shape: c.Shape(), Data: b}
	}
	x, err := AssembleColumns(bt)
	if err != nil {
		return nil, err
	}
	rows, k := int(x.Shape[0]), int(x.Shape[1])
	vals := make([]float32, rows*k)
	for i := range vals {
		vals[i] = math.Float32frombits(binary.LittleEndian.Uint32(x.Data[4*i:]))
	}
	return core.NewTensor(vals, int64(rows), int64(k))
}

// AssembleColumns lays the columns of a raw record out as one float32
// [batch, len(cols)] tensor, row-major: each column is float32 [batch, 1]
// (or [batch]) with the same batch. Anything else is INVALID_ARGUMENT.
func AssembleColumns(cols []batcher.Tensor) (batcher.Tensor, error) {
	if len(cols) == 0 {
		return batcher.Tensor{}, core.Errorf(core.InvalidArgument, "no columns")
	}
	k := len(cols)
	var rows int
	for j, c := range cols {
		if c.DType != core.Float32 || len(c.Shape) == 0 || len(c.Shape) > 2 || (len(c.Shape) == 2 && c.Shape[1] != 1) {
			return batcher.Tensor{}, core.Errorf(core.InvalidArgument, "column %d: %v %v, want float32 [batch, 1]", j, c.DType, c.Shape)
		}
		r := int(c.Shape[0])
		if j == 0 {
			rows = r
		}
		if r != rows || len(c.Data) != 4*r {
			return batcher.Tensor{}, core.Errorf(core.InvalidArgument, "column %d: %d rows in %d bytes, the first column has %d rows", j, r, len(c.Data), rows)
		}
	}
	out := make([]byte, 4*rows*k)
	for j, c := range cols {
		for r := range rows {
			copy(out[4*(r*k+j):4*(r*k+j+1)], c.Data[4*r:4*r+4])
		}
	}
	return batcher.Tensor{DType: core.Float32, Shape: []int64{int64(rows), int64(k)}, Data: out}, nil
}

// CheckOutputs checks a model's outputs against its configuration: their
// number, datatypes and fixed dims.
func CheckOutputs(cfg *repository.Config, outs []batcher.Tensor) error {
	if len(outs) != len(cfg.Outputs) {
		return fmt.Errorf("the model returns %d outputs, the config declares %d", len(outs), len(cfg.Outputs))
	}
	for i, o := range cfg.Outputs {
		got, err := repository.FromDType(outs[i].DType)
		if err != nil {
			return fmt.Errorf("output %q: %w", o.Name, err)
		}
		if got != o.DataType {
			return fmt.Errorf("output %q: the model returns %s, the config declares %s", o.Name, got, o.DataType)
		}
		shape := outs[i].Shape
		if cfg.MaxBatchSize > 0 {
			if len(shape) == 0 {
				return fmt.Errorf("output %q: the model returns a scalar, the config declares a batch dimension", o.Name)
			}
			shape = shape[1:]
		}
		if !ShapeMatches(o.Dims, shape) {
			return fmt.Errorf("output %q: the model returns shape %v, the config declares dims %v", o.Name, shape, o.Dims)
		}
	}
	return nil
}

// ShapeMatches reports whether shape fits dims, where -1 matches any size.
func ShapeMatches(dims, shape []int64) bool {
	if len(dims) != len(shape) {
		return false
	}
	for i, d := range dims {
		if d != -1 && d != shape[i] {
			return false
		}
	}
	return true
}

// Unload stops serving model name; it returns once requests in flight have
// finished.
func (m *Manager) Unload(name string) error {
	e := m.entry(name, false)
	if e == nil {
		if _, err := m.repo.Model(name); errors.Is(err, repository.ErrNotFound) {
			return fmt.Errorf("%w: model %q", ErrNotFound, name)
		}
		return nil // known to the repository, not loaded: nothing to do
	}
	e.loadMu.Lock()
	defer e.loadMu.Unlock()
	e.mu.Lock()
	old := e.versions
	e.versions = map[int64]*Version{}
	e.failed = map[int64]string{}
	e.reason = ""
	e.unloaded = true
	e.mu.Unlock()
	for _, v := range old {
		v.retire()
	}
	m.log.Info("model unloaded", "model", name)
	return nil
}

// Poll brings the loaded models in line with the repository: a model whose
// files changed since its last load (or that was never loaded) is loaded
// (atomically, see Load: unchanged versions keep serving, new ones load and
// warm up first, versions the policy no longer selects go), and a model
// whose directory is gone is unloaded. A model unloaded through the API
// stays unloaded until its files change. It returns the failures joined.
func (m *Manager) Poll() error {
	names, err := m.repo.Names()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		fp, err := m.repo.Fingerprint(n)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if e := m.entry(n, false); e != nil {
			e.mu.RLock()
			same := e.fp == fp
			e.mu.RUnlock()
			if same {
				continue
			}
		}
		if err := m.Load(n); err != nil {
			errs = append(errs, err)
		}
	}
	m.mu.RLock()
	var gone []string
	for n := range m.models {
		if !slices.Contains(names, n) {
			gone = append(gone, n)
		}
	}
	m.mu.RUnlock()
	for _, n := range gone {
		e := m.entry(n, false)
		e.mu.RLock()
		idle := e.unloaded && e.fp == ""
		e.mu.RUnlock()
		if idle {
			continue
		}
		if err := m.Unload(n); err != nil {
			errs = append(errs, err)
		}
		e.mu.Lock()
		e.fp = "" // if the directory comes back, load it again
		e.mu.Unlock()
	}
	return errors.Join(errs...)
}

// Acquire returns a serving version of model name: version "" is the
// route's default (SetRoute) when one is set, else the highest loaded one;
// with a split (SetSplit), "" is production or the candidate, drawn at
// random by the split's weight. The caller must call Release when done.
func (m *Manager) Acquire(name, version string) (*Version, error) {
	return m.AcquireFor(name, version, nil)
}

// AcquireFor is Acquire with the request's routing key: under a split
// that names a key (Split.KeyParameter, Split.KeyHeader), key is called
// for it and an unversioned request with a key goes to the version its key
// hashes to (see Split.Weight), so that requests with the same key are
// answered by the same version while the weight holds. key may be nil. A
// request naming a version is never split.
func (m *Manager) AcquireFor(name, version string, key KeyFunc) (*Version, error) {
	e := m.entry(name, false)
	if e == nil {
		return nil, fmt.Errorf("%w: unknown model %q", ErrNotFound, name)
	}
	var want int64
	if version != "" {
		n, err := strconv.ParseInt(version, 10, 64)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%w: model %q has no version %q", ErrNotFound, name, version)
		}
		want = n
	}
	for {
		e.mu.RLock()
		var v *Version
		if want != 0 {
			v = e.versions[want]
		} else if s := e.split.Load(); s != nil && e.versions[s.Production] != nil {
			v = e.versions[s.Production]
			if c := e.versions[s.Candidate]; c != nil && toCandidate(s, key) {
				v = c
			}
		} else if e.def != 0 && e.versions[e.def] != nil {
			v = e.versions[e.def]
		} else if len(e.versions) > 0 {
			v = e.versions[slices.Max(slices.Collect(maps.Keys(e.versions)))]
		}
		reason, unloaded, loading := e.reason, e.unloaded, e.loading
		e.mu.RUnlock()
		switch {
		case v != nil:
			if v.acquire() {
				return v, nil
			}
			continue // swapped out meanwhile: look again
		case want != 0:
			return nil, fmt.Errorf("%w: version %d of model %q is not loaded", ErrNotFound, want, name)
		case unloaded:
			return nil, fmt.Errorf("%w: model %q is not loaded", ErrNotFound, name)
		case reason != "":
			return nil, fmt.Errorf("%w: model %q is not ready: %s", ErrUnavailable, name, reason)
		case loading:
			return nil, fmt.Errorf("%w: model %q is loading", ErrUnavailable, name)
		}
		return nil, fmt.Errorf("%w: unknown model %q", ErrNotFound, name)
	}
}

// Versions returns the loaded version numbers of model name, ascending.
func (m *Manager) Versions(name string) []int64 {
	e := m.entry(name, false)
	if e == nil {
		return nil
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	return slices.Sorted(maps.Keys(e.versions))
}

// Ready reports whether every model the manager has been asked to load
// (and not to unload) has a serving version.
func (m *Manager) Ready() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return false
	}
	for _, e := range m.models {
		e.mu.RLock()
		ok := e.unloaded || len(e.versions) > 0
		e.mu.RUnlock()
		if !ok {
			return false
		}
	}
	return true
}

// IndexEntry is one model version in the repository index.
type IndexEntry struct {
	// Name is the model's name.
	Name string
	// Version is the version, "" for a model never loaded.
	Version string
	// State is READY, UNAVAILABLE, LOADING or "" (never loaded).
	State string
	// Reason says why the version is not ready, if known.
	Reason string
}

// Index lists the repository's models and the state of their versions.
func (m *Manager) Index(readyOnly bool) ([]IndexEntry, error) {
	names, err := m.repo.Names()
	if err != nil {
		return nil, err
	}
	m.mu.RLock()
	for n := range m.models {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	m.mu.RUnlock()
	slices.Sort(names)
	var out []IndexEntry
	for _, n := range names {
		e := m.entry(n, false)
		if e == nil {
			if !readyOnly {
				out = append(out, IndexEntry{Name: n})
			}
			continue
		}
		e.mu.RLock()
		var rows []IndexEntry
		for v := range e.versions {
			// A remote repository's problem (S3 unreachable, ...) shows on
			// the versions that keep serving meanwhile.
			rows = append(rows, IndexEntry{Name: n, Version: strconv.FormatInt(v, 10), State: StateReady, Reason: e.remote})
		}
		if !readyOnly {
			for v, why := range e.failed {
				if _, ok := e.versions[v]; !ok {
					rows = append(rows, IndexEntry{Name: n, Version: strconv.FormatInt(v, 10), State: StateUnavailable, Reason: why})
				}
			}
			if len(rows) == 0 {
				switch {
				case e.loading:
					rows = append(rows, IndexEntry{Name: n, State: StateLoading})
				case e.unloaded:
					rows = append(rows, IndexEntry{Name: n, State: StateUnavailable, Reason: "unloaded"})
				default:
					rows = append(rows, IndexEntry{Name: n, State: StateUnavailable, Reason: e.reason})
				}
			}
		}
		e.mu.RUnlock()
		slices.SortFunc(rows, func(a, b IndexEntry) int {
			x, _ := strconv.ParseInt(a.Version, 10, 64)
			y, _ := strconv.ParseInt(b.Version, 10, 64)
			return cmp.Compare(x, y)
		})
		out = append(out, rows...)
	}
	return out, nil
}

// Loaded returns every serving version, by model name then version. The
// versions are not acquired: use them only for statistics and metadata.
func (m *Manager) Loaded() []*Version {
	m.mu.RLock()
	names := slices.Sorted(maps.Keys(m.models))
	m.mu.RUnlock()
	var out []*Version
	for _, n := range names {
		e := m.entry(n, false)
		e.mu.RLock()
		for _, v := range slices.Sorted(maps.Keys(e.versions)) {
			out = append(out, e.versions[v])
		}
		e.mu.RUnlock()
	}
	return out
}

// Close unloads every model, waiting for requests in flight.
func (m *Manager) Close() {
	m.mu.Lock()
	m.closed = true
	names := slices.Collect(maps.Keys(m.models))
	m.mu.Unlock()
	for _, n := range names {
		_ = m.Unload(n)
	}
	m.retired.Wait()
}

// postprocess applies softmax, along the last dimension, to the outputs
// whose configuration asks for it.
func postprocess(cfg *repository.Config, outs []batcher.Tensor) error {
	for i, o := range cfg.Outputs {
		if !o.Softmax || i >= len(outs) {
			continue
		}
		t := outs[i]
		if len(t.Shape) == 0 {
			return fmt.Errorf("output %q: softmax of a scalar", o.Name)
		}
		classes := int(t.Shape[len(t.Shape)-1])
		switch t.DType {
		case core.Float32:
			softmax(t.Data, classes, 4)
		case core.Float64:
			softmax(t.Data, classes, 8)
		default:
			return fmt.Errorf("output %q: softmax of %v values", o.Name, t.DType)
		}
	}
	return nil
}

// softmax rewrites data, little-endian floats of size bytes in rows of
// classes elements, with each row's softmax (computed in float64, shifted
// by the row's maximum so large logits do not overflow).
func softmax(data []byte, classes, size int) {
	if classes == 0 {
		return
	}
	le := binary.LittleEndian
	get := func(i int) float64 {
		if size == 4 {
			return float64(math.Float32frombits(le.Uint32(data[i*4:])))
		}
		return math.Float64frombits(le.Uint64(data[i*8:]))
	}
	set := func(i int, v float64) {
		if size == 4 {
			le.PutUint32(data[i*4:], math.Float32bits(float32(v)))
		} else {
			le.PutUint64(data[i*8:], math.Float64bits(v))
		}
	}
	n := len(data) / size
	row := make([]float64, classes)
	for start := 0; start+classes <= n; start += classes {
		hi := math.Inf(-1)
		for j := range row {
			row[j] = get(start + j)
			hi = max(hi, row[j])
		}
		var sum float64
		for j := range row {
			row[j] = math.Exp(row[j] - hi)
			sum += row[j]
		}
		for j := range row {
			set(start+j, row[j]/sum)
		}
	}
}
