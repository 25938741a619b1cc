// Package stats holds the paired significance tests of Kiln's evaluation
// gate (core/evaluate): McNemar's test on the per-row correct/incorrect
// pairs of two classifiers, and the paired percentile bootstrap interval
// of the difference of a metric. It is pure Go (no libtorch), so that its
// numbers can be checked against SciPy and statsmodels cheaply
// (tests/python/test_evaluate_stats.py runs core/evaluate/internal/statscheck).
package stats

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/kilnml/kiln/core"
)

// ExactBelow is the number of discordant pairs b+c below which McNemarAuto
// uses the exact binomial test; from it on, the chi-square approximation
// with continuity correction. The rule of thumb that the chi-square
// approximation needs b+c >= 25 is the usual one (e.g. Rosner,
// Fundamentals of Biostatistics; the exact test is always valid, the
// approximation only for large b+c).
const ExactBelow = 25

// McNemar is the outcome of McNemar's test (McNemar 1947, "Note on the
// sampling error of the difference between correlated proportions or
// percentages", Psychometrika 12:153-157) on a paired 2x2 table whose
// discordant cells are B and C.
//
// In the evaluation gate, B counts the rows the baseline classifies
// correctly and the candidate incorrectly, and C the rows the candidate
// gets right and the baseline wrong, so that the candidate's accuracy minus
// the baseline's is (C-B)/rows. The null hypothesis is that both kinds of
// disagreement are equally likely (equal accuracies).
type McNemar struct {
	B int `json:"b"`
	C int `json:"c"`
	// Exact tells which form was used: the exact binomial test (true) or
	// the chi-square approximation with continuity correction (false).
	Exact bool `json:"exact"`
	// Statistic is min(B, C) for the exact test and the corrected
	// chi-square (|B-C|-1)²/(B+C) otherwise, as statsmodels reports them.
	Statistic float64 `json:"statistic"`
	// PValue is the two-sided p-value.
	PValue float64 `json:"p_value"`
}

// McNemarTest computes McNemar's test on the discordant counts b and c
// (both >= 0; a negative count is an InvalidArgument error), in the form
// statsmodels 0.15 implements as
// statsmodels.stats.contingency_tables.mcnemar(table, exact, correction=True):
//
//   - exact: statistic min(b, c), p = min(1, 2·P(X <= min(b, c))) with
//     X ~ Binomial(b+c, 1/2), the exact conditional test;
//   - otherwise: statistic (|b-c| - 1)²/(b+c), the chi-square statistic
//     with Edwards' continuity correction (Edwards 1948, "Note on the
//     'correction for continuity' in testing the significance of the
//     difference between correlated proportions", Psychometrika
//     13:185-187), and p = P(χ²₁ > statistic).
//
// One deliberate departure: with b+c = 0 (no discordant pair) the
// chi-square form returns statistic 0 and p = 1, where statsmodels divides
// by zero (statistic inf, p 0); with no disagreement there is no evidence
// of a difference. The exact form at b+c = 0 agrees with statsmodels
// (statistic 0, p 1).
func McNemarTest(b, c int, exact bool) (McNemar, error) {
	if b < 0 || c < 0 {
		return McNemar{}, core.Errorf(core.InvalidArgument, "kiln: mcnemar: counts b=%d c=%d must be >= 0", b, c)
	}
	r := McNemar{B: b, C: c, Exact: exact}
	n := b + c
	if n == 0 {
		r.PValue = 1
		return r, nil
	}
	if exact {
		k := min(b, c)
		r.Statistic = float64(k)
		r.PValue = min(1, 2*BinomialCDFHalf(k, n))
		return r, nil
	}
	d := math.Abs(float64(b-c)) - 1
	r.Statistic = d * d / float64(n)
	r.PValue = ChiSquare1SF(r.Statistic)
	return r, nil
}

// McNemarAuto is McNemarTest with the form chosen by the number of
// discordant pairs: exact when b+c < ExactBelow (25), the chi-square with
// continuity correction otherwise.
func McNemarAuto(b, c int) (McNemar, error) {
	return McNemarTest(b, c, b+c < ExactBelow)
}

