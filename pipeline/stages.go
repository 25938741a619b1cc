package pipeline

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kilnml/kiln/internal/atomicfile"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/evaluate"
	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/registry"
)

// dataOut is the data stage's checkpoint: the copy of the data in the run
// directory and its fingerprint.
type dataOut struct {
	File           string   `json:"file"`
	Fingerprint    string   `json:"sha256"`
	Rows           int      `json:"rows"`
	Columns        []string `json:"columns"`
	Source         string   `json:"source"`
	DatasetVersion string   `json:"dataset_version,omitempty"`
}

// prepOut is the preprocess stage's checkpoint (the rows themselves are in
// split.json).
type prepOut struct {
	TrainRows          int       `json:"train_rows"`
	HoldoutRows        int       `json:"holdout_rows"`
	Task               data.Task `json:"task"`
	Features           []string  `json:"features"`
	Labels             []string  `json:"labels,omitempty"`
	TrainFingerprint   string    `json:"train_sha256"`
	HoldoutFingerprint string    `json:"holdout_sha256"`
}

type splitFile struct {
	Train   []int `json:"train"`
	Holdout []int `json:"holdout"`
}

// trainOut is the train stage's checkpoint: the trained (selected)
// package.
type trainOut struct {
	Dir     string                        `json:"dir"`
	Winner  string                        `json:"winner"`
	Metrics map[string]map[string]float64 `json:"metrics,omitempty"`
	Board   []boardEntry                  `json:"leaderboard,omitempty"`
}

type boardEntry struct {
	Name   string  `json:"name"`
	Metric float64 `json:"metric"`
	Params int64   `json:"params"`
	Score  float64 `json:"score"`
	Error  string  `json:"error,omitempty"`
}

// optimizeOut is the optimize stage's checkpoint: every variant measured
// and the one kept ("" Dir: none, the trained model goes on).
type optimizeOut struct {
	Dir      string          `json:"dir,omitempty"`
	Chosen   string          `json:"chosen,omitempty"`
	Metric   string          `json:"metric"`
	Budget   float64         `json:"max_accuracy_drop"`
	Source   variantResult   `json:"source"`
	Variants []variantResult `json:"variants"`
}

type variantResult struct {
	Name      string  `json:"name"`
	Dir       string  `json:"dir,omitempty"`
	FileBytes int64   `json:"file_bytes"`
	Value     float64 `json:"value"`
	Drop      float64 `json:"drop"`
	Within    bool    `json:"within_budget"`
	LatencyB1 float64 `json:"latency_ms_b1"`
}

// evaluateOut is the evaluate stage's checkpoint.
type evaluateOut struct {
	Verdict  string `json:"verdict"`
	Reason   string `json:"reason"`
	First    bool   `json:"first,omitempty"`
	Baseline int    `json:"baseline,omitempty"`
	Evidence string `json:"evidence"`
}

// registerOut is the register stage's checkpoint.
type registerOut struct {
	Trained      registry.Ref `json:"trained"`
	Candidate    registry.Ref `json:"candidate"`
	EvaluationID int64        `json:"evaluation_id"`
}

// promoteOut is the promote stage's checkpoint.
type promoteOut struct {
	Promoted bool `json:"promoted"`
	// Alias is the alias moved: evaluate.alias, or evaluate.promote_alias
	// (then Serving stays production's version until a rollout passes).
	Alias   string `json:"alias,omitempty"`
	From    int    `json:"from,omitempty"`
	Serving int    `json:"serving,omitempty"`
}

type tables struct {
	all, train, holdout *data.Table
}

func (e *engine) path(rel string) string { return filepath.Join(e.dir, rel) }

// loadTables reads the data stage's copy and the preprocess stage's split.
func (e *engine) loadTables() (*tables, error) {
	if e.tables != nil {
		return e.tables, nil
	}
	t, err := loadTable(e.path(e.data.File))
	if err != nil {
		return nil, err
	}
	if t.Fingerprint != e.data.Fingerprint {
		return nil, core.Errorf(core.FailedPrecondition, "kiln: pipeline: run %s: the data copy %s changed (sha256 %s, recorded %s)", e.state.RunID, e.data.File, t.Fingerprint, e.data.Fingerprint)
	}
	tb := &tables{all: t}
	if e.prep != nil {
		b, err := os.ReadFile(e.path("split.json"))
		if err != nil {
			return nil, err
		}
		var sp splitFile
		if err := json.Unmarshal(b, &sp); err != nil {
			return nil, fmt.Errorf("kiln: pipeline: split.json: %w", err)
		}
		for _, r := range append(slices.Clone(sp.Train), sp.Holdout...) {
			if r < 0 || r >= t.Rows() {
				return nil, fmt.Errorf("kiln: pipeline: split.json: row %d out of range", r)
			}
		}
		tb.train, tb.holdout = e.subsets(t, sp)
	}
	e.tables = tb
	return tb, nil
}

