// Package runlog records Kiln's jobs as registry runs, the same way from
// every entry point: the kiln command (train, select, optimize), the
// Python bindings (fit, select_model, prune/quantize) and the Flight
// `train` action. A Tracker wraps one run (parameters when it starts,
// metrics per epoch, final metrics, status, duration and error when it
// ends, the version it registers); the other functions give the
// parameters and metrics of each kind of job their one shape (MLflow's
// style: flat keys joined with '.', values as text).
//
// A nil *Tracker records nothing, so callers track unconditionally and
// decide once whether a registry is in use.
package runlog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os/user"

	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/registry"
)

// Run kinds.
const (
	KindTrain    = "train"
	KindSelect   = "select"
	KindOptimize = "optimize"
)

// Tracker records one job's run in a registry. Its methods are safe to
// call on a nil *Tracker (they do nothing) but not concurrently.
type Tracker struct {
	// Registry holds the run; Run is the run as it started.
	Registry *registry.Registry
	Run      registry.Run
	// Actor is who runs the job (recorded with the versions it
	// registers).
	Actor  string
	owns   bool // Close closes Registry
	warned bool
	log    *slog.Logger
}

// Options configure Start.
type Options struct {
	// Model is the registered model the run is for ("" when none).
	Model string
	// Actor runs the job (default: DefaultActor()).
	Actor string
	// CloseRegistry makes Tracker.Close close the registry.
	CloseRegistry bool
	// Logger receives the warnings (default slog.Default()).
	Logger *slog.Logger
}

