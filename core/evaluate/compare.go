package evaluate

import (
	"context"
	"fmt"
	"math"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/evaluate/stats"
	"github.com/kilnml/kiln/core/train"
)

// compareClassifiers computes both classifiers' metrics, McNemar's test on
// their per-row correctness and the bootstrap interval of the accuracy
// difference.
func (j *Job) compareClassifiers(ctx context.Context, ev *Evidence, out [2]outputs) error {
	n, k := len(j.truthClass), len(j.labels)
	correct := [2][]bool{}
	results := [2]*ModelResult{&ev.Candidate, &ev.Baseline}
	for i, s := range j.sides {
		pred := make([]int, n)
		correct[i] = make([]bool, n)
		fromBase := make([]int, k) // baseline class index -> this model's
		for c, b := range s.toBase {
			fromBase[b] = c
		}
		var nll float64
		for r := range n {
			row := out[i].v[r*out[i].width : (r+1)*out[i].width]
			probs := s.pkg.hasProbabilities()
			pred[r] = s.toBase[classOf(row, probs)]
			correct[i][r] = pred[r] == j.truthClass[r]
			if probs {
				nll -= logOfProb(row, fromBase[j.truthClass[r]])
			} else {
				nll -= logProb(row, fromBase[j.truthClass[r]])
			}
		}
		m := ClassMetrics(pred, j.truthClass, k)
		if s.pkg.hasLogits() || s.pkg.hasProbabilities() {
			m["log_loss"] = nll / float64(n)
		}
		results[i].Metrics = m
	}
	var b, c int
	for r := range n {
		switch {
		case correct[1][r] && !correct[0][r]:
			b++
		case correct[0][r] && !correct[1][r]:
			c++
		}
	}
	mc, err := stats.McNemarAuto(b, c)
	if err != nil {
		return err
	}
	ev.McNemar = &mc
	ev.Test = "mcnemar-chi2-corrected"
	if mc.Exact {
		ev.Test = "mcnemar-exact"
	}
	ev.Significant = mc.PValue < j.opts.Alpha
	iv, err := AccuracyDifferenceInterval(ctx, correct[0], correct[1], j.opts.Resamples, j.opts.Seed, 1-j.opts.Alpha, j.bootstrapProgress())
	if err != nil {
		return err
	}
	ev.Interval = &iv
	ev.HigherIsBetter = true
	ev.Difference = ev.Candidate.Metrics["accuracy"] - ev.Baseline.Metrics["accuracy"]
	ev.Improvement = ev.Difference
	return nil
}

// compareRegressors computes both regressors' metrics and the paired
// bootstrap interval of the gate metric's difference, which decides
// significance.
func (j *Job) compareRegressors(ctx context.Context, ev *Evidence, out [2]outputs) error {
	n := len(j.truthValue)
	var preds [2][]float64
	for i := range j.sides {
		preds[i] = make([]float64, n)
		for r := range n {
			preds[i][r] = float64(out[i].v[r*out[i].width])
		}
	}
	ev.Candidate.Metrics = metrics(train.RegressionMetrics(preds[0], j.truthValue))
	ev.Baseline.Metrics = metrics(train.RegressionMetrics(preds[1], j.truthValue))
	iv, err := RegressionDifferenceInterval(ctx, j.opts.Metric, j.truthValue, preds[0], preds[1], j.opts.Resamples, j.opts.Seed, 1-j.opts.Alpha, j.bootstrapProgress())
	if err != nil {
		return err
	}
	ev.Interval = &iv
	ev.Test = "paired-bootstrap"
	ev.HigherIsBetter = higherIsBetter(j.opts.Metric)
	ev.Difference = ev.Candidate.Metrics[j.opts.Metric] - ev.Baseline.Metrics[j.opts.Metric]
	ev.Improvement = ev.Difference
	if !ev.HigherIsBetter {
		ev.Improvement = -ev.Difference
	}
	ev.Significant = iv.Low > 0 || iv.High < 0
	return nil
}

func (j *Job) bootstrapProgress() func(done, total int) {
	if j.opts.Progress == nil {
		return nil
	}
	return func(done, total int) { j.opts.Progress(Progress{Stage: "bootstrap", Done: done, Total: total}) }
}

