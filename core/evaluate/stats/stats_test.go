package stats

import (
	"context"
	"math"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
)

// close reports whether got is within rel (relative) of want, or both 0.
func closeTo(t *testing.T, want, got, rel float64, msg string, args ...any) {
	t.Helper()
	if want == got || math.Abs(got-want) <= rel*math.Abs(want) {
		return
	}
	t.Errorf(msg+": got %.17g, want %.17g (rel. error %.3g)", append(args, got, want, math.Abs(got-want)/math.Abs(want))...)
}

// Values from statsmodels 0.15.0,
// statsmodels.stats.contingency_tables.mcnemar([[50, b], [c, 50]],
// exact=True) and (exact=False, correction=True), SciPy 1.17.1 underneath.
// b+c = 0 has no chi-square value there (statsmodels divides by zero).
var mcnemarCases = []struct {
	b, c              int
	exactStat, exactP float64
	chi2Stat, chi2P   float64
}{
	{0, 0, 0.0, 1.0, math.NaN(), math.NaN()},
	{0, 1, 0.0, 1.0, 0.0, 1.0},
	{1, 0, 0.0, 1.0, 0.0, 1.0},
	{3, 9, 3.0, 0.14599609375, 2.0833333333333335, 0.14891467317876161},
	{9, 3, 3.0, 0.14599609375, 2.0833333333333335, 0.14891467317876161},
	{5, 5, 5.0, 1.0, 0.1, 0.7518296340458492},
	{0, 12, 0.0, 0.00048828125, 10.083333333333334, 0.0014961642897455517},
	{2, 22, 2.0, 3.5881996154785156e-05, 15.041666666666666, 0.00010516355403363098},
	{12, 12, 12.0, 1.0, 0.041666666666666664, 0.8382564863858263},
	{10, 15, 10.0, 0.42435622215270996, 0.64, 0.4237107971667936},
	{30, 12, 12.0, 0.007915897334896727, 6.880952380952381, 0.008711912962379598},
	{12, 30, 12.0, 0.007915897334896727, 6.880952380952381, 0.008711912962379598},
	{100, 80, 80.0, 0.15653146957815167, 2.0055555555555555, 0.1567238679451147},
	{400, 330, 330.0, 0.010605994778707762, 6.521917808219178, 0.010655304191197383},
	{1000, 1000, 1000.0, 1.0, 0.0005, 0.9821602454970679},
	{5, 40, 5.0, 7.878384167270269e-08, 25.68888888888889, 4.0112993295804213e-07},
}

func TestMcNemarMatchesStatsmodels(t *testing.T) {
	for _, tc := range mcnemarCases {
		e, err := McNemarTest(tc.b, tc.c, true)
		require.NoError(t, err)
		assert.True(t, e.Exact)
		closeTo(t, tc.exactStat, e.Statistic, 0, "exact b=%d c=%d statistic", tc.b, tc.c)
		closeTo(t, tc.exactP, e.PValue, 1e-12, "exact b=%d c=%d p", tc.b, tc.c)

		a, err := McNemarTest(tc.b, tc.c, false)
		require.NoError(t, err)
		if tc.b+tc.c == 0 {
			// The documented departure: no discordant pair, no evidence.
			assert.Equal(t, McNemar{PValue: 1}, a)
			continue
		}
		closeTo(t, tc.chi2Stat, a.Statistic, 1e-14, "chi2 b=%d c=%d statistic", tc.b, tc.c)
		closeTo(t, tc.chi2P, a.PValue, 1e-12, "chi2 b=%d c=%d p", tc.b, tc.c)
	}
}

func TestMcNemarAutoRule(t *testing.T) {
	for _, tc := range []struct {
		b, c  int
		exact bool
	}{{0, 0, true}, {12, 12, true}, {2, 22, true}, {10, 15, false}, {30, 12, false}} {
		r, err := McNemarAuto(tc.b, tc.c)
		require.NoError(t, err)
		assert.Equal(t, tc.exact, r.Exact, "b=%d c=%d", tc.b, tc.c)
	}
	_, err := McNemarTest(-1, 3, true)
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
}