func (e *engine) subsets(t *data.Table, sp splitFile) (train, holdout *data.Table) {
	key := fmt.Sprintf("holdout=%g seed=%d stratify=%v target=%s", e.spec.Data.Holdout, e.spec.HoldoutSeed(), e.spec.Data.Stratify, e.spec.Data.Target)
	return subset(t, sp.Train, "train "+key), subset(t, sp.Holdout, "holdout "+key)
}

// stageData copies the data into the run directory and fingerprints it.
func (e *engine) stageData(ctx context.Context, _ *stageRun) (any, string, error) {
	file, err := e.fetchData(ctx, e.path("data"))
	if err != nil {
		return nil, "", err
	}
	t, err := loadTable(file)
	if err != nil {
		return nil, "", err
	}
	if err := checkColumns(t.Names(), e.spec.Data, nil, ""); err != nil {
		return nil, "", err
	}
	rel, _ := filepath.Rel(e.dir, file)
	out := &dataOut{File: rel, Fingerprint: t.Fingerprint, Rows: t.Rows(), Columns: t.Names(), Source: e.spec.Data.Source()}
	if e.spec.Data.Path == "" {
		out.DatasetVersion = "sha256:" + t.Fingerprint
	}
	e.data = out
	return out, fmt.Sprintf("%d rows, %d columns from %s (sha256 %s)", out.Rows, len(out.Columns), out.Source, t.Fingerprint[:12]), nil
}

// stagePreprocess keeps the holdout out of the training rows (seeded,
// stratified when asked) and fits the preprocessing on the training rows
// once, so that a column it cannot use fails here, before any training
// (train fits it again, as kiln train does, and stores it in the model).
func (e *engine) stagePreprocess(ctx context.Context, _ *stageRun) (any, string, error) {
	tb, err := e.loadTables()
	if err != nil {
		return nil, "", err
	}
	t := tb.all
	d := e.spec.Data
	target, err := t.Lookup(d.Target, "target column")
	if err != nil {
		return nil, "", err
	}
	var strata []int
	if d.Stratify {
		ids := map[string]int{}
		strata = make([]int, t.Rows())
		for i := range strata {
			k := fmt.Sprint(target.Missing(i), cellText(target, i))
			if _, ok := ids[k]; !ok {
				ids[k] = len(ids)
			}
			strata[i] = ids[k]
		}
	}
	trainRows, _, holdout, err := data.Split(t.Rows(), strata, data.SplitOptions{Test: d.Holdout, Stratify: d.Stratify}, e.spec.HoldoutSeed())
	if err != nil {
		return nil, "", err
	}
	if len(holdout) == 0 || len(trainRows) == 0 {
		return nil, "", core.Errorf(core.InvalidArgument, "kiln: pipeline: data.holdout %g of %d rows leaves no holdout or no training rows", d.Holdout, t.Rows())
	}
	sp := splitFile{Train: trainRows, Holdout: holdout}
	b, _ := json.Marshal(sp)
	if err := atomicfile.WriteFile(e.path("split.json"), b, 0o644); err != nil {
		return nil, "", err
	}
	trainT, holdT := e.subsets(t, sp)
	pre, err := data.Fit(trainT, allRows(trainT.Rows()), e.dataOptions())
	if err != nil {
		return nil, "", err
	}
	out := &prepOut{TrainRows: len(trainRows), HoldoutRows: len(holdout), Task: pre.Task, Labels: pre.Labels,
		TrainFingerprint: trainT.Fingerprint, HoldoutFingerprint: holdT.Fingerprint}
	for _, f := range pre.Features {
		out.Features = append(out.Features, f.Name)
	}
	if pre.Task == data.Classification {
		// Every holdout label must be one the model can predict.
		for _, r := range holdout {
			if l := cellText(target, r); !slices.Contains(pre.Labels, l) && !target.Missing(r) {
				return nil, "", core.Errorf(core.InvalidArgument, "kiln: pipeline: holdout row %d has label %q, which no training row has", r, l)
			}
		}
	}
	e.prep, e.tables = out, &tables{all: t, train: trainT, holdout: holdT}
	return out, fmt.Sprintf("%s, %d features, %d training rows, %d holdout rows", pre.Task, len(out.Features), out.TrainRows, out.HoldoutRows), nil
}

