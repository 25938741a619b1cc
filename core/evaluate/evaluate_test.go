package evaluate_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/evaluate"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
)

// dataDir holds the scikit-learn data sets (kiln_fixtures.py datasets).
var dataDir string

func TestMain(m *testing.M) { testkit.MainWithFixture(m, "datasets", &dataDir, nil) }

// subset copies rows [lo, hi) of t into a new table.
func subset(t *data.Table, lo, hi int) *data.Table {
	out := &data.Table{Fingerprint: fmt.Sprintf("%s[%d:%d]", t.Fingerprint, lo, hi)}
	for _, c := range t.Columns {
		n := &data.Column{Name: c.Name, Categorical: c.Categorical}
		if c.Categorical {
			n.Str = append([]string(nil), c.Str[lo:hi]...)
		} else {
			n.Num = append([]float64(nil), c.Num[lo:hi]...)
		}
		out.Columns = append(out.Columns, n)
	}
	return out
}

// trainPackage trains spec (YAML, a core/train.Job) on tb into dir.
func trainPackage(t *testing.T, spec string, tb *data.Table, dir string) {
	t.Helper()
	job, err := train.ParseJob([]byte(spec))
	require.NoError(t, err)
	_, err = train.Run(context.Background(), job, tb, "test", dir, nil)
	require.NoError(t, err)
}

// digits is scikit-learn's digits split into training rows (0-1399) and a
// holdout (1400-1796), with a well trained MLP (20 epochs) and a poor one
// (1 epoch, another seed) trained on the training rows; made once.
var digits = sync.OnceValues(func() (*digitsModels, error) {
	tb, err := data.ReadCSVFile(filepath.Join(dataDir, "digits.csv"))
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "kiln-evaluate-")
	if err != nil {
		return nil, err
	}
	d := &digitsModels{holdout: subset(tb, 1400, tb.Rows()), train: subset(tb, 0, 1400), good: filepath.Join(dir, "good"), poor: filepath.Join(dir, "poor")}
	for _, m := range []struct {
		dir    string
		epochs int
		seed   int
	}{{d.good, 20, 1}, {d.poor, 1, 2}} {
		job, err := train.ParseJob(fmt.Appendf(nil, `
model: {layers: [{type: linear, out: 32}, {type: relu}, {type: linear}]}
data: {target: digit}
split: {val: 0.15, stratify: true}
train: {epochs: %d, batch_size: 64, seed: %d, optimizer: {type: adam, lr: 0.003}}
`, m.epochs, m.seed))
		if err != nil {
			return nil, err
		}
		if _, err := train.Run(context.Background(), job, d.train, "digits[0:1400]", m.dir, nil); err != nil {
			return nil, err
		}
	}
	return d, nil
})

type digitsModels struct {
	train, holdout *data.Table
	good, poor     string
}

func digitsFixture(t *testing.T) *digitsModels {
	t.Helper()
	d, err := digits()
	require.NoError(t, err)
	return d
}

func open(t *testing.T, role, dir string) *evaluate.Package {
	t.Helper()
	p, err := evaluate.OpenPackage(role, dir, dir)
	require.NoError(t, err)
	return p
}

func run(t *testing.T, cand, base string, tb *data.Table, o evaluate.Options) *evaluate.Evidence {
	t.Helper()
	ev, err := evaluate.Evaluate(context.Background(), open(t, "candidate", cand), open(t, "baseline", base), tb, o)
	require.NoError(t, err)
	return ev
}

// scoreAccuracy scores a package with core/optimize.Score, an independent
// scorer of the same rows.
func scoreAccuracy(t *testing.T, dir string, tb *data.Table) float64 {
	t.Helper()
	mod, man, err := modelpkg.Load(dir)
	require.NoError(t, err)
	defer mod.Close()
	rows := make([]int, tb.Rows())
	for i := range rows {
		rows[i] = i
	}
	x, err := man.Preprocessing.EncodeFeatures(tb, rows)
	require.NoError(t, err)
	y, err := man.Preprocessing.EncodeTarget(tb, rows)
	require.NoError(t, err)
	ds, err := data.NewDataset(x, man.Preprocessing.NumInputs(), y)
	require.NoError(t, err)
	m, err := optimize.Score(mod, ds, data.Classification, len(man.Labels))
	require.NoError(t, err)
	return m["accuracy"]
}