// AccuracyDifferenceInterval is the paired percentile bootstrap interval
// (stats.Bootstrap: resamples B, seed, level) of the candidate's accuracy
// minus the baseline's, from each row's correctness (same length, rows in
// the same order). Mismatched lengths are InvalidArgument.
func AccuracyDifferenceInterval(ctx context.Context, candidate, baseline []bool, resamples int, seed uint64, level float64, progress func(done, total int)) (stats.Interval, error) {
	if len(candidate) != len(baseline) {
		return stats.Interval{}, core.Errorf(core.InvalidArgument, "kiln: evaluate: %d candidate rows, %d baseline rows", len(candidate), len(baseline))
	}
	d := make([]float64, len(candidate))
	for i := range d {
		d[i] = b2f(candidate[i]) - b2f(baseline[i])
	}
	return stats.Bootstrap(ctx, len(d), resamples, seed, level, func(idx []int) float64 {
		var s float64
		for _, r := range idx {
			s += d[r]
		}
		return s / float64(len(idx))
	}, progress)
}

// RegressionDifferenceInterval is the paired percentile bootstrap interval
// (stats.Bootstrap: resamples B, seed, level) of metric ("mse", "mae" or
// "r2", as core/train.RegressionMetrics computes it on the resampled
// rows) of the candidate's predictions minus the baseline's, on the same
// rows with truth. Mismatched lengths and unknown metrics are
// InvalidArgument.
func RegressionDifferenceInterval(ctx context.Context, metric string, truth, candidate, baseline []float64, resamples int, seed uint64, level float64, progress func(done, total int)) (stats.Interval, error) {
	if len(candidate) != len(truth) || len(baseline) != len(truth) {
		return stats.Interval{}, core.Errorf(core.InvalidArgument, "kiln: evaluate: %d truth rows, %d candidate rows, %d baseline rows", len(truth), len(candidate), len(baseline))
	}
	if metric != "mse" && metric != "mae" && metric != "r2" {
		return stats.Interval{}, core.Errorf(core.InvalidArgument, "kiln: evaluate: regression metric %q (want mse, mae or r2)", metric)
	}
	n := len(truth)
	t, c, b := make([]float64, n), make([]float64, n), make([]float64, n)
	return stats.Bootstrap(ctx, n, resamples, seed, level, func(idx []int) float64 {
		for i, r := range idx {
			t[i], c[i], b[i] = truth[r], candidate[r], baseline[r]
		}
		return train.RegressionMetrics(c, t)[metric] - train.RegressionMetrics(b, t)[metric]
	}, progress)
}

// ClassMetrics returns accuracy and the macro averages (over all k
// classes, both for k = 2) of precision, recall and F1 ("accuracy",
// "precision_macro", "recall_macro", "f1_macro"), from
// core/train.ClassMetrics: for k > 2 its averages are macro averages; for
// k = 2 it reports class 1's, so the macro average is the mean of class
// 1's and, with both labellings swapped, class 0's (scikit-learn's
// f1_score(average='macro')).
func ClassMetrics(pred, truth []int, k int) map[string]float64 {
	m := train.ClassMetrics(pred, truth, k)
	out := map[string]float64{"accuracy": m["accuracy"], "precision_macro": m["precision"], "recall_macro": m["recall"], "f1_macro": m["f1"]}
	if k == 2 {
		flip := func(v []int) []int {
			f := make([]int, len(v))
			for i, x := range v {
				f[i] = 1 - x
			}
			return f
		}
		m0 := train.ClassMetrics(flip(pred), flip(truth), 2)
		out["precision_macro"] = (m["precision"] + m0["precision"]) / 2
		out["recall_macro"] = (m["recall"] + m0["recall"]) / 2
		out["f1_macro"] = (m["f1"] + m0["f1"]) / 2
	}
	return out
}

// classOf is the class a row of outputs predicts: argmax, and for one
// value class 1 when it is > 0 (a logit) or > 0.5 (a probability, when
// probs).
func classOf(row []float32, probs bool) int {
	if probs && len(row) == 1 {
		if row[0] > 0.5 {
			return 1
		}
		return 0
	}
	return argmax(row)
}

// logOfProb is the log-probability of class c from a row of probabilities
// (one value: that of class 1), clipped to [1e-7, 1-1e-7] as Keras does.
func logOfProb(row []float32, c int) float64 {
	p := float64(row[0])
	if len(row) > 1 {
		p = float64(row[c])
	} else if c == 0 {
		p = 1 - p
	}
	return math.Log(math.Min(math.Max(p, 1e-7), 1-1e-7))
}