func cellText(c *data.Column, i int) string {
	if c.Categorical {
		return c.Str[i]
	}
	return fmt.Sprint(c.Num[i])
}

func allRows(n int) []int {
	r := make([]int, n)
	for i := range r {
		r[i] = i
	}
	return r
}

func (e *engine) dataOptions() data.Options {
	o := e.spec.Preprocess
	o.Target, o.Features = e.spec.Data.Target, e.spec.Data.Features
	return o
}

// stageTrain trains the one candidate (core/train.Run) or selects among
// the candidates (core/train.Select) and saves the model package.
func (e *engine) stageTrain(ctx context.Context, sr *stageRun) (any, string, error) {
	tb, err := e.loadTables()
	if err != nil {
		return nil, "", err
	}
	dir := "train/model"
	out := e.path(dir)
	if err := os.RemoveAll(filepath.Dir(out)); err != nil {
		return nil, "", err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return nil, "", err
	}
	sel := e.spec.Select
	res := &trainOut{Dir: dir}
	source := e.spec.Data.Source()
	idx := slices.Index(Stages, StageTrain) + 1
	if len(sel.Candidates) == 1 && sel.Search == nil {
		job := train.Job{Model: sel.Candidates[0], Data: e.dataOptions(), Split: *e.spec.Data.Split, Train: e.spec.Train}
		rep, err := train.Run(ctx, job, tb.train, source, out, func(ev train.Event) {
			if ev.Kind != "epoch" {
				return
			}
			m := prefixed("val_", ev.Metrics, map[string]float64{"loss": ev.Loss})
			sr.epoch(ev.Epoch, m)
			e.log.Info("pipeline: epoch", "run", e.state.RunID, "stage", StageTrain, "epoch", fmt.Sprintf("%d/%d", ev.Epoch, ev.Epochs), "loss", ev.Loss, "val", ev.Metrics)
			e.progress(Progress{Stage: StageTrain, Index: idx, Message: "epoch", Epoch: ev.Epoch, Epochs: ev.Epochs, Metrics: m})
		})
		if err != nil {
			return nil, "", err
		}
		res.Winner = sel.Candidates[0].Name
		res.Metrics = map[string]map[string]float64{"val": rep.Val, "test": rep.Test}
		return res, fmt.Sprintf("trained %s: %d epochs, test %s", nameOr(res.Winner, "the network"), len(rep.Result.History), metricText(rep.Test)), nil
	}
	job := train.SelectJob{Data: e.dataOptions(), Split: *e.spec.Data.Split, Train: e.spec.Train, Candidates: sel.Candidates,
		Search: sel.Search, Budget: sel.Budget, Rank: sel.Rank, Concurrency: sel.Concurrency}
	if job.Concurrency == 0 {
		job.Concurrency = 1 // reproducible (see core/train.SelectJob)
	}
	step := 0
	lb, err := train.Select(ctx, job, tb.train, source, out, func(name string, ev train.Event) {
		if ev.Kind != "epoch" {
			return
		}
		m := prefixed(name+".val_", ev.Metrics, map[string]float64{name + ".loss": ev.Loss})
		step++
		sr.epoch(step, m)
		e.log.Info("pipeline: epoch", "run", e.state.RunID, "stage", StageTrain, "candidate", name, "epoch", fmt.Sprintf("%d/%d", ev.Epoch, ev.Epochs), "loss", ev.Loss, "val", ev.Metrics)
		e.progress(Progress{Stage: StageTrain, Index: idx, Message: "epoch of " + name, Epoch: ev.Epoch, Epochs: ev.Epochs, Metrics: m})
	})
	if err != nil {
		return nil, "", err
	}
	w := lb.Winner
	res.Winner = w.Name
	res.Metrics = map[string]map[string]float64{"val": w.Val, "test": w.Test}
	for _, en := range lb.Entries {
		res.Board = append(res.Board, boardEntry{Name: en.Name, Metric: en.Metric, Params: en.Params, Score: en.Score, Error: en.Err})
	}
	return res, fmt.Sprintf("selected %s of %d candidates (val %s %.4f), test %s", w.Name, len(lb.Entries), lb.Metric, w.Metric, metricText(w.Test)), nil
}

func nameOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func metricText(m train.Metrics) string {
	for _, k := range []string{"accuracy", "r2", "loss"} {
		if v, ok := m[k]; ok {
			return fmt.Sprintf("%s %.4f", k, v)
		}
	}
	return "-"
}

func prefixed(prefix string, m map[string]float64, into map[string]float64) map[string]float64 {
	for k, v := range m {
		into[prefix+k] = v
	}
	return into
}

// variantName names an optimize variant by what it does.
func variantName(o optimize.Options) string {
	var parts []string
	if o.Prune > 0 {
		p := fmt.Sprintf("prune%g", o.Prune)
		if o.Structured {
			p += "-structured"
		}
		parts = append(parts, p)
	}
	if o.Quantize != "" {
		parts = append(parts, o.Quantize)
	}
	return strings.Join(parts, "+")
}

// stageOptimize runs each variant (core/optimize) on the trained model and
// keeps the smallest whose test metric drops by at most the budget.
func (e *engine) stageOptimize(ctx context.Context, sr *stageRun) (any, string, error) {
	o := e.spec.Optimize
	if o == nil {
		return nil, "skipped (no optimize section)", nil
	}
	tb, err := e.loadTables()
	if err != nil {
		return nil, "", err
	}
	if err := os.RemoveAll(e.path("optimize")); err != nil {
		return nil, "", err
	}
	src, err := optimize.Open(e.path(e.trained.Dir))
	if err != nil {
		return nil, "", err
	}
	defer src.Close()
	sp, err := src.Splits(tb.train, nil)
	if err != nil {
		return nil, "", err
	}
	out := &optimizeOut{Budget: o.MaxAccuracyDrop}
	best := -1
	for i, v := range o.Variants {
		if err := ctx.Err(); err != nil {
			return nil, "", err
		}
		res, err := optimize.Run(ctx, src, sp, v)
		if err != nil {
			return nil, "", fmt.Errorf("variant %d (%s): %w", i, variantName(v), err)
		}
		rel := fmt.Sprintf("optimize/v%d", i)
		err = optimize.SavePackage(e.path(rel), src, sp, res)
		res.Module.Close()
		if err != nil {
			return nil, "", err
		}
		before, after := res.Record.Before, res.Record.After
		out.Metric, out.Source = before.Metric, variantResult{Name: "trained", FileBytes: before.FileBytes, Value: before.Value, Within: true, LatencyB1: before.LatencyB1}
		vr := variantResult{Name: variantName(v), Dir: rel, FileBytes: after.FileBytes, Value: after.Value, Drop: before.Value - after.Value, LatencyB1: after.LatencyB1}
		vr.Within = vr.Drop <= o.MaxAccuracyDrop
		out.Variants = append(out.Variants, vr)
		sr.epoch(i+1, map[string]float64{vr.Name + ".file_bytes": float64(vr.FileBytes), vr.Name + "." + before.Metric: vr.Value})
		e.log.Info("pipeline: optimize variant", "run", e.state.RunID, "variant", vr.Name, "file_bytes", vr.FileBytes, before.Metric, vr.Value,
			"drop", vr.Drop, "within_budget", vr.Within)
		if vr.Within && vr.FileBytes < before.FileBytes && (best < 0 || vr.FileBytes < out.Variants[best].FileBytes) {
			best = len(out.Variants) - 1
		}
	}
	if best < 0 {
		return out, fmt.Sprintf("no variant smaller within a %s drop of %g: the trained model goes on", out.Metric, o.MaxAccuracyDrop), nil
	}
	c := out.Variants[best]
	out.Dir, out.Chosen = c.Dir, c.Name
	return out, fmt.Sprintf("kept %s: %d -> %d bytes, %s %.4f -> %.4f", c.Name, out.Source.FileBytes, c.FileBytes, out.Metric, out.Source.Value, c.Value), nil
}

// candidateDir is the package the evaluation, registration and promotion
// are about: the optimized variant kept, else the trained model.
func (e *engine) candidateDir() string {
	if e.opt != nil && e.opt.Dir != "" {
		return e.opt.Dir
	}
	return e.trained.Dir
}