func TestBetterClassifierIsPromotedWorseRejected(t *testing.T) {
	d := digitsFixture(t)
	ev := run(t, d.good, d.poor, d.holdout, evaluate.Options{Seed: 3})
	assert.Equal(t, evaluate.Promote, ev.Verdict, ev.Reason)
	assert.Contains(t, ev.Reason, "significantly better by at least the margin")
	rows := d.holdout.Rows()
	assert.Equal(t, rows, ev.Data.Rows)
	assert.Equal(t, "accuracy", ev.Metric)
	assert.True(t, ev.Significant)
	assert.Equal(t, "mcnemar-chi2-corrected", ev.Test) // b+c is far above 25 here
	// The figures agree with each other and with an independent scorer.
	assert.InDelta(t, scoreAccuracy(t, d.good, d.holdout), ev.Candidate.Metrics["accuracy"], 1e-12)
	assert.InDelta(t, scoreAccuracy(t, d.poor, d.holdout), ev.Baseline.Metrics["accuracy"], 1e-12)
	assert.InDelta(t, float64(ev.McNemar.C-ev.McNemar.B)/float64(rows), ev.Difference, 1e-12)
	assert.Greater(t, ev.Difference, 0.05)
	assert.InDelta(t, ev.Difference, ev.Interval.Estimate, 1e-12)
	assert.Greater(t, ev.Interval.Low, 0.0)
	assert.Less(t, ev.Candidate.Metrics["log_loss"], ev.Baseline.Metrics["log_loss"])
	for _, k := range []string{"accuracy", "f1_macro", "precision_macro", "recall_macro", "log_loss"} {
		assert.Contains(t, ev.Candidate.Metrics, k)
	}
	for _, r := range []evaluate.ModelResult{ev.Candidate, ev.Baseline} {
		assert.GreaterOrEqual(t, r.Latency.Calls, evaluate.DefaultMinTimings)
		assert.Greater(t, r.Latency.P50Ms, 0.0)
		assert.GreaterOrEqual(t, r.Latency.P95Ms, r.Latency.P50Ms)
		assert.Greater(t, r.ModelBytes, int64(0))
		assert.Greater(t, r.PackageBytes, r.ModelBytes)
		assert.Equal(t, int64(64*32+32+32*10+10), r.Parameters)
	}
	assert.InDelta(t, 1, ev.Budgets.SizeRatio, 0.05)

	// The evidence survives JSON (what a registry stores).
	b, err := json.Marshal(ev)
	require.NoError(t, err)
	var back evaluate.Evidence
	require.NoError(t, json.Unmarshal(b, &back))
	assert.Equal(t, ev.Verdict, back.Verdict)
	assert.Equal(t, *ev.McNemar, *back.McNemar)
	assert.Equal(t, ev.Candidate.Metrics, back.Candidate.Metrics)

	rev := run(t, d.poor, d.good, d.holdout, evaluate.Options{Seed: 3})
	assert.Equal(t, evaluate.Reject, rev.Verdict, rev.Reason)
	assert.Equal(t, ev.McNemar.B, rev.McNemar.C)
	assert.Equal(t, ev.McNemar.PValue, rev.McNemar.PValue)

	same := run(t, d.good, d.good, d.holdout, evaluate.Options{})
	assert.Equal(t, evaluate.Hold, same.Verdict, same.Reason)
	assert.Equal(t, 0, same.McNemar.B+same.McNemar.C)
	assert.True(t, same.McNemar.Exact)
	assert.Equal(t, 1.0, same.McNemar.PValue)
}

func TestMarginAndBudgetsHoldABetterClassifier(t *testing.T) {
	d := digitsFixture(t)
	ev := run(t, d.good, d.poor, d.holdout, evaluate.Options{MinMargin: 0.9})
	assert.Equal(t, evaluate.Hold, ev.Verdict, ev.Reason)
	assert.Contains(t, ev.Reason, "below the margin")

	ev = run(t, d.good, d.poor, d.holdout, evaluate.Options{MaxSizeRatio: 0.5})
	assert.Equal(t, evaluate.Hold, ev.Verdict, ev.Reason)
	assert.Contains(t, ev.Reason, "size budget")

	// A latency budget no model meets (the same architecture cannot run
	// a million times faster).
	ev = run(t, d.good, d.poor, d.holdout, evaluate.Options{MaxLatencyRatio: 1e-6})
	assert.Equal(t, evaluate.Hold, ev.Verdict, ev.Reason)
	assert.Contains(t, ev.Reason, "latency budget")

	// Worse by less than a wide margin and not significant cannot happen
	// with these two; worse by more than the margin is rejected even
	// without a test (see TestDecide for the rule's edges).
	ev = run(t, d.poor, d.good, d.holdout, evaluate.Options{MinMargin: 0.01})
	assert.Equal(t, evaluate.Reject, ev.Verdict)
}

