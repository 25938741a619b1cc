package data_test

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
)

const csvText = `age,income,city,label
30,1000,paris,yes
40,,london,no
50,3000,paris,yes
NA,4000,,no
60,5000,tokyo,yes
`

func all(n int) []int {
	r := make([]int, n)
	for i := range r {
		r[i] = i
	}
	return r
}

func TestReadCSV(t *testing.T) {
	tb, err := data.ReadCSV(strings.NewReader(csvText))
	require.NoError(t, err)
	assert.Equal(t, 5, tb.Rows())
	assert.Equal(t, []string{"age", "income", "city", "label"}, tb.Names())
	age, _ := tb.Column("age")
	assert.False(t, age.Categorical)
	assert.True(t, math.IsNaN(age.Num[3]))
	city, _ := tb.Column("city")
	assert.True(t, city.Categorical)
	assert.True(t, city.Missing(3))
	assert.Len(t, tb.Fingerprint, 64)

	_, err = tb.Column("salary")
	require.Error(t, err)
	assert.Contains(t, err.Error(), `column "salary" not found; the data has columns age, income, city, label`)

	_, err = data.ReadCSV(strings.NewReader(""))
	assert.ErrorContains(t, err, "empty input")
	_, err = data.ReadCSV(strings.NewReader("a,b\n1,2,3\n"))
	assert.ErrorContains(t, err, "wrong number of fields")
}

func TestFitErrorsNameTheColumn(t *testing.T) {
	tb, err := data.ReadCSV(strings.NewReader(csvText))
	require.NoError(t, err)
	_, err = data.Fit(tb, all(5), data.Options{Target: "label"})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `column "age" has 1 missing (NaN) values (first in data row 4) and no imputation is configured`)

	_, err = data.Fit(tb, all(5), data.Options{Target: "price", Impute: "mean"})
	assert.ErrorContains(t, err, `column "price" not found`)

	empty, err := data.ReadCSV(strings.NewReader("a,b\n"))
	require.NoError(t, err)
	_, err = data.Fit(empty, nil, data.Options{Target: "b"})
	assert.ErrorContains(t, err, "the data set is empty")

	_, err = data.Fit(tb, all(5), data.Options{Target: "label", Impute: "mode"})
	assert.ErrorContains(t, err, `unknown imputation "mode"`)
	_, err = data.Fit(tb, all(5), data.Options{Target: "city", Impute: "mean", Task: data.Regression})
	assert.ErrorContains(t, err, `target column "city" is not numeric`)
}

func TestPreprocessingRunsInsideTheModel(t *testing.T) {
	tb, err := data.ReadCSV(strings.NewReader(csvText))
	require.NoError(t, err)
	train := []int{0, 1, 2, 3} // fit on the first four rows only
	p, err := data.Fit(tb, train, data.Options{Target: "label", Impute: "median"})
	require.NoError(t, err)
	assert.Equal(t, data.Classification, p.Task)
	assert.Equal(t, []string{"no", "yes"}, p.Labels)
	assert.Equal(t, []string{"london", "paris"}, p.Features[2].Categories)
	assert.Equal(t, 40.0, *p.Features[0].Fill, "median of 30, 40, 50")
	assert.Equal(t, 3000.0, *p.Features[1].Fill, "median of 1000, 3000, 4000")
	assert.Equal(t, 4, p.NumFeatures())

	y, err := p.EncodeTarget(tb, all(5))
	require.NoError(t, err)
	assert.Equal(t, []float32{1, 0, 1, 0, 1}, y)
	x, err := p.EncodeFeatures(tb, all(5))
	require.NoError(t, err)
	assert.True(t, math.IsNaN(float64(x[3*3+2])), "missing city")
	assert.True(t, math.IsNaN(float64(x[4*3+2])), "tokyo unseen in training")

	// A network that is only Flatten returns the preprocessed features.
	net, err := nn.BuildWithPrelude(nn.Sequential(nn.Flatten()), p.Prelude(), 1)
	require.NoError(t, err)
	defer net.Close()
	in, err := core.NewTensor(x, 5, 3)
	require.NoError(t, err)
	defer in.Close()
	outs, err := net.Forward(in)
	require.NoError(t, err)
	defer core.CloseAll(outs)
	got, _ := core.Data[float32](outs[0])
	// age: train values after imputation 30, 40, 50, 40: mean 40, sd sqrt(50).
	sd := float32(math.Sqrt(50))
	want := []float32{
		(30 - 40) / sd, 0, 0, 1,
		0, 0, 1, 0,
		(50 - 40) / sd, 0, 0, 1,
		0, 0, 0, 0,
		(60 - 40) / sd, 0, 0, 0,
	}
	inc := p.Features[1]
	for i, v := range []float64{1000, 3000, 3000, 4000, 5000} {
		want[i*4+1] = float32((v - inc.Shift) / inc.Scale)
	}
	require.Equal(t, []int64{5, 4}, outs[0].Shape())
	for i := range want {
		assert.InDelta(t, want[i], got[i], 1e-5, "element %d", i)
	}
}