// stageEvaluate scores the candidate against the version at the alias on
// the holdout (core/evaluate); with no version at the alias yet, the
// candidate is the first model and is promoted without a comparison.
func (e *engine) stageEvaluate(ctx context.Context, _ *stageRun) (any, string, error) {
	alias := e.spec.Evaluate.Alias
	evFile := "evaluate/evidence.json"
	if err := os.RemoveAll(e.path("evaluate")); err != nil {
		return nil, "", err
	}
	if err := os.MkdirAll(e.path("evaluate"), 0o755); err != nil {
		return nil, "", err
	}
	base, err := e.reg.Resolve(ctx, registry.URIScheme+e.spec.Name+"@"+alias)
	if core.HasCode(err, core.NotFound) {
		reason := fmt.Sprintf("no version of %s at alias %q yet: the first model is promoted without a comparison", e.spec.Name, alias)
		cand, err := evaluate.OpenPackage("candidate", e.candidateDir(), e.path(e.candidateDir()))
		if err != nil {
			return nil, "", err
		}
		ev := map[string]any{"verdict": string(evaluate.Promote), "reason": reason, "first": true, "alias": alias,
			"candidate": map[string]any{"dir": e.candidateDir(), "metrics": cand.Manifest.Metrics}}
		b, _ := json.MarshalIndent(ev, "", "  ")
		if err := atomicfile.WriteFile(e.path(evFile), b, 0o644); err != nil {
			return nil, "", err
		}
		out := &evaluateOut{Verdict: string(evaluate.Promote), Reason: reason, First: true, Evidence: evFile}
		e.eval = out
		return out, "PROMOTE: " + reason, nil
	}
	if err != nil {
		return nil, "", err
	}
	tb, err := e.loadTables()
	if err != nil {
		return nil, "", err
	}
	bdir := e.path("evaluate/baseline")
	if _, err := e.reg.Fetch(ctx, base.Ref(), bdir); err != nil {
		return nil, "", err
	}
	cand, err := evaluate.OpenPackage("candidate", e.candidateDir(), e.path(e.candidateDir()))
	if err != nil {
		return nil, "", err
	}
	bpkg, err := evaluate.OpenPackage("baseline", base.Ref().String(), bdir)
	if err != nil {
		return nil, "", err
	}
	es := e.spec.Evaluate
	job, err := evaluate.Prepare(cand, bpkg, tb.holdout, evaluate.Options{
		Target: e.spec.Data.Target, Metric: es.Metric, MinMargin: es.MinMargin, Alpha: es.Alpha, Resamples: es.Bootstrap,
		Seed: es.Seed, MaxLatencyRatio: es.MaxLatencyRatio, MaxSizeRatio: es.MaxSizeRatio,
		Source: fmt.Sprintf("%s (holdout %g, %d rows)", e.spec.Data.Source(), e.spec.Data.Holdout, tb.holdout.Rows()),
	})
	if err != nil {
		return nil, "", err
	}
	defer job.Close()
	ev, err := job.Run(ctx)
	if err != nil {
		return nil, "", err
	}
	b, err := json.MarshalIndent(ev, "", "  ")
	if err != nil {
		return nil, "", err
	}
	if err := atomicfile.WriteFile(e.path(evFile), b, 0o644); err != nil {
		return nil, "", err
	}
	out := &evaluateOut{Verdict: string(ev.Verdict), Reason: ev.Reason, Baseline: base.Version, Evidence: evFile}
	e.eval = out
	return out, fmt.Sprintf("%s vs %s: %s", ev.Verdict, base.Ref(), ev.Reason), nil
}