// argmax is the index of the largest value (the first of ties); one value
// is a binary logit: class 1 when it is > 0.
func argmax(row []float32) int {
	if len(row) == 1 {
		if row[0] > 0 {
			return 1
		}
		return 0
	}
	best := 0
	for i, v := range row {
		if v > row[best] {
			best = i
		}
	}
	return best
}

// logProb is the natural log of the probability of class c given a row
// of logits: log-softmax (several logits) or log-sigmoid (one logit of
// class 1), computed stably in float64 (max subtracted; log σ(z) =
// -log1p(exp(-z)) for z >= 0 and z - log1p(exp(z)) below), so that no
// probability is clipped as scikit-learn's log_loss clips at machine
// epsilon.
func logProb(row []float32, c int) float64 {
	if len(row) == 1 {
		z := float64(row[0])
		if c == 0 {
			z = -z
		}
		if z >= 0 {
			return -math.Log1p(math.Exp(-z))
		}
		return z - math.Log1p(math.Exp(z))
	}
	mx := math.Inf(-1)
	for _, v := range row {
		mx = math.Max(mx, float64(v))
	}
	var s float64
	for _, v := range row {
		s += math.Exp(float64(v) - mx)
	}
	return float64(row[c]) - mx - math.Log(s)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// decide applies the gate's rule to the evidence; d is Improvement
// (positive: candidate better), m the minimum margin:
//
//  1. REJECT when the test finds the candidate significantly worse
//     (significant and d < 0), or when d < -m (worse by more than the
//     margin, significant or not);
//  2. PROMOTE when significant, d > 0 and d >= m, unless a budget is
//     exceeded (candidate/baseline median batch latency > MaxLatencyRatio,
//     or model.pt bytes > MaxSizeRatio), which makes it HOLD;
//  3. HOLD otherwise: no significant difference, or an improvement below
//     the margin.
//
// Significance is McNemar's p < Alpha for classifiers and a 1-Alpha
// bootstrap interval of the difference that excludes 0 for regressors.
// The margin is compared with the point estimate d.
func decide(ev *Evidence) (Verdict, string) {
	d, m := ev.Improvement, ev.MinMargin
	cmp := fmt.Sprintf("candidate %s %.6g vs baseline %.6g (improvement %+.6g, margin %g)",
		ev.Metric, ev.Candidate.Metrics[ev.Metric], ev.Baseline.Metrics[ev.Metric], d, m)
	var test string
	if ev.McNemar != nil {
		form := "chi-square with continuity correction"
		if ev.McNemar.Exact {
			form = "exact binomial"
		}
		test = fmt.Sprintf("McNemar %s p=%.4g (b=%d, c=%d), alpha %g", form, ev.McNemar.PValue, ev.McNemar.B, ev.McNemar.C, ev.Alpha)
	} else {
		test = fmt.Sprintf("paired bootstrap %s of the %s difference", ev.Interval, ev.Metric)
	}
	switch {
	case ev.Significant && d < 0:
		return Reject, fmt.Sprintf("significantly worse: %s; %s", cmp, test)
	case d < -m:
		return Reject, fmt.Sprintf("worse by more than the margin: %s; %s", cmp, test)
	case ev.Significant && d > 0 && d >= m:
		b := ev.Budgets
		if b.MaxLatencyRatio > 0 && b.LatencyRatio > b.MaxLatencyRatio {
			return Hold, fmt.Sprintf("better but over the latency budget: median batch latency ratio %.3g > %g; %s; %s", b.LatencyRatio, b.MaxLatencyRatio, cmp, test)
		}
		if b.MaxSizeRatio > 0 && b.SizeRatio > b.MaxSizeRatio {
			return Hold, fmt.Sprintf("better but over the size budget: model.pt size ratio %.3g > %g; %s; %s", b.SizeRatio, b.MaxSizeRatio, cmp, test)
		}
		return Promote, fmt.Sprintf("significantly better by at least the margin: %s; %s", cmp, test)
	case ev.Significant && d > 0:
		return Hold, fmt.Sprintf("significantly better but below the margin: %s; %s", cmp, test)
	}
	return Hold, fmt.Sprintf("no significant difference: %s; %s", cmp, test)
}