func TestBinaryAndMulticlassHeadsCompareOnLabels(t *testing.T) {
	tb, err := data.ReadCSVFile(filepath.Join(dataDir, "breast_cancer.csv"))
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(5, 5))
	perm := rng.Perm(tb.Rows()) // train and holdout from the same distribution
	shuffled := &data.Table{Fingerprint: "bc-shuffled"}
	for _, c := range tb.Columns {
		n := &data.Column{Name: c.Name, Categorical: c.Categorical}
		for _, r := range perm {
			if c.Categorical {
				n.Str = append(n.Str, c.Str[r])
			} else {
				n.Num = append(n.Num, c.Num[r])
			}
		}
		shuffled.Columns = append(shuffled.Columns, n)
	}
	trainRows, holdout := subset(shuffled, 0, 400), subset(shuffled, 400, shuffled.Rows())
	dir := t.TempDir()
	bin, multi := filepath.Join(dir, "bin"), filepath.Join(dir, "multi")
	trainPackage(t, `
model: {layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]}
data: {target: diagnosis}
split: {val: 0.15, stratify: true}
train: {epochs: 15, batch_size: 32, seed: 1, loss: {type: bce_with_logits}, optimizer: {type: adam, lr: 0.003}}
`, trainRows, bin)
	trainPackage(t, `
model: {layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]}
data: {target: diagnosis}
split: {val: 0.15, stratify: true}
train: {epochs: 15, batch_size: 32, seed: 1, optimizer: {type: adam, lr: 0.003}}
`, trainRows, multi)
	ev := run(t, bin, multi, holdout, evaluate.Options{})
	for _, r := range []evaluate.ModelResult{ev.Candidate, ev.Baseline} {
		assert.Greater(t, r.Metrics["accuracy"], 0.9)
		assert.Less(t, r.Metrics["log_loss"], 0.4)
		assert.Greater(t, r.Metrics["f1_macro"], 0.85)
	}
	assert.InDelta(t, scoreAccuracy(t, bin, holdout), ev.Candidate.Metrics["accuracy"], 1e-12)
	assert.InDelta(t, scoreAccuracy(t, multi, holdout), ev.Baseline.Metrics["accuracy"], 1e-12)
	// Two good models: few discordant rows, the exact test.
	assert.Less(t, ev.McNemar.B+ev.McNemar.C, 25)
	assert.Equal(t, "mcnemar-exact", ev.Test)
	assert.InDelta(t, float64(ev.McNemar.C-ev.McNemar.B)/float64(holdout.Rows()), ev.Difference, 1e-12)
}

// regressionTable is y = 2a - b + 0.5c + noise.
func regressionTable(n int, seed uint64) *data.Table {
	rng := rand.New(rand.NewPCG(seed, 9))
	vals := make([]float64, 0, 4*n)
	for range n {
		a, b, c := rng.NormFloat64(), rng.NormFloat64(), rng.NormFloat64()*2
		vals = append(vals, a, b, c, 2*a-b+0.5*c+0.1*rng.NormFloat64())
	}
	t, err := data.NewTable([]string{"a", "b", "c", "y"}, vals)
	if err != nil {
		panic(err)
	}
	return t
}