// Start records a new running run of kind with params in r.
func Start(ctx context.Context, r *registry.Registry, kind string, params map[string]string, o Options) (*Tracker, error) {
	if o.Actor == "" {
		o.Actor = DefaultActor()
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	run, err := r.StartRun(ctx, kind, o.Model, o.Actor, params)
	if err != nil {
		return nil, err
	}
	o.Logger.Debug("registry: run started", "run", run.ID, "kind", kind)
	return &Tracker{Registry: r, Run: run, Actor: o.Actor, owns: o.CloseRegistry, log: o.Logger}, nil
}

// DefaultActor is the OS user's name, else "unknown".
func DefaultActor() string {
	if u, err := user.Current(); err == nil && u.Username != "" {
		return u.Username
	}
	return "unknown"
}

// ID is the run's id ("" for a nil Tracker).
func (t *Tracker) ID() string {
	if t == nil {
		return ""
	}
	return t.Run.ID
}

// Epoch logs metrics at step. A failure only warns (once): the registry
// never stops a job.
func (t *Tracker) Epoch(step int, metrics map[string]float64) {
	if t == nil || len(metrics) == 0 {
		return
	}
	if err := t.Registry.LogMetrics(context.Background(), t.Run.ID, step, metrics); err != nil && !t.warned {
		t.warned = true
		t.log.Warn("registry: cannot log metrics; the run goes on", "run", t.Run.ID, "err", err)
	}
}

// LogParams adds parameters to the run.
func (t *Tracker) LogParams(ctx context.Context, params map[string]string) error {
	if t == nil {
		return nil
	}
	return t.Registry.LogParams(ctx, t.Run.ID, params)
}

// Finish ends the run: FINISHED when runErr is nil, KILLED when it was
// cancelled, FAILED otherwise, with the final metrics.
func (t *Tracker) Finish(runErr error, metrics map[string]float64) error {
	if t == nil {
		return nil
	}
	status := registry.Finished
	switch {
	case errors.Is(runErr, context.Canceled):
		status = registry.Killed
	case runErr != nil:
		status = registry.Failed
	}
	_, err := t.Registry.FinishRun(context.Background(), t.Run.ID, status, metrics, runErr)
	return err
}

// Register stores the package in dir as a new version of name made by
// this run, derived from parent when it is not nil.
func (t *Tracker) Register(ctx context.Context, name, dir string, parent *registry.Ref) (registry.Version, error) {
	if t == nil {
		return registry.Version{}, fmt.Errorf("runlog: no registry to register %s in", name)
	}
	return t.Registry.RegisterVersion(ctx, name, dir, registry.RegisterOptions{RunID: t.Run.ID, Parent: parent, Actor: t.Actor})
}

// Close closes the registry when the tracker owns it.
func (t *Tracker) Close() {
	if t != nil && t.owns {
		t.Registry.Close()
	}
}

// Flatten adds a JSON-marshallable value to out as MLflow-style
// parameters: nested keys joined with '.', values as JSON text (strings
// bare), under prefix when it is not "".
func Flatten(prefix string, v any, out map[string]string) {
	b, err := json.Marshal(v)
	if err != nil {
		return
	}
	var x any
	if json.Unmarshal(b, &x) != nil {
		return
	}
	var walk func(string, any)
	walk = func(k string, x any) {
		switch t := x.(type) {
		case map[string]any:
			for kk, vv := range t {
				if k != "" {
					kk = k + "." + kk
				}
				walk(kk, vv)
			}
		case nil:
		case string:
			out[k] = t
		default:
			b, _ := json.Marshal(t)
			out[k] = string(b)
		}
	}
	walk(prefix, x)
}

// Prefixed adds m's entries to into (a new map when nil) with prefix+"_"
// before their keys, and returns into.
func Prefixed(prefix string, m map[string]float64, into map[string]float64) map[string]float64 {
	if into == nil {
		into = map[string]float64{}
	}
	for k, v := range m {
		into[prefix+"_"+k] = v
	}
	return into
}

// TrainParams are a training job's parameters: its train section at the
// top level, then data.*, split.* and model.*; extra (where the data
// came from, ...) is added as is.
func TrainParams(j train.Job, extra map[string]string) map[string]string {
	p := map[string]string{}
	for k, v := range extra {
		p[k] = v
	}
	Flatten("", j.Train, p)
	Flatten("data", j.Data, p)
	Flatten("split", j.Split, p)
	Flatten("model", j.Model, p)
	return p
}

// TrainEpoch is what a training logs for an epoch event: loss, lr and
// val_<metric>. Other events log nothing (nil).
func TrainEpoch(e train.Event) map[string]float64 {
	if e.Kind != "epoch" {
		return nil
	}
	return Prefixed("val", e.Metrics, map[string]float64{"loss": e.Loss, "lr": e.LR})
}

// TrainFinal is a finished training's final metrics: val_*, test_*,
// epochs, best_epoch and samples_per_sec.
func TrainFinal(rep *train.Report) map[string]float64 {
	if rep == nil {
		return nil
	}
	final := Prefixed("test", rep.Test, Prefixed("val", rep.Val, nil))
	if r := rep.Result; r != nil {
		final["epochs"], final["best_epoch"], final["samples_per_sec"] = float64(len(r.History)), float64(r.BestEpoch), r.SamplesPerSec
	}
	return final
}

// SelectParams are a model selection's parameters: the shared train
// section at the top level, then data.*, split.*, budget.*, rank.* and
// search.*, and extra.
func SelectParams(j train.SelectJob, extra map[string]string) map[string]string {
	p := map[string]string{}
	for k, v := range extra {
		p[k] = v
	}
	Flatten("", j.Train, p)
	Flatten("data", j.Data, p)
	Flatten("split", j.Split, p)
	Flatten("budget", j.Budget, p)
	Flatten("rank", j.Rank, p)
	Flatten("search", j.Search, p)
	return p
}

// SelectEpoch is what a selection logs for candidate's epoch event:
// <candidate>.loss and <candidate>.val_<metric>; nil for other events.
func SelectEpoch(candidate string, e train.Event) map[string]float64 {
	if e.Kind != "epoch" {
		return nil
	}
	return Prefixed(candidate+".val", e.Metrics, map[string]float64{candidate + ".loss": e.Loss})
}

// SelectFinal is a finished selection's final metrics (the winner's
// val_*, test_*, score and latency_ms, and the number of candidates) and
// the parameter naming the winner; both nil without a winner.
func SelectFinal(lb *train.Leaderboard) (map[string]float64, map[string]string) {
	if lb == nil || lb.Winner == nil {
		return nil, nil
	}
	w := lb.Winner
	return Prefixed("test", w.Test, Prefixed("val", w.Val, map[string]float64{"score": w.Score, "latency_ms": w.LatencyMs, "candidates": float64(len(lb.Entries))})),
		map[string]string{"winner": w.Name}
}

// OptimizeParams are an optimization's parameters: its options (the
// calibration data as its row count) and extra.
func OptimizeParams(o optimize.Options, extra map[string]string) map[string]string {
	p := map[string]string{}
	for k, v := range extra {
		p[k] = v
	}
	p["prune"], p["structured"], p["global"] = fmt.Sprint(o.Prune), fmt.Sprint(o.Structured), fmt.Sprint(o.Global)
	p["norm"], p["steps"], p["finetune_epochs"] = string(o.Norm), fmt.Sprint(o.Steps), fmt.Sprint(o.FineTuneEpochs)
	p["quantize"], p["engine"], p["weights"] = o.Quantize, o.Engine, o.Weights
	if o.Calibration != nil {
		p["calibration_rows"] = fmt.Sprint(o.Calibration.Len())
	}
	return p
}

// OptimizeVariants logs an optimization report to t: one step per
// variant, in the report's order, with <variant>.<metric>, .file_bytes,
// .params, .sparsity and .latency_ms_b1.
func OptimizeVariants(t *Tracker, rep optimize.Report) {
	for i, v := range rep.Variants {
		t.Epoch(i, map[string]float64{v.Name + "." + v.Metric: v.Value, v.Name + ".file_bytes": float64(v.FileBytes),
			v.Name + ".params": float64(v.Params), v.Name + ".sparsity": v.Sparsity, v.Name + ".latency_ms_b1": v.LatencyB1})
	}
}