// stageRegister registers the trained model and the optimized variant (its
// parent the trained version) and records the verdict. Versions this run
// registered before a kill are found by run id, not registered twice.
func (e *engine) stageRegister(ctx context.Context, _ *stageRun) (any, string, error) {
	name, runID := e.spec.Name, e.state.RunID
	existing, err := e.reg.Versions(ctx, name)
	if err != nil && !core.HasCode(err, core.NotFound) {
		return nil, "", err
	}
	var trained, optimized *registry.Version
	for i := range existing {
		v := &existing[i]
		if v.RunID != runID {
			continue
		}
		if v.Parent == nil {
			trained = v
		} else {
			optimized = v
		}
	}
	lin := registry.Lineage{DataSource: e.data.Source, DatasetVersion: e.data.DatasetVersion}
	desc := e.spec.Register.Description
	if trained == nil {
		v, err := e.reg.RegisterVersion(ctx, name, e.path(e.trained.Dir), registry.RegisterOptions{RunID: runID, Lineage: lin,
			Description: nameOr(desc, "kiln pipeline: trained "+nameOr(e.trained.Winner, "network")), Actor: e.opts.Actor})
		if err != nil {
			return nil, "", err
		}
		trained = &v
	}
	out := &registerOut{Trained: trained.Ref(), Candidate: trained.Ref()}
	if e.candidateDir() != e.trained.Dir {
		if optimized == nil {
			parent := trained.Ref()
			v, err := e.reg.RegisterVersion(ctx, name, e.path(e.candidateDir()), registry.RegisterOptions{RunID: runID, Parent: &parent, Lineage: lin,
				Description: nameOr(desc, "kiln pipeline: "+e.opt.Chosen+" of "+parent.String()), Actor: e.opts.Actor})
			if err != nil {
				return nil, "", err
			}
			optimized = &v
		}
		out.Candidate = optimized.Ref()
	}
	evs, err := e.reg.Evaluations(ctx, name, out.Candidate.Version)
	if err != nil {
		return nil, "", err
	}
	for _, ev := range evs {
		if ev.RunID == runID {
			out.EvaluationID = ev.ID
		}
	}
	if out.EvaluationID == 0 {
		evidence, err := os.ReadFile(e.path(e.eval.Evidence))
		if err != nil {
			return nil, "", err
		}
		ev, err := e.reg.RecordEvaluation(ctx, registry.Evaluation{Model: name, Version: out.Candidate.Version, Verdict: e.eval.Verdict,
			Evidence: evidence, RunID: runID, CreatedBy: e.opts.Actor})
		if err != nil {
			return nil, "", err
		}
		out.EvaluationID = ev.ID
	}
	e.register = out
	summary := fmt.Sprintf("%s (trained)", out.Trained)
	if out.Candidate != out.Trained {
		summary += fmt.Sprintf(", %s (%s, parent %s)", out.Candidate, e.opt.Chosen, out.Trained)
	}
	return out, summary + fmt.Sprintf("; evaluation %d: %s", out.EvaluationID, e.eval.Verdict), nil
}

// stagePromote moves the alias to the candidate by compare-and-swap on
// PROMOTE (expecting the version the evaluation compared with); HOLD and
// REJECT leave it. A move this run made before a kill is found, not made
// twice; a move by someone else meanwhile fails the stage.
func (e *engine) stagePromote(ctx context.Context, _ *stageRun) (any, string, error) {
	name, alias := e.spec.Name, e.spec.Evaluate.Alias
	cand := e.register.Candidate
	now, err := e.reg.Alias(ctx, name, alias)
	if err != nil && !core.HasCode(err, core.NotFound) {
		return nil, "", err
	}
	out := &promoteOut{From: e.eval.Baseline, Serving: now}
	if e.eval.Verdict != string(evaluate.Promote) || !e.spec.Evaluate.Promotes() {
		why := e.eval.Verdict
		if e.eval.Verdict == string(evaluate.Promote) {
			why = "PROMOTE, but evaluate.promote is false"
		}
		e.promote = out
		if now == 0 {
			return out, fmt.Sprintf("%s: %s@%s not moved (no version there)", why, name, alias), nil
		}
		return out, fmt.Sprintf("%s: %s@%s stays at version %d", why, name, alias, now), nil
	}
	expected := e.eval.Baseline
	if pa := e.spec.Evaluate.PromoteAlias; pa != "" && e.eval.Baseline != 0 {
		// Hand the version to the server's rollout: move PromoteAlias
		// from wherever it is; Alias moves when the rollout passes.
		cur, err := e.reg.Alias(ctx, name, pa)
		if err != nil && !core.HasCode(err, core.NotFound) {
			return nil, "", err
		}
		alias, now, expected = pa, cur, cur
	}
	if now == cand.Version {
		out.Promoted, out.Serving = true, now
		e.promote = out
		return out, fmt.Sprintf("%s@%s already at version %d (moved before the run was interrupted)", name, alias, now), nil
	}
	reason := fmt.Sprintf("kiln pipeline run %s: %s", e.state.RunID, e.eval.Reason)
	if _, err := e.reg.CompareAndSwap(ctx, registry.Move{Model: name, Alias: alias, Expected: expected, To: cand.Version,
		Actor: e.opts.Actor, Reason: reason, Verdict: e.eval.Verdict, EvaluationID: e.register.EvaluationID}); err != nil {
		return nil, "", err
	}
	out.Promoted, out.Serving, out.Alias = true, cand.Version, alias
	if alias != e.spec.Evaluate.Alias {
		out.Serving = e.eval.Baseline // production serves until the rollout promotes
	}
	e.promote = out
	return out, fmt.Sprintf("%s@%s: version %d -> %d", name, alias, expected, cand.Version), nil
}