func TestBetterRegressorIsPromotedWorseRejected(t *testing.T) {
	dir := t.TempDir()
	good, poor := filepath.Join(dir, "good"), filepath.Join(dir, "poor")
	tb := regressionTable(600, 1)
	spec := `
model: {layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]}
data: {target: y}
split: {val: 0.15}
train: {epochs: %d, batch_size: 32, seed: 1, optimizer: {type: adam, lr: %g}}
`
	trainPackage(t, fmt.Sprintf(spec, 30, 0.01), tb, good)
	trainPackage(t, fmt.Sprintf(spec, 1, 0.001), tb, poor)
	holdout := regressionTable(300, 2)
	for _, metric := range []string{"mse", "mae", "r2"} {
		ev := run(t, good, poor, holdout, evaluate.Options{Metric: metric, Resamples: 500, Seed: 4})
		assert.Equal(t, evaluate.Promote, ev.Verdict, ev.Reason)
		assert.Equal(t, "paired-bootstrap", ev.Test)
		assert.Nil(t, ev.McNemar)
		assert.Equal(t, metric == "r2", ev.HigherIsBetter)
		assert.Greater(t, ev.Improvement, 0.0)
		assert.InDelta(t, ev.Difference, ev.Interval.Estimate, 1e-12)
		assert.Equal(t, 500, ev.Interval.Resamples)
		assert.Equal(t, 0.95, ev.Interval.Level)
		assert.True(t, ev.Interval.Low > 0 || ev.Interval.High < 0)
		assert.Less(t, ev.Candidate.Metrics["mse"], ev.Baseline.Metrics["mse"])

		rev := run(t, poor, good, holdout, evaluate.Options{Metric: metric, Resamples: 500, Seed: 4})
		assert.Equal(t, evaluate.Reject, rev.Verdict, rev.Reason)
	}
	// The same seed gives the same interval; another seed another one.
	a := run(t, good, poor, holdout, evaluate.Options{Resamples: 300, Seed: 8})
	b := run(t, good, poor, holdout, evaluate.Options{Resamples: 300, Seed: 8})
	c := run(t, good, poor, holdout, evaluate.Options{Resamples: 300, Seed: 9})
	assert.Equal(t, *a.Interval, *b.Interval)
	assert.NotEqual(t, a.Interval.Low, c.Interval.Low)

	// A classifier and a regressor do not compare.
	d := digitsFixture(t)
	_, err := evaluate.Prepare(open(t, "candidate", good), open(t, "baseline", d.good), holdout, evaluate.Options{})
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
	assert.ErrorContains(t, err, "the candidate is a regression model and the baseline a classification model")
}

func writeCSV(t *testing.T, text string) *data.Table {
	t.Helper()
	tb, err := data.ReadCSV(strings.NewReader(text))
	require.NoError(t, err)
	return tb
}

