package rollout

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kilnml/kiln/internal/atomicfile"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/batcher"
	"github.com/kilnml/kiln/serving/manager"
	"go.yaml.in/yaml/v3"
)

// States of a rollout.
const (
	Running    = "running"
	Promoted   = "promoted"
	RolledBack = "rolled_back"
	Aborted    = "aborted"
)

// CandidateAlias is the registry alias a rollout's candidate may be named
// by (and that Options.Auto watches).
const CandidateAlias = "candidate"

// Window is one version's figures over an analysis window.
type Window struct {
	Version   int64   `json:"version"`
	Requests  uint64  `json:"requests"`
	Errors    uint64  `json:"errors"`
	ErrorRate float64 `json:"error_rate"`
	// P50Ms and P99Ms are latency percentiles of the successful
	// requests, in milliseconds (upper bounds of the histogram's
	// buckets, within 19%).
	P50Ms float64 `json:"p50_ms"`
	P99Ms float64 `json:"p99_ms"`
}

// Verdict is the analysis of one window.
type Verdict struct {
	At     time.Time `json:"at"`
	Step   int       `json:"step"`
	Weight float64   `json:"weight"`
	// Verdict is "pass" or "fail".
	Verdict    string `json:"verdict"`
	Reason     string `json:"reason,omitempty"`
	Production Window `json:"production"`
	Candidate  Window `json:"candidate"`
	// Agreement is the share of compared rows on which the candidate
	// predicted production's class (nil: none compared).
	Agreement  *float64 `json:"agreement,omitempty"`
	Compared   int      `json:"compared"`
	MaxAbsDiff float64  `json:"max_abs_diff"`
}

// Live is the current window so far.
type Live struct {
	Production Window   `json:"production"`
	Candidate  Window   `json:"candidate"`
	Agreement  *float64 `json:"agreement,omitempty"`
	Shadowed   uint64   `json:"shadowed"`
}

// Status is a rollout as the REST API and the CLI show it.
type Status struct {
	Model      string    `json:"model"`
	Production int64     `json:"production"`
	Candidate  int64     `json:"candidate"`
	State      string    `json:"state"`
	Step       int       `json:"step"`
	Steps      []float64 `json:"steps"`
	// Weight is the candidate's share of unversioned requests now, in
	// [0, 1].
	Weight        float64   `json:"weight"`
	Shadow        float64   `json:"shadow"`
	Window        Duration  `json:"window"`
	Policy        Policy    `json:"policy"`
	StartedAt     time.Time `json:"started_at"`
	StepStartedAt time.Time `json:"step_started_at"`
	EndedAt       time.Time `json:"ended_at,omitzero"`
	Reason        string    `json:"reason,omitempty"`
	// RunID is the registry run recording the rollout ("" without a
	// registry).
	RunID   string    `json:"run_id,omitempty"`
	History []Verdict `json:"history"`
	Live    *Live     `json:"live,omitempty"`
	// Actor started the rollout.
	Actor string `json:"actor,omitempty"`
}

// Installer puts a registry version of a model into the served
// repository, so that the manager can load it (the registry follower does
// this).
type Installer interface {
	Install(ctx context.Context, name string, version int) error
}

// Options configure a Controller.
type Options struct {
	// Manager serves the models (required).
	Manager *manager.Manager
	// Registry, when set, names production and the candidate by alias,
	// records verdicts and moves the production alias on promotion.
	Registry *registry.Registry
	// Installer fetches a registry version the repository lacks (nil: the
	// candidate must be in the repository).
	Installer Installer
	// StateDir keeps each rollout as <model>.json, so that it survives a
	// restart ("" keeps rollouts in memory only).
	StateDir string
	// Policies are the server's policies (--rollout-policy).
	Policies PolicyFile
	// Auto starts a rollout whenever a registry model's "candidate"
	// alias names a version other than production's that has not been
	// rolled out yet (needs Registry).
	Auto bool
	// Tick is how often rollouts are analysed (default 500ms).
	Tick time.Duration
	// Logger receives the rollouts' events (default slog.Default()).
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Controller runs the rollouts of one server. Its methods are safe for
// concurrent use.
type Controller struct {
	o  Options
	mu sync.Mutex // guards rollouts and serializes their changes
	// rollouts holds the latest rollout of each model.
	rollouts map[string]*rollout
}

type rollout struct {
	st Status
	// Window baselines: the versions' statistics when the window began.
	prodBase, candBase batcher.StatsSnapshot
	// lastProdP99 and lastProdP50 are production's p99 and p50 in the
	// latest window that had enough production traffic (the references
	// when the candidate takes all).
	lastProdP99, lastProdP50 time.Duration
	shadow                   shadowAcc
	resumed                  bool // the split is in force in this process
}

// shadowAcc accumulates a window's shadow comparisons; it is the split's
// ShadowSink.
type shadowAcc struct {
	mu                    sync.Mutex
	n, errs, rows, agree  int
	maxDiff               float64
	mismatch              string
	totalShadowed, dropMu uint64
}

// RecordShadow adds one comparison (manager.ShadowSink).
func (a *shadowAcc) RecordShadow(r manager.ShadowResult) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.n++
	a.totalShadowed++
	if r.Err != nil {
		a.errs++
		return
	}
	a.rows += r.Rows
	a.agree += r.Agree
	a.maxDiff = max(a.maxDiff, r.MaxAbsDiff)
	if r.Mismatch != "" {
		a.mismatch = r.Mismatch
	}
}