func TestMinMaxAndConstant(t *testing.T) {
	tb, err := data.NewTable([]string{"a", "t"}, []float64{0, 1, 5, 2, math.NaN(), 1, 10, 2})
	require.NoError(t, err)
	p, err := data.Fit(tb, all(4), data.Options{Target: "t", Impute: "constant", ImputeValue: 2, Scale: "minmax", Task: data.Regression})
	require.NoError(t, err)
	assert.Equal(t, 0.0, p.Features[0].Shift)
	assert.Equal(t, 10.0, p.Features[0].Scale)
	assert.Equal(t, 2.0, *p.Features[0].Fill)
}

func TestSplit(t *testing.T) {
	classes := make([]int, 1000)
	for i := range classes {
		if i%10 == 0 {
			classes[i] = 1 // 10% minority
		}
	}
	tr, va, te, err := data.Split(1000, classes, data.SplitOptions{Val: 0.2, Test: 0.2, Stratify: true}, 42)
	require.NoError(t, err)
	assert.Equal(t, 1000, len(tr)+len(va)+len(te))
	count := func(rows []int) int {
		n := 0
		for _, r := range rows {
			n += classes[r]
		}
		return n
	}
	assert.Equal(t, 20, count(va))
	assert.Equal(t, 20, count(te))
	assert.Equal(t, 60, count(tr))
	tr2, _, _, _ := data.Split(1000, classes, data.SplitOptions{Val: 0.2, Test: 0.2, Stratify: true}, 42)
	assert.Equal(t, tr, tr2, "same seed, same split")
	tr3, _, _, _ := data.Split(1000, classes, data.SplitOptions{Val: 0.2, Test: 0.2, Stratify: true}, 43)
	assert.NotEqual(t, tr, tr3)

	_, _, _, err = data.Split(0, nil, data.SplitOptions{}, 1)
	assert.ErrorContains(t, err, "empty")
	_, _, _, err = data.Split(10, nil, data.SplitOptions{Val: 0.5, Test: 0.5}, 1)
	assert.ErrorContains(t, err, "sum below 1")
}

func TestDatasetBatches(t *testing.T) {
	x := make([]float32, 10*2)
	y := make([]float32, 10)
	for i := range y {
		y[i] = float32(i)
		x[2*i], x[2*i+1] = float32(i), float32(-i)
	}
	d, err := data.NewDataset(x, 2, y)
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(1, 2))
	order := d.Shuffle(rng)
	assert.NotEqual(t, order, d.Shuffle(rng), "each epoch reshuffles")
	seen := map[float32]bool{}
	sizes := []int64{}
	for b, err := range d.Batches(order, 4) {
		require.NoError(t, err)
		xs, _ := core.Data[float32](b.X)
		ys, _ := core.Data[float32](b.Y)
		for i, v := range ys {
			seen[v] = true
			assert.Equal(t, v, xs[2*i])
		}
		sizes = append(sizes, b.X.Shape()[0])
		b.X.Close()
		b.Y.Close()
	}
	assert.Equal(t, []int64{4, 4, 2}, sizes)
	assert.Len(t, seen, 10)
	_, err = data.NewDataset(nil, 2, nil)
	assert.ErrorContains(t, err, "empty")
}

// Malformed CSV is INVALID_ARGUMENT, whatever the fault.
func TestReadCSVErrorsAreInvalidArgument(t *testing.T) {
	for _, in := range []string{"", "a,b\n1,2,3\n", "a,,b\n1,2,3\n", "a,a\n1,2\n", "a,b\n\"1,2\n", "a\"b\n1\n"} {
		_, err := data.ReadCSV(strings.NewReader(in))
		require.Error(t, err, "%q", in)
		assert.True(t, core.HasCode(err, core.InvalidArgument), "%q: %v has code %v", in, err, core.CodeOf(err))
	}
}