func TestBadInputIsRefusedBeforeAnyWork(t *testing.T) {
	d := digitsFixture(t)
	dir := t.TempDir()

	_, err := evaluate.OpenPackage("candidate", "nope", filepath.Join(dir, "nope"))
	assert.True(t, core.HasCode(err, core.NotFound), "%v", err)
	assert.ErrorContains(t, err, "candidate nope: no such model package")

	empty := filepath.Join(dir, "empty")
	require.NoError(t, os.Mkdir(empty, 0o755))
	_, err = evaluate.OpenPackage("baseline", empty, empty)
	assert.True(t, core.HasCode(err, core.NotFound), "%v", err)
	assert.ErrorContains(t, err, "is not a Kiln model package")

	// A manifest without preprocessing (raw columns unknown).
	man, err := modelpkg.Read(d.good)
	require.NoError(t, err)
	noPre := filepath.Join(dir, "nopre")
	_, err = modelpkg.Copy(d.good, noPre)
	require.NoError(t, err)
	m := man
	m.Preprocessing = nil
	require.NoError(t, modelpkg.WriteManifest(noPre, m))
	_, err = evaluate.OpenPackage("candidate", noPre, noPre)
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
	assert.ErrorContains(t, err, "no preprocessing section")

	// A model.pt that does not load, with data that fits: the load fails
	// in Prepare; with data that does not fit, the data is named first.
	broken := filepath.Join(dir, "broken")
	_, err = modelpkg.Copy(d.good, broken)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(broken, modelpkg.ModelFile), []byte("not a model"), 0o644))
	cand, base := open(t, "candidate", broken), open(t, "baseline", d.poor)
	_, err = evaluate.Prepare(cand, base, d.holdout, evaluate.Options{})
	require.Error(t, err)
	assert.ErrorContains(t, err, "candidate "+broken)
	noP5 := subset(d.holdout, 0, 10)
	noP5.Columns = append(noP5.Columns[:5], noP5.Columns[6:]...)
	_, err = evaluate.Prepare(cand, base, noP5, evaluate.Options{})
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
	assert.ErrorContains(t, err, "the candidate ("+broken+") needs column(s) p5; the baseline ("+d.poor+") needs column(s) p5")

	good, poor := open(t, "candidate", d.good), open(t, "baseline", d.poor)
	cases := []struct {
		name string
		tb   *data.Table
		o    evaluate.Options
		want string
	}{
		{"no target", func() *data.Table {
			t := subset(d.holdout, 0, 10)
			t.Columns = t.Columns[:64]
			return t
		}(), evaluate.Options{}, `target column "digit" not found`},
		{"other target", subset(d.holdout, 0, 10), evaluate.Options{Target: "label"}, `target column "label" not found`},
		{"target is a feature", subset(d.holdout, 0, 10), evaluate.Options{Target: "p3"}, `target column "p3" is an input column`},
		{"no rows", subset(d.holdout, 0, 0), evaluate.Options{}, "the data has no rows"},
		{"unseen label", writeCSV(t, header()+row("11")), evaluate.Options{}, `has label "11" in data row 1, unseen`},
		{"missing target", writeCSV(t, header()+row("")), evaluate.Options{}, `target column "digit" is missing in data row 1`},
		{"text feature", writeCSV(t, strings.Replace(header()+row("3"), ",0,", ",x,", 1)), evaluate.Options{}, `was numeric when preprocessing was fitted but holds text`},
		{"alpha", subset(d.holdout, 0, 10), evaluate.Options{Alpha: 2}, "alpha 2 is outside (0, 1)"},
		{"margin", subset(d.holdout, 0, 10), evaluate.Options{MinMargin: -0.1}, "minimum margin -0.1"},
		{"metric", subset(d.holdout, 0, 10), evaluate.Options{Metric: "f1"}, `metric "f1": a classification gate decides on accuracy`},
		{"budget", subset(d.holdout, 0, 10), evaluate.Options{MaxSizeRatio: -1}, "budgets must be >= 0"},
	}
	for _, tc := range cases {
		_, err := evaluate.Prepare(good, poor, tc.tb, tc.o)
		assert.True(t, core.HasCode(err, core.InvalidArgument), "%s: %v", tc.name, err)
		assert.ErrorContains(t, err, tc.want, tc.name)
	}

	// Different labels: a classifier trained without the digit 9.
	var keep []int
	dg := d.train.Columns[64].Num
	for i, v := range dg {
		if v != 9 {
			keep = append(keep, i)
		}
	}
	no9 := filepath.Join(dir, "no9")
	trainPackage(t, `
model: {layers: [{type: linear}]}
data: {target: digit}
train: {epochs: 1, seed: 1}
`, pick(d.train, keep), no9)
	_, err = evaluate.Prepare(open(t, "candidate", no9), poor, d.holdout, evaluate.Options{})
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
	assert.ErrorContains(t, err, "labels [0, 1, 2, 3, 4, 5, 6, 7, 8] and the baseline's [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] differ")
}

func header() string {
	var b strings.Builder
	for i := range 64 {
		fmt.Fprintf(&b, "p%d,", i)
	}
	return b.String() + "digit\n"
}

func row(target string) string {
	return strings.Repeat("0,", 64) + target + "\n"
}

func pick(t *data.Table, rows []int) *data.Table {
	out := &data.Table{Fingerprint: "pick"}
	for _, c := range t.Columns {
		n := &data.Column{Name: c.Name, Categorical: c.Categorical}
		for _, r := range rows {
			if c.Categorical {
				n.Str = append(n.Str, c.Str[r])
			} else {
				n.Num = append(n.Num, c.Num[r])
			}
		}
		out.Columns = append(out.Columns, n)
	}
	return out
}

func TestCancelledJobStops(t *testing.T) {
	d := digitsFixture(t)
	j, err := evaluate.Prepare(open(t, "candidate", d.good), open(t, "baseline", d.poor), d.holdout, evaluate.Options{})
	require.NoError(t, err)
	defer j.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = j.Run(ctx)
	assert.ErrorIs(t, err, context.Canceled)
}

func TestProgressIsReported(t *testing.T) {
	d := digitsFixture(t)
	var stages []string
	var last evaluate.Progress
	o := evaluate.Options{Resamples: 100, Progress: func(p evaluate.Progress) {
		if len(stages) == 0 || stages[len(stages)-1] != p.Stage {
			stages = append(stages, p.Stage)
		}
		last = p
	}}
	run(t, d.good, d.poor, d.holdout, o)
	assert.Equal(t, []string{"score", "time", "bootstrap"}, stages)
	assert.Equal(t, evaluate.Progress{Stage: "bootstrap", Done: 100, Total: 100}, last)
}