// shadowWindow is a window's shadow comparisons.
type shadowWindow struct {
	n, errs, rows, agree int
	maxDiff              float64
	mismatch             string
}

func (a *shadowAcc) take() shadowWindow {
	a.mu.Lock()
	defer a.mu.Unlock()
	w := shadowWindow{n: a.n, errs: a.errs, rows: a.rows, agree: a.agree, maxDiff: a.maxDiff, mismatch: a.mismatch}
	a.n, a.errs, a.rows, a.agree, a.maxDiff, a.mismatch = 0, 0, 0, 0, 0, ""
	return w
}

func (a *shadowAcc) peek() (shadowWindow, uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return shadowWindow{n: a.n, errs: a.errs, rows: a.rows, agree: a.agree, maxDiff: a.maxDiff}, a.totalShadowed
}

// withShadow adds a window's shadow requests to the candidate's figures:
// they count for its error rate (not its latency, measured beside the
// load).
func (w Window) withShadow(s shadowWindow) Window {
	w.Requests += uint64(s.n)
	w.Errors += uint64(s.errs)
	w.ErrorRate = 0
	if w.Requests > 0 {
		w.ErrorRate = float64(w.Errors) / float64(w.Requests)
	}
	return w
}

// New returns a controller; call Resume, then Run.
func New(o Options) (*Controller, error) {
	if o.Manager == nil {
		return nil, core.Errorf(core.InvalidArgument, "rollout: a manager is required")
	}
	if o.Auto && o.Registry == nil {
		return nil, core.Errorf(core.InvalidArgument, "rollout: automatic rollouts need a registry (--registry)")
	}
	if o.Tick <= 0 {
		o.Tick = 500 * time.Millisecond
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.StateDir != "" {
		if err := os.MkdirAll(o.StateDir, 0o755); err != nil {
			return nil, core.Errorf(core.Internal, "rollout: state directory: %v", err)
		}
	}
	return &Controller{o: o, rollouts: map[string]*rollout{}}, nil
}

// StartRequest asks for a rollout.
type StartRequest struct {
	// Candidate is the version to roll out (0: the registry's "candidate"
	// alias).
	Candidate int64 `json:"candidate"`
	// Policy overrides the model's policy (the server's file, then the
	// model's config).
	Policy
	// Actor is who starts it (recorded in the registry).
	Actor string `json:"actor,omitempty"`
}

// Start begins a rollout of model name's candidate against the version
// that serves its unversioned requests now. The candidate is installed
// from the registry when the repository lacks it, loaded and warmed up
// before it takes any traffic.
//
// Errors: NOT_FOUND for an unknown model or candidate; INVALID_ARGUMENT
// for a bad policy or a candidate equal to production; ALREADY_EXISTS
// when a rollout of the model is running; the load's error when the
// candidate does not load (nothing changes then).
func (c *Controller) Start(ctx context.Context, name string, req StartRequest) (Status, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if r := c.rollouts[name]; r != nil && r.st.State == Running {
		return Status{}, core.Errorf(core.AlreadyExists, "model %q: a rollout of version %d is running (abort or promote it first)", name, r.st.Candidate)
	}
	pol, err := c.policy(name)
	if err != nil {
		return Status{}, err
	}
	pol = pol.Merge(req.Policy).WithDefaults()
	if err := pol.Validate(); err != nil {
		return Status{}, err
	}
	prod, err := c.production(ctx, name)
	if err != nil {
		return Status{}, err
	}
	cand := req.Candidate
	if cand == 0 {
		if c.o.Registry == nil {
			return Status{}, core.Errorf(core.InvalidArgument, "model %q: name the candidate version (no registry to read a %q alias from)", name, CandidateAlias)
		}
		v, err := c.o.Registry.Alias(ctx, name, CandidateAlias)
		if err != nil {
			return Status{}, fmt.Errorf("model %q: no candidate version given and %w", name, err)
		}
		cand = int64(v)
	}
	if cand < 1 || cand == prod {
		return Status{}, core.Errorf(core.InvalidArgument, "model %q: candidate version %d must differ from production %d", name, cand, prod)
	}
	if err := c.install(ctx, name, cand); err != nil {
		return Status{}, err
	}
	now := c.o.Now().UTC()
	r := &rollout{st: Status{
		Model: name, Production: prod, Candidate: cand, State: Running, Steps: pol.Steps,
		Shadow: pol.Shadow, Window: pol.Window, Policy: pol, StartedAt: now, StepStartedAt: now,
		History: []Verdict{}, Actor: req.Actor,
	}}
	r.st.Weight = pol.Steps[0] / 100
	if err := c.apply(name, r); err != nil {
		return Status{}, err
	}
	if c.o.Registry != nil {
		params := map[string]string{"production": fmt.Sprint(prod), "candidate": fmt.Sprint(cand), "policy": string(mustJSON(pol))}
		run, err := c.o.Registry.StartRun(ctx, "rollout", name, req.Actor, params)
		if err != nil {
			c.o.Logger.Warn("rollout: registry run not recorded", "model", name, "err", err)
		} else {
			r.st.RunID = run.ID
		}
	}
	c.rollouts[name] = r
	c.save(r)
	c.o.Logger.Info("rollout started", "model", name, "production", prod, "candidate", cand,
		"steps", pol.Steps, "window", time.Duration(pol.Window), "shadow", pol.Shadow, "run_id", r.st.RunID)
	return c.status(r), nil
}

// policy returns model name's policy before a start request's: the
// server's default, then the model config's rollout block, then the
// server's policy file's entry for the model.
func (c *Controller) policy(name string) (Policy, error) {
	pol := c.o.Policies.Default
	if rm, err := c.o.Manager.Repository().Model(name); err == nil && len(rm.Config.Rollout) > 0 {
		var own Policy
		if err := decodeStrict(rm.Config.Rollout, &own); err != nil {
			return Policy{}, core.Errorf(core.InvalidArgument, "model %q: the config's rollout block: %v", name, err)
		}
		pol = pol.Merge(own)
	}
	if own, ok := c.o.Policies.Models[name]; ok {
		pol = pol.Merge(own)
	}
	return pol, nil
}

// production returns the version that answers model name's unversioned
// requests now (a split's production if one is left over).
func (c *Controller) production(ctx context.Context, name string) (int64, error) {
	m := c.o.Manager
	if s, ok := m.SplitOf(name); ok {
		return s.Production, nil
	}
	if rt, ok := m.RouteOf(name); ok {
		return rt.Default, nil
	}
	v, err := m.Acquire(name, "")
	if err != nil {
		return 0, err
	}
	defer v.Release()
	return v.Number(), nil
}

func (c *Controller) install(ctx context.Context, name string, v int64) error {
	if rm, err := c.o.Manager.Repository().Model(name); (err == nil && slices.Contains(rm.Versions, v)) || c.o.Installer == nil {
		return nil
	}
	if err := c.o.Installer.Install(ctx, name, int(v)); err != nil {
		return fmt.Errorf("model %q: install candidate version %d from the registry: %w", name, v, err)
	}
	return nil
}

// apply puts r's split in force: production pinned as the route's default
// (so that a new version in the repository does not take over), the
// candidate loaded and weighted.
func (c *Controller) apply(name string, r *rollout) error {
	m := c.o.Manager
	if rt, ok := m.RouteOf(name); !ok || rt.Default != r.st.Production {
		keep := rt.Keep
		if !ok {
			keep = nil
		}
		keep = slices.DeleteFunc(slices.Clone(keep), func(v int64) bool { return v == r.st.Candidate || v == r.st.Production })
		if err := m.SetRoute(name, manager.Route{Default: r.st.Production, Keep: keep}); err != nil {
			return err
		}
	}
	err := m.SetSplit(name, &manager.Split{
		Production: r.st.Production, Candidate: r.st.Candidate, Weight: r.st.Weight, Shadow: r.st.Shadow,
		KeyParameter: r.st.Policy.StickyParameter, KeyHeader: r.st.Policy.StickyHeader, Sink: &r.shadow,
	})
	if err != nil {
		return err
	}
	r.prodBase, r.candBase = c.snapshot(name, r.st.Production), c.snapshot(name, r.st.Candidate)
	r.shadow.take()
	r.resumed = true
	return nil
}

func (c *Controller) snapshot(name string, v int64) batcher.StatsSnapshot {
	ver, err := c.o.Manager.Acquire(name, fmt.Sprint(v))
	if err != nil {
		return batcher.StatsSnapshot{}
	}
	defer ver.Release()
	return ver.Stats().Snapshot()
}

// window returns a version's figures since base, with its p99 and p50.
func window(v int64, now, base batcher.StatsSnapshot) (Window, time.Duration, time.Duration) {
	ok := now.Success.Count - min(now.Success.Count, base.Success.Count)
	bad := now.Fail.Count - min(now.Fail.Count, base.Fail.Count)
	h := now.Latency.Sub(base.Latency)
	w := Window{Version: v, Requests: ok + bad, Errors: bad}
	if w.Requests > 0 {
		w.ErrorRate = float64(bad) / float64(w.Requests)
	}
	p99, p50 := h.Quantile(0.99), h.Quantile(0.5)
	w.P50Ms = float64(p50) / 1e6
	w.P99Ms = float64(p99) / 1e6
	return w, p99, p50
}

// Abort ends model name's running rollout: all traffic back to production,
// the candidate unloaded, the reason recorded. FAILED_PRECONDITION when no
// rollout is running.
func (c *Controller) Abort(ctx context.Context, name, reason string) (Status, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.rollouts[name]
	if r == nil || r.st.State != Running {
		return Status{}, core.Errorf(core.FailedPrecondition, "model %q: no rollout is running", name)
	}
	if reason == "" {
		reason = "aborted by request"
	}
	c.end(ctx, name, r, Aborted, reason, nil)
	return c.status(r), nil
}

// Promote ends model name's running rollout now by promoting the
// candidate, skipping the remaining steps. FAILED_PRECONDITION when no
// rollout is running; ABORTED when the registry's production alias moved
// meanwhile (the rollout is then aborted).
func (c *Controller) Promote(ctx context.Context, name string) (Status, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.rollouts[name]
	if r == nil || r.st.State != Running {
		return Status{}, core.Errorf(core.FailedPrecondition, "model %q: no rollout is running", name)
	}
	err := c.promote(ctx, name, r, "promoted by request", nil)
	return c.status(r), err
}

// Status returns model name's latest rollout.
func (c *Controller) Status(name string) (Status, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.rollouts[name]
	if r == nil {
		return Status{}, false
	}
	return c.status(r), true
}

// List returns the latest rollout of every model, by model name.
func (c *Controller) List() []Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := []Status{}
	for _, name := range slices.Sorted(maps.Keys(c.rollouts)) {
		out = append(out, c.status(c.rollouts[name]))
	}
	return out
}

