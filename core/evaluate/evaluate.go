package evaluate

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/train"
)

// Defaults of Options' zero values.
const (
	DefaultAlpha      = 0.05
	DefaultResamples  = 2000
	DefaultBatchSize  = 256
	DefaultMinTimings = 30
)

// Options configures an evaluation. Zero values take the defaults above.
type Options struct {
	// Target is the target column; empty takes the one both manifests
	// record (they must agree).
	Target string
	// Metric is the metric the verdict rests on: classification only
	// "accuracy" (McNemar's test is a test of accuracy); regression "mse"
	// (default), "mae" or "r2".
	Metric string
	// MinMargin (>= 0, in Metric's units) is the smallest improvement
	// that promotes; a candidate worse by more than it is rejected.
	MinMargin float64
	// Alpha in (0, 1) is the significance level (default 0.05); the
	// bootstrap interval's level is 1-Alpha.
	Alpha float64
	// Resamples is the bootstrap's B (default 2000), Seed its seed.
	Resamples int
	Seed      uint64
	// BatchSize is the rows per forward call (default 256).
	BatchSize int
	// MinTimings is the least number of timed forward calls per model
	// (default 30): when one pass over the rows has fewer batches, more
	// timed passes run (their outputs are not used again).
	MinTimings int
	// MaxLatencyRatio and MaxSizeRatio (0: none) are budgets: a candidate
	// whose median batch latency, or model.pt size, exceeds the baseline's
	// times the ratio is held instead of promoted.
	MaxLatencyRatio float64
	MaxSizeRatio    float64
	// Source names where the table was read from, for the evidence.
	Source string
	// Progress, when not nil, receives the job's progress.
	Progress func(Progress)
}

// Progress is a step of an evaluation: Stage "score" (batches scored and
// timed, of Total), "time" (extra timing passes), "bootstrap" (resamples
// done, of Total).
type Progress struct {
	Stage string `json:"stage"`
	Done  int    `json:"done"`
	Total int    `json:"total"`
}

// withDefaults fills in zero values and checks o for task; errors are
// InvalidArgument.
func (o Options) withDefaults(task data.Task) (Options, error) {
	if o.Alpha == 0 {
		o.Alpha = DefaultAlpha
	}
	if o.Resamples == 0 {
		o.Resamples = DefaultResamples
	}
	if o.BatchSize == 0 {
		o.BatchSize = DefaultBatchSize
	}
	if o.MinTimings == 0 {
		o.MinTimings = DefaultMinTimings
	}
	bad := func(format string, args ...any) (Options, error) {
		return o, core.Errorf(core.InvalidArgument, "kiln: evaluate: "+format, args...)
	}
	switch {
	case !(o.Alpha > 0 && o.Alpha < 1):
		return bad("alpha %v is outside (0, 1)", o.Alpha)
	case !(o.MinMargin >= 0) || math.IsInf(o.MinMargin, 0):
		return bad("minimum margin %v must be a finite number >= 0", o.MinMargin)
	case o.Resamples < 0:
		return bad("bootstrap resamples %d must be >= 1", o.Resamples)
	case o.BatchSize < 0:
		return bad("batch size %d must be >= 1", o.BatchSize)
	case o.MinTimings < 0:
		return bad("minimum timings %d must be >= 1", o.MinTimings)
	case !(o.MaxLatencyRatio >= 0) || !(o.MaxSizeRatio >= 0):
		return bad("budgets must be >= 0 (0 is none): max latency ratio %v, max size ratio %v", o.MaxLatencyRatio, o.MaxSizeRatio)
	}
	if task == data.Classification {
		if o.Metric == "" {
			o.Metric = "accuracy"
		}
		if o.Metric != "accuracy" {
			return bad("metric %q: a classification gate decides on accuracy (McNemar's test)", o.Metric)
		}
	} else {
		if o.Metric == "" {
			o.Metric = "mse"
		}
		if !slices.Contains([]string{"mse", "mae", "r2"}, o.Metric) {
			return bad("metric %q: a regression gate decides on mse, mae or r2", o.Metric)
		}
	}
	return o, nil
}

// Job is a prepared evaluation: both packages checked against the table,
// their inputs encoded and their modules loaded. Run it once, then Close.
type Job struct {
	opts       Options
	table      *data.Table
	target     string
	task       data.Task
	labels     []string // the baseline's, in its output order
	sides      [2]*side // candidate, baseline
	truthClass []int
	truthValue []float64
	warnings   []string
}

// side is one model of a Job.
type side struct {
	pkg    *Package
	mod    *core.Module
	x      []float32 // raw input rows, [rows, inputs]
	inputs int
	// toBase maps the model's class index to the baseline's.
	toBase []int
}