// BinomialCDFHalf returns P(X <= k) for X ~ Binomial(n, 1/2), n >= 0 (as
// scipy.stats.binom.cdf(k, n, 0.5)): 0 for k < 0, 1 for k >= n. It sums
// C(n, i)/C(n, m) for i <= m = min(k, n-k-1) by the downward recurrence
// C(n, i-1) = C(n, i)·i/(n-i+1), scales by C(n, m)·2⁻ⁿ computed through
// log-gamma, and uses the symmetry P(X <= k) = 1 - P(X <= n-k-1) for
// k >= n/2, so that every term summed is at most the last one and the
// result keeps a relative error of about 1e-13 for n up to 10⁶.
func BinomialCDFHalf(k, n int) float64 {
	if k < 0 {
		return 0
	}
	if k >= n {
		return 1
	}
	if 2*k >= n {
		return 1 - BinomialCDFHalf(n-k-1, n)
	}
	sum, r := 0.0, 1.0
	for i := k; i >= 0; i-- {
		sum += r
		if r < 1e-18*sum {
			break
		}
		r *= float64(i) / float64(n-i+1)
	}
	lc := lgamma(float64(n)+1) - lgamma(float64(k)+1) - lgamma(float64(n-k)+1)
	return math.Exp(lc-float64(n)*math.Ln2) * sum
}

func lgamma(x float64) float64 {
	v, _ := math.Lgamma(x)
	return v
}

// ChiSquare1SF returns P(χ²₁ > x), the survival function of the
// chi-square distribution with one degree of freedom (as
// scipy.stats.chi2.sf(x, 1)), through the identity
// P(χ²₁ > x) = P(|Z| > √x) = erfc(√(x/2)) for a standard normal Z.
// x <= 0 gives 1; +Inf gives 0.
func ChiSquare1SF(x float64) float64 {
	if x <= 0 {
		return 1
	}
	return math.Erfc(math.Sqrt(x / 2))
}

// Quantile returns the p-quantile (0 <= p <= 1) of the ascending-sorted
// sorted by linear interpolation between order statistics, the "linear"
// method (Hyndman & Fan 1996, definition 7) that numpy.quantile and
// scipy.stats.quantile use by default: with h = (N-1)·p (computed as
// numpy does, N·p + (1 - p) - 1), the value
// x[⌊h⌋] + (h-⌊h⌋)·(x[⌊h⌋+1] - x[⌊h⌋]), computed from the upper end for
// fractions >= 1/2 as numpy's lerp does. An empty slice gives NaN.
func Quantile(sorted []float64, p float64) float64 {
	n := len(sorted)
	if n == 0 || math.IsNaN(p) {
		return math.NaN()
	}
	// numpy's _compute_virtual_index with alpha = beta = 1, term by term.
	h := float64(n)*p + (1 + p*(1-1-1)) - 1
	lo := int(math.Floor(h))
	if lo < 0 {
		return sorted[0]
	}
	if lo >= n-1 {
		return sorted[n-1]
	}
	a, b, t := sorted[lo], sorted[lo+1], h-float64(lo)
	if t >= 0.5 {
		return b - (b-a)*(1-t)
	}
	return a + (b-a)*t
}

// Interval is a paired bootstrap interval of a statistic of two models'
// predictions on the same rows (a metric's difference, candidate minus
// baseline).
type Interval struct {
	// Method is "percentile": the interval's ends are the (1-Level)/2 and
	// (1+Level)/2 quantiles (Quantile) of the bootstrap distribution
	// (Efron & Tibshirani 1993, An Introduction to the Bootstrap, ch. 13),
	// as scipy.stats.bootstrap(..., paired=True, method='percentile')
	// computes it.
	Method string `json:"method"`
	// Estimate is the statistic on all rows.
	Estimate float64 `json:"estimate"`
	// Low and High are the interval's ends.
	Low  float64 `json:"low"`
	High float64 `json:"high"`
	// Level is the confidence level, e.g. 0.95.
	Level float64 `json:"level"`
	// StdErr is the standard deviation (n-1 denominator) of the bootstrap
	// distribution, the bootstrap standard error.
	StdErr float64 `json:"std_err"`
	// Resamples is B and Seed the seed of the resampling; Rows is n.
	Resamples int    `json:"resamples"`
	Seed      uint64 `json:"seed"`
	Rows      int    `json:"rows"`
}