// status copies r's status, with the live window when running.
func (c *Controller) status(r *rollout) Status {
	st := r.st
	st.Steps = slices.Clone(st.Steps)
	st.History = slices.Clone(st.History)
	if st.State == Running && r.resumed {
		prod, _, _ := window(st.Production, c.snapshot(st.Model, st.Production), r.prodBase)
		cand, _, _ := window(st.Candidate, c.snapshot(st.Model, st.Candidate), r.candBase)
		sw, total := r.shadow.peek()
		live := &Live{Production: prod, Candidate: cand.withShadow(sw), Shadowed: total}
		if sw.rows > 0 {
			a := float64(sw.agree) / float64(sw.rows)
			live.Agreement = &a
		}
		st.Live = live
	}
	return st
}

// Run analyses the running rollouts every Tick (and, with Auto, starts
// rollouts of new candidates) until ctx is done.
func (c *Controller) Run(ctx context.Context) {
	t := time.NewTicker(c.o.Tick)
	defer t.Stop()
	var lastAuto time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c.Analyse(ctx)
		if c.o.Auto && c.o.Now().Sub(lastAuto) >= 2*time.Second {
			lastAuto = c.o.Now()
			c.autoStart(ctx)
		}
	}
}

// Analyse makes one pass over the running rollouts: a rollout whose
// window has ended is judged (next step, promotion or rollback); one not
// yet in force in this process (resumed from its state file) is put in
// force when its model is loaded.
func (c *Controller) Analyse(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.o.Now().UTC()
	for _, name := range slices.Sorted(maps.Keys(c.rollouts)) {
		r := c.rollouts[name]
		if r.st.State != Running {
			continue
		}
		if !r.resumed {
			c.resume(ctx, name, r)
			continue
		}
		if now.Sub(r.st.StepStartedAt) < time.Duration(r.st.Window) {
			continue
		}
		c.judge(ctx, name, r, now)
	}
}