// Evaluate prepares and runs an evaluation (Prepare, Job.Run, Job.Close).
func Evaluate(ctx context.Context, candidate, baseline *Package, t *data.Table, o Options) (*Evidence, error) {
	j, err := Prepare(candidate, baseline, t, o)
	if err != nil {
		return nil, err
	}
	defer j.Close()
	return j.Run(ctx)
}

// Prepare checks, before any model runs, that the evaluation can be done
// and prepares it: both packages (OpenPackage) have the same task (and for
// classifiers the same set of labels), the target column is agreed (o.Target
// or both manifests') and present, t has rows and every raw input column of
// both models, those columns encode (EncodeFeatures: numeric where the
// model was fitted on numbers, no missing value without imputation), every
// target value is present (and a label the models know); then both
// model.pt files load (modelpkg.Load, under the recorded quantized
// engine). Every failure is InvalidArgument but a model.pt that does not
// exist (NotFound) or does not load (its libtorch code), and names the
// model, column or row at fault.
func Prepare(candidate, baseline *Package, t *data.Table, o Options) (*Job, error) {
	bad := func(format string, args ...any) error {
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: "+format, args...)
	}
	cm, bm := &candidate.Manifest, &baseline.Manifest
	if cm.Task != bm.Task {
		return nil, bad("the candidate is a %s model and the baseline a %s model; both must have the same task", cm.Task, bm.Task)
	}
	o, err := o.withDefaults(bm.Task)
	if err != nil {
		return nil, err
	}
	j := &Job{opts: o, table: t, task: bm.Task, target: o.Target}
	if j.target == "" {
		if candidate.target() != baseline.target() {
			return nil, bad("the candidate predicts column %q and the baseline %q; name the target column", candidate.target(), baseline.target())
		}
		j.target = baseline.target()
	}
	if t == nil || t.Rows() == 0 {
		return nil, bad("the data has no rows")
	}
	var problems []string
	for _, p := range []*Package{candidate, baseline} {
		if miss := p.missingColumns(t); len(miss) > 0 {
			problems = append(problems, fmt.Sprintf("the %s (%s) needs column(s) %s", p.Role, p.Ref, strings.Join(miss, ", ")))
		}
	}
	if _, err := t.Lookup(j.target, "target column"); err != nil {
		problems = append(problems, strings.TrimPrefix(err.Error(), "kiln: "))
	} else if slices.Contains(append(featureNames(cm), featureNames(bm)...), j.target) {
		problems = append(problems, fmt.Sprintf("target column %q is an input column of a model", j.target))
	}
	if len(problems) > 0 {
		return nil, bad("the data does not fit the models: %s; the data has columns %s", strings.Join(problems, "; "), strings.Join(t.Names(), ", "))
	}
	if j.task == data.Classification {
		j.labels = bm.Labels
		if !sameSet(cm.Labels, bm.Labels) {
			return nil, bad("the candidate's labels [%s] and the baseline's [%s] differ", strings.Join(cm.Labels, ", "), strings.Join(bm.Labels, ", "))
		}
	}
	if err := j.encodeTruth(baseline); err != nil {
		return nil, err
	}
	for i, p := range []*Package{candidate, baseline} {
		x, err := p.Manifest.Preprocessing.EncodeFeatures(t, allRows(t.Rows()))
		if err != nil {
			return nil, bad("the data does not fit the %s (%s): %v", p.Role, p.Ref, strings.TrimPrefix(err.Error(), "kiln: "))
		}
		s := &side{pkg: p, x: x, inputs: p.Manifest.Preprocessing.NumInputs()}
		if j.task == data.Classification {
			s.toBase = make([]int, len(p.Manifest.Labels))
			for k, l := range p.Manifest.Labels {
				s.toBase[k] = slices.Index(j.labels, l)
			}
		}
		j.sides[i] = s
	}
	for _, p := range []*Package{candidate, baseline} {
		if lin := p.Manifest.Lineage; lin.DataSHA256 != "" && lin.DataSHA256 == t.Fingerprint {
			w := fmt.Sprintf("the data is the %s's training table (sha256 %s): its scores are not holdout scores", p.Role, t.Fingerprint)
			j.warnings = append(j.warnings, w)
			slog.Warn("kiln evaluate: " + w)
		}
	}
	for _, s := range j.sides {
		mod, _, err := modelpkg.Load(s.pkg.Dir)
		if err != nil {
			j.Close()
			return nil, fmt.Errorf("kiln: evaluate: %s %s: %w", s.pkg.Role, s.pkg.Ref, err)
		}
		s.mod = mod
	}
	return j, nil
}