func TestBinomialCDFHalfMatchesSciPy(t *testing.T) {
	// scipy.stats.binom.cdf(k, n, 0.5), SciPy 1.17.1.
	for _, tc := range []struct {
		k, n int
		want float64
	}{
		{0, 1, 0.5}, {3, 10, 0.171875}, {7, 10, 0.9453125}, {12, 25, 0.5},
		{40, 100, 0.028443966820490444}, {480, 1000, 0.10872414660207075},
		{4900, 10000, 0.023292763852473225}, {0, 2000, 0}, {-1, 5, 0}, {5, 5, 1}, {9, 5, 1},
	} {
		closeTo(t, tc.want, BinomialCDFHalf(tc.k, tc.n), 1e-11, "cdf(%d, %d)", tc.k, tc.n)
	}
}

func TestChiSquare1SFMatchesSciPy(t *testing.T) {
	// scipy.stats.chi2.sf(x, 1), SciPy 1.17.1.
	for _, tc := range [][2]float64{
		{0.01, 0.920344325445942}, {0.5, 0.47950012218695337}, {1, 0.31731050786291115},
		{3.841458820694124, 0.04999999999999989}, {10, 0.001565402258002549},
		{62.41, 2.789034293318537e-15}, {200, 2.0884875837625688e-45}, {0, 1}, {math.Inf(1), 0},
	} {
		closeTo(t, tc[1], ChiSquare1SF(tc[0]), 1e-12, "sf(%v)", tc[0])
	}
}

func TestQuantileIsNumpyLinear(t *testing.T) {
	x := []float64{1, 2, 4, 8, 16}
	// numpy.quantile(x, [0, 0.025, 0.5, 0.9, 0.975, 1]).
	for _, tc := range [][2]float64{{0, 1}, {0.025, 1.1}, {0.5, 4}, {0.9, 12.8}, {0.975, 15.2}, {1, 16}} {
		closeTo(t, tc[1], Quantile(x, tc[0]), 1e-14, "q(%v)", tc[0])
	}
	assert.True(t, math.IsNaN(Quantile(nil, 0.5)))
}

func TestResamplesAreSeeded(t *testing.T) {
	collect := func(seed uint64) [][]int {
		var all [][]int
		require.NoError(t, Resamples(context.Background(), 7, 5, seed, func(k int, idx []int) error {
			all = append(all, slices.Clone(idx))
			return nil
		}))
		return all
	}
	a, b, c := collect(3), collect(3), collect(4)
	assert.Equal(t, a, b)
	assert.NotEqual(t, a, c)
	for _, idx := range a {
		for _, i := range idx {
			assert.True(t, i >= 0 && i < 7)
		}
	}
}

// TestBootstrapIsThePercentileOfItsResamples recomputes the interval from
// the resamples Resamples draws, as numpy would: the statistic on each,
// then the linear quantiles.
func TestBootstrapIsThePercentileOfItsResamples(t *testing.T) {
	d := []float64{0.3, -1.2, 2.5, 0.1, 0.7, -0.4, 1.9, 0.0, 0.8, -2.2, 1.1}
	mean := func(idx []int) float64 {
		s := 0.0
		for _, i := range idx {
			s += d[i]
		}
		return s / float64(len(idx))
	}
	iv, err := Bootstrap(context.Background(), len(d), 999, 42, 0.9, mean, nil)
	require.NoError(t, err)
	var dist []float64
	require.NoError(t, Resamples(context.Background(), len(d), 999, 42, func(_ int, idx []int) error {
		dist = append(dist, mean(idx))
		return nil
	}))
	slices.Sort(dist)
	assert.Equal(t, Quantile(dist, 0.05), iv.Low)
	assert.Equal(t, Quantile(dist, 0.95), iv.High)
	assert.InDelta(t, mean([]int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}), iv.Estimate, 1e-15)
	assert.Less(t, iv.Low, iv.Estimate)
	assert.Greater(t, iv.High, iv.Estimate)
	assert.Equal(t, "percentile", iv.Method)

	_, err = Bootstrap(context.Background(), 0, 10, 1, 0.95, mean, nil)
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
	_, err = Bootstrap(context.Background(), 3, 10, 1, 1.5, mean, nil)
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = Bootstrap(ctx, 3, 10, 1, 0.95, mean, nil)
	assert.ErrorIs(t, err, context.Canceled)
}