// judge decides r's window.
func (c *Controller) judge(ctx context.Context, name string, r *rollout, now time.Time) {
	pol := r.st.Policy
	prodNow, candNow := c.snapshot(name, r.st.Production), c.snapshot(name, r.st.Candidate)
	prod, prodP99, prodP50 := window(r.st.Production, prodNow, r.prodBase)
	canary, candP99, candP50 := window(r.st.Candidate, candNow, r.candBase)
	sw, _ := r.shadow.peek()
	cand := canary.withShadow(sw)
	if cand.Requests < uint64(pol.MinRequests) {
		if r.st.Reason == "" || strings.HasPrefix(r.st.Reason, "waiting") {
			r.st.Reason = fmt.Sprintf("waiting for traffic: %d of %d candidate requests in this window", cand.Requests, pol.MinRequests)
		}
		return // extend the window
	}
	sw = r.shadow.take()
	cand = canary.withShadow(sw)
	rows, mismatch := sw.rows, sw.mismatch
	v := Verdict{At: now, Step: r.st.Step, Weight: r.st.Weight, Verdict: "pass", Production: prod, Candidate: cand,
		Compared: rows, MaxAbsDiff: sw.maxDiff}
	if rows > 0 {
		a := float64(sw.agree) / float64(rows)
		v.Agreement = &a
	}
	if prod.Requests >= uint64(max(10, pol.MinRequests/2)) && prodP99 > 0 {
		// Enough of production's requests for a p99 to compare with; at
		// the last steps the candidate takes (nearly) all, and the
		// latest such p99 stays the reference.
		r.lastProdP99, r.lastProdP50 = prodP99, prodP50
	}
	var fails []string
	if cand.ErrorRate > prod.ErrorRate+*pol.MaxErrorRateIncrease {
		fails = append(fails, fmt.Sprintf("error rate %.2f%% > production's %.2f%% + %.2f points",
			100*cand.ErrorRate, 100*prod.ErrorRate, 100**pol.MaxErrorRateIncrease))
	}
	if ref := r.lastProdP99; ref > 0 && canary.Requests > 0 && float64(candP99) > pol.MaxP99Ratio*float64(ref) {
		fails = append(fails, fmt.Sprintf("p99 latency %.3f ms > %.1f × production's %.3f ms",
			float64(candP99)/1e6, pol.MaxP99Ratio, float64(ref)/1e6))
	}
	if ref := r.lastProdP50; ref > 0 && canary.Requests > 0 && float64(candP50) > pol.MaxP50Ratio*float64(ref) {
		fails = append(fails, fmt.Sprintf("p50 latency %.3f ms > %.1f × production's %.3f ms",
			float64(candP50)/1e6, pol.MaxP50Ratio, float64(ref)/1e6))
	}
	if v.Agreement != nil && rows >= pol.MinRequests && *v.Agreement < *pol.MinAgreement {
		fails = append(fails, fmt.Sprintf("agreement with production %.1f%% < %.1f%% over %d rows",
			100**v.Agreement, 100**pol.MinAgreement, rows))
	}
	if mismatch != "" {
		fails = append(fails, "outputs differ from production's: "+mismatch)
	}
	if len(fails) > 0 {
		v.Verdict, v.Reason = "fail", strings.Join(fails, "; ")
	}
	r.st.History = append(r.st.History, v)
	c.logWindow(ctx, r, v)
	c.o.Logger.Info("rollout window", "model", name, "step", r.st.Step, "weight", r.st.Weight, "verdict", v.Verdict,
		"reason", v.Reason, "candidate_requests", cand.Requests, "candidate_error_rate", cand.ErrorRate,
		"production_error_rate", prod.ErrorRate, "candidate_p99_ms", cand.P99Ms, "production_p99_ms", prod.P99Ms)
	if v.Verdict == "fail" {
		c.end(ctx, name, r, RolledBack, "step "+fmt.Sprint(r.st.Step)+" failed: "+v.Reason, &v)
		return
	}
	if r.st.Step+1 >= len(r.st.Steps) {
		_ = c.promote(ctx, name, r, "every step passed", &v)
		return
	}
	r.st.Step++
	r.st.Weight = r.st.Steps[r.st.Step] / 100
	r.st.StepStartedAt = now
	r.st.Reason = ""
	if err := c.o.Manager.SetSplit(name, &manager.Split{
		Production: r.st.Production, Candidate: r.st.Candidate, Weight: r.st.Weight, Shadow: r.st.Shadow,
		KeyParameter: pol.StickyParameter, KeyHeader: pol.StickyHeader, Sink: &r.shadow,
	}); err != nil {
		c.end(ctx, name, r, Aborted, "could not move to the next step: "+err.Error(), nil)
		return
	}
	r.prodBase, r.candBase = prodNow, candNow
	c.save(r)
}