// encodeTruth reads the target of every row: class indices in the
// baseline's label order (classification), or the column's values
// (regression).
func (j *Job) encodeTruth(baseline *Package) error {
	pre := *baseline.Manifest.Preprocessing
	pre.Options.Target = j.target
	rows := allRows(j.table.Rows())
	y, err := pre.EncodeTarget(j.table, rows)
	if err != nil {
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: %s", strings.TrimPrefix(err.Error(), "kiln: "))
	}
	if j.task == data.Classification {
		j.truthClass = make([]int, len(y))
		for i, v := range y {
			j.truthClass[i] = int(v)
		}
		return nil
	}
	col, _ := j.table.Column(j.target)
	if col.Categorical {
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: target column %q holds text; a regression target must be numeric", j.target)
	}
	j.truthValue = make([]float64, len(rows))
	copy(j.truthValue, col.Num)
	return nil
}

// Close releases both modules.
func (j *Job) Close() {
	for _, s := range j.sides {
		if s != nil && s.mod != nil {
			s.mod.Close()
			s.mod = nil
		}
	}
}

// Run scores and times both models on every row (score), computes their
// metrics, the paired test and the verdict, and returns the evidence. It
// stops with ctx's error when ctx is cancelled.
func (j *Job) Run(ctx context.Context) (*Evidence, error) {
	start := time.Now()
	if j.sides[0].mod == nil {
		return nil, core.Errorf(core.FailedPrecondition, "kiln: evaluate: the job is closed")
	}
	out, lat, err := j.score(ctx)
	if err != nil {
		return nil, err
	}
	ev := &Evidence{
		Task: j.task, Target: j.target,
		Data:      DataInfo{Source: j.opts.Source, SHA256: j.table.Fingerprint, Rows: j.table.Rows()},
		Metric:    j.opts.Metric,
		MinMargin: j.opts.MinMargin, Alpha: j.opts.Alpha,
		Warnings:     j.warnings,
		Threads:      core.NumThreads(),
		KilnVersion:  core.Version,
		TorchVersion: core.TorchVersion(),
	}
	results := [2]*ModelResult{&ev.Candidate, &ev.Baseline}
	for i, s := range j.sides {
		r := results[i]
		r.Ref, r.Dir, r.Name = s.pkg.Ref, s.pkg.Dir, s.pkg.Manifest.Name
		r.Latency = lat[i]
		if r.ModelBytes, err = s.pkg.fileSize(modelpkg.ModelFile); err != nil {
			return nil, err
		}
		mb, err := s.pkg.fileSize(modelpkg.ManifestFile)
		if err != nil {
			return nil, err
		}
		r.PackageBytes = r.ModelBytes + mb
		r.Parameters = s.mod.NumParameters()
	}
	if j.task == data.Classification {
		err = j.compareClassifiers(ctx, ev, out)
	} else {
		err = j.compareRegressors(ctx, ev, out)
	}
	if err != nil {
		return nil, err
	}
	ev.Budgets = Budgets{
		MaxLatencyRatio: j.opts.MaxLatencyRatio, LatencyRatio: ratio(ev.Candidate.Latency.P50Ms, ev.Baseline.Latency.P50Ms),
		MaxSizeRatio: j.opts.MaxSizeRatio, SizeRatio: ratio(float64(ev.Candidate.ModelBytes), float64(ev.Baseline.ModelBytes)),
	}
	ev.Verdict, ev.Reason = decide(ev)
	ev.Created = time.Now().UTC()
	ev.DurationMs = float64(time.Since(start).Microseconds()) / 1000
	slog.Info("kiln evaluate: verdict", "verdict", ev.Verdict, "metric", ev.Metric, "improvement", ev.Improvement, "test", ev.Test, "rows", ev.Data.Rows)
	return ev, nil
}

// ratio is a/b, or 0 when b is 0.
func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// higherIsBetter tells a gate metric's direction.
func higherIsBetter(metric string) bool { return metric == "accuracy" || metric == "r2" }

// metrics is train.Metrics as the evidence's map.
func metrics(m train.Metrics) map[string]float64 { return map[string]float64(m) }

func featureNames(m *modelpkg.Manifest) []string {
	var n []string
	for _, f := range m.Preprocessing.Features {
		n = append(n, f.Name)
	}
	return n
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	x, y := slices.Clone(a), slices.Clone(b)
	slices.Sort(x)
	slices.Sort(y)
	return slices.Equal(x, y)
}

func allRows(n int) []int {
	r := make([]int, n)
	for i := range r {
		r[i] = i
	}
	return r
}