// resampleStream is the PCG stream of the bootstrap's generator (a
// constant, so that the seed alone fixes the resamples).
const resampleStream = 0x626f6f74 // "boot"

// Resamples calls fn with each of b bootstrap resamples of the row indices
// 0..n-1: n indices drawn uniformly with replacement, in order, from a
// PCG generator (math/rand/v2) seeded with (seed, a fixed stream), so that
// the same (n, b, seed) always give the same resamples. idx is reused
// between calls. It stops with ctx's error when ctx is done (checked every
// resample) and with fn's error when fn returns one.
func Resamples(ctx context.Context, n, b int, seed uint64, fn func(k int, idx []int) error) error {
	rng := rand.New(rand.NewPCG(seed, resampleStream))
	idx := make([]int, n)
	for k := range b {
		if err := ctx.Err(); err != nil {
			return err
		}
		for j := range idx {
			idx[j] = rng.IntN(n)
		}
		if err := fn(k, idx); err != nil {
			return err
		}
	}
	return nil
}

// Bootstrap computes the paired percentile bootstrap interval (see
// Interval) of stat, a statistic of rows 0..n-1 of two models' outputs
// given as the indices of the rows to use (with repeats): B = resamples
// resamples drawn by Resamples with seed, stat applied to each, and the
// interval's ends the (1-level)/2 and (1+level)/2 quantiles of the B
// values. Resampling whole rows keeps each row's pair of predictions
// together: the paired bootstrap. progress, when not nil, is called with
// (done, resamples) about every 5% of the resamples.
//
// Errors (InvalidArgument): n < 1, resamples < 1, level outside (0, 1),
// a NaN statistic; ctx's error when it is cancelled.
func Bootstrap(ctx context.Context, n, resamples int, seed uint64, level float64, stat func(idx []int) float64, progress func(done, total int)) (Interval, error) {
	if n < 1 || resamples < 1 {
		return Interval{}, core.Errorf(core.InvalidArgument, "kiln: bootstrap: need at least one row and one resample (rows %d, resamples %d)", n, resamples)
	}
	if !(level > 0 && level < 1) {
		return Interval{}, core.Errorf(core.InvalidArgument, "kiln: bootstrap: confidence level %v is outside (0, 1)", level)
	}
	all := make([]int, n)
	for i := range all {
		all[i] = i
	}
	iv := Interval{Method: "percentile", Estimate: stat(all), Level: level, Resamples: resamples, Seed: seed, Rows: n}
	dist := make([]float64, resamples)
	every := max(1, resamples/20)
	err := Resamples(ctx, n, resamples, seed, func(k int, idx []int) error {
		v := stat(idx)
		if math.IsNaN(v) {
			return core.Errorf(core.InvalidArgument, "kiln: bootstrap: the statistic is NaN on resample %d", k)
		}
		dist[k] = v
		if progress != nil && ((k+1)%every == 0 || k+1 == resamples) {
			progress(k+1, resamples)
		}
		return nil
	})
	if err != nil {
		return Interval{}, err
	}
	var mean float64
	for _, v := range dist {
		mean += v
	}
	mean /= float64(resamples)
	if resamples > 1 {
		var ss float64
		for _, v := range dist {
			ss += (v - mean) * (v - mean)
		}
		iv.StdErr = math.Sqrt(ss / float64(resamples-1))
	}
	slices.Sort(dist)
	alpha := (1 - level) / 2
	iv.Low, iv.High = Quantile(dist, alpha), Quantile(dist, 1-alpha)
	return iv, nil
}

// String describes the interval, e.g. "95% percentile interval
// [0.0123, 0.0456] (B=2000, seed 1)".
func (iv Interval) String() string {
	return fmt.Sprintf("%g%% percentile interval [%.4g, %.4g] (B=%d, seed %d)", 100*iv.Level, iv.Low, iv.High, iv.Resamples, iv.Seed)
}