func (c *Controller) logWindow(ctx context.Context, r *rollout, v Verdict) {
	if c.o.Registry == nil || r.st.RunID == "" {
		return
	}
	m := map[string]float64{
		"weight": v.Weight, "candidate_requests": float64(v.Candidate.Requests), "candidate_error_rate": v.Candidate.ErrorRate,
		"candidate_p99_ms": v.Candidate.P99Ms, "production_requests": float64(v.Production.Requests),
		"production_error_rate": v.Production.ErrorRate, "production_p99_ms": v.Production.P99Ms, "max_abs_diff": v.MaxAbsDiff,
	}
	if v.Agreement != nil {
		m["agreement"] = *v.Agreement
	}
	if v.Verdict == "pass" {
		m["passed"] = 1
	} else {
		m["passed"] = 0
	}
	if err := c.o.Registry.LogMetrics(ctx, r.st.RunID, len(r.st.History)-1, m); err != nil {
		c.o.Logger.Warn("rollout: registry metrics not recorded", "model", r.st.Model, "err", err)
	}
}

// end stops r without promoting: the split is cleared (all traffic to
// production, the candidate unloaded), the registry told.
func (c *Controller) end(ctx context.Context, name string, r *rollout, state, reason string, last *Verdict) {
	if err := c.o.Manager.SetSplit(name, nil); err != nil {
		c.o.Logger.Error("rollout: clearing the split", "model", name, "err", err)
	}
	r.st.State, r.st.Reason, r.st.EndedAt, r.st.Weight = state, reason, c.o.Now().UTC(), 0
	r.resumed = false
	if reg := c.o.Registry; reg != nil {
		verdict := "rollback"
		if state == Aborted {
			verdict = "aborted"
		}
		ev, err := reg.RecordEvaluation(ctx, registry.Evaluation{Model: name, Version: int(r.st.Candidate), Verdict: verdict,
			Evidence: mustJSON(evidence(r, last)), RunID: r.st.RunID, CreatedBy: "kiln-rollout"})
		if err != nil {
			c.o.Logger.Warn("rollout: verdict not recorded in the registry", "model", name, "err", err)
		}
		if cur, err := reg.Alias(ctx, name, CandidateAlias); err == nil && int64(cur) == r.st.Candidate {
			_, err := reg.CompareAndSwap(ctx, registry.Move{Model: name, Alias: CandidateAlias, Expected: cur, To: 0,
				Actor: "kiln-rollout", Reason: reason, Verdict: verdict, EvaluationID: ev.ID})
			if err != nil {
				c.o.Logger.Warn("rollout: candidate alias not removed", "model", name, "err", err)
			}
		}
		c.finishRun(ctx, r, registry.Failed, errors.New(reason))
	}
	c.save(r)
	c.o.Logger.Warn("rollout ended", "model", name, "state", state, "reason", reason,
		"production", r.st.Production, "candidate", r.st.Candidate)
}

// promote makes the candidate production: the registry's production alias
// first (compare-and-swap from the rollout's production), then the route,
// then the split cleared. When the registry refuses the move (production
// moved meanwhile) the rollout is aborted and the error is
// FAILED_PRECONDITION.
func (c *Controller) promote(ctx context.Context, name string, r *rollout, reason string, last *Verdict) error {
	if reg := c.o.Registry; reg != nil {
		if _, err := reg.Version(ctx, name, int(r.st.Candidate)); err == nil {
			ev, err := reg.RecordEvaluation(ctx, registry.Evaluation{Model: name, Version: int(r.st.Candidate), Verdict: "pass",
				Evidence: mustJSON(evidence(r, last)), RunID: r.st.RunID, CreatedBy: "kiln-rollout"})
			if err != nil {
				c.o.Logger.Warn("rollout: verdict not recorded in the registry", "model", name, "err", err)
			}
			_, err = reg.CompareAndSwap(ctx, registry.Move{Model: name, Alias: "production", Expected: int(r.st.Production),
				To: int(r.st.Candidate), Actor: "kiln-rollout", Reason: "rollout: " + reason, Verdict: "pass", EvaluationID: ev.ID})
			if err != nil {
				c.end(ctx, name, r, Aborted, "promotion refused by the registry: "+err.Error(), last)
				return core.Errorf(core.FailedPrecondition, "model %q: promotion refused by the registry: %v", name, err)
			}
			if cur, err := reg.Alias(ctx, name, CandidateAlias); err == nil && int64(cur) == r.st.Candidate {
				_, _ = reg.CompareAndSwap(ctx, registry.Move{Model: name, Alias: CandidateAlias, Expected: cur, To: 0,
					Actor: "kiln-rollout", Reason: "promoted to production", Verdict: "pass", EvaluationID: ev.ID})
			}
		}
	}
	if err := c.o.Manager.SetRoute(name, manager.Route{Default: r.st.Candidate, Keep: []int64{r.st.Production}}); err != nil {
		c.o.Logger.Error("rollout: routing to the promoted version", "model", name, "err", err)
	}
	if err := c.o.Manager.SetSplit(name, nil); err != nil {
		c.o.Logger.Error("rollout: clearing the split", "model", name, "err", err)
	}
	r.st.State, r.st.Reason, r.st.EndedAt, r.st.Weight, r.resumed = Promoted, reason, c.o.Now().UTC(), 1, false
	if c.o.Registry != nil {
		c.finishRun(ctx, r, registry.Finished, nil)
	}
	c.save(r)
	c.o.Logger.Info("rollout promoted", "model", name, "version", r.st.Candidate, "previous", r.st.Production, "reason", reason)
	return nil
}

func (c *Controller) finishRun(ctx context.Context, r *rollout, st registry.RunStatus, runErr error) {
	if r.st.RunID == "" {
		return
	}
	m := map[string]float64{"steps_passed": float64(countPassed(r.st.History))}
	if _, err := c.o.Registry.FinishRun(ctx, r.st.RunID, st, m, runErr); err != nil {
		c.o.Logger.Warn("rollout: registry run not finished", "model", r.st.Model, "err", err)
	}
}

func countPassed(h []Verdict) int {
	n := 0
	for _, v := range h {
		if v.Verdict == "pass" {
			n++
		}
	}
	return n
}

func evidence(r *rollout, last *Verdict) map[string]any {
	return map[string]any{"kind": "rollout", "production": r.st.Production, "candidate": r.st.Candidate,
		"policy": r.st.Policy, "history": r.st.History, "last": last, "run_id": r.st.RunID}
}

// Resume reads the state directory: running rollouts are put in force
// again (on the next Analyse once their models are loaded), after the
// registry is consulted — a rollout whose candidate is production already
// was promoted before the restart, one whose production alias moved
// elsewhere is aborted. Ended rollouts of models without a registry get
// their route back (the promoted version, or production).
func (c *Controller) Resume(ctx context.Context) error {
	if c.o.StateDir == "" {
		return nil
	}
	ents, err := os.ReadDir(c.o.StateDir)
	if err != nil {
		return core.Errorf(core.Internal, "rollout: read state directory: %v", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range ents {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(c.o.StateDir, e.Name()))
		if err != nil {
			return core.Errorf(core.Internal, "rollout: %v", err)
		}
		var st Status
		if err := json.Unmarshal(b, &st); err != nil || st.Model == "" {
			c.o.Logger.Error("rollout: unreadable state file skipped", "file", e.Name(), "err", err)
			continue
		}
		r := &rollout{st: st}
		if r.st.History == nil {
			r.st.History = []Verdict{}
		}
		c.rollouts[st.Model] = r
		c.o.Logger.Info("rollout state read", "model", st.Model, "state", st.State, "step", st.Step)
	}
	return nil
}

// resume puts a rollout read from its state file in force, or ends it when
// the registry says it ended.
func (c *Controller) resume(ctx context.Context, name string, r *rollout) {
	if reg := c.o.Registry; reg != nil {
		prod, err := reg.Alias(ctx, name, "production")
		switch {
		case err != nil && core.CodeOf(err) != core.NotFound:
			return // the registry is unreachable: try again later
		case int64(prod) == r.st.Candidate:
			r.st.State, r.st.Reason, r.st.EndedAt, r.st.Weight = Promoted, "promoted before the restart", c.o.Now().UTC(), 1
			c.finishRun(ctx, r, registry.Finished, nil)
			c.save(r)
			c.o.Logger.Info("rollout finished: the registry's production is the candidate", "model", name, "version", r.st.Candidate)
			return
		case err == nil && int64(prod) != r.st.Production:
			r.resumed = true // nothing of it is in force; end clears nothing harmful
			c.end(ctx, name, r, Aborted, fmt.Sprintf("the registry's production moved to version %d during the restart", prod), nil)
			return
		}
	}
	if len(c.o.Manager.Versions(name)) == 0 {
		return // not loaded yet (the follower installs it): next pass
	}
	if err := c.install(ctx, name, r.st.Candidate); err != nil {
		c.end(ctx, name, r, Aborted, "resuming after a restart: "+err.Error(), nil)
		return
	}
	if err := c.apply(name, r); err != nil {
		c.end(ctx, name, r, Aborted, "resuming after a restart: "+err.Error(), nil)
		return
	}
	r.st.StepStartedAt = c.o.Now().UTC() // the window starts again
	c.save(r)
	c.o.Logger.Info("rollout resumed", "model", name, "step", r.st.Step, "weight", r.st.Weight)
}

// RestoreRoutes gives models without a registry the route their ended
// rollouts left (call after the manager has loaded the repository): the
// promoted candidate, or production after a rollback, so that a restart
// serves what the rollout decided. Models followed from a registry get
// their route from the follower.
func (c *Controller) RestoreRoutes() {
	if c.o.Registry != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, r := range c.rollouts {
		var rt manager.Route
		switch r.st.State {
		case Promoted:
			rt = manager.Route{Default: r.st.Candidate}
		case RolledBack, Aborted:
			rt = manager.Route{Default: r.st.Production}
		default:
			continue
		}
		if err := c.o.Manager.SetRoute(name, rt); err != nil {
			c.o.Logger.Warn("rollout: restoring the route of an ended rollout", "model", name, "err", err)
		}
	}
}

// autoStart starts rollouts of registry models whose candidate alias names
// a version never rolled out by this controller.
func (c *Controller) autoStart(ctx context.Context) {
	models, err := c.o.Registry.Models(ctx)
	if err != nil {
		c.o.Logger.Debug("rollout: registry", "err", err)
		return
	}
	for _, m := range models {
		cand, ok := m.Aliases[CandidateAlias]
		prod, hasProd := m.Aliases["production"]
		if !ok || !hasProd || cand == prod || len(c.o.Manager.Versions(m.Name)) == 0 {
			continue
		}
		c.mu.Lock()
		r := c.rollouts[m.Name]
		seen := r != nil && (r.st.State == Running || r.st.Candidate == int64(cand))
		c.mu.Unlock()
		if seen {
			continue
		}
		if _, err := c.Start(ctx, m.Name, StartRequest{Candidate: int64(cand), Actor: "kiln-rollout"}); err != nil {
			c.o.Logger.Warn("rollout: automatic start failed", "model", m.Name, "candidate", cand, "err", err)
			c.mu.Lock()
			if c.rollouts[m.Name] == nil || c.rollouts[m.Name].st.Candidate != int64(cand) {
				now := c.o.Now().UTC()
				c.rollouts[m.Name] = &rollout{st: Status{Model: m.Name, Production: int64(prod), Candidate: int64(cand),
					State: Aborted, Reason: "automatic start failed: " + err.Error(), StartedAt: now, EndedAt: now, History: []Verdict{}}}
			}
			c.mu.Unlock()
		}
	}
}

// save writes r's state file atomically (temporary file, fsync, rename).
func (c *Controller) save(r *rollout) {
	if c.o.StateDir == "" {
		return
	}
	st := r.st
	st.Live = nil
	b, err := json.MarshalIndent(st, "", "  ")
	if err == nil {
		err = atomicfile.WriteFile(filepath.Join(c.o.StateDir, r.st.Model+".json"), b, 0o644)
	}
	if err != nil {
		c.o.Logger.Error("rollout: state not saved", "model", r.st.Model, "err", err)
	}
}

// decodeStrict reads YAML (or JSON) into v, refusing unknown fields.
func decodeStrict(data []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}
