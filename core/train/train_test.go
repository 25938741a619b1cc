package train_test

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
)

// linearData is y = 2 x0 - 3 x1 + 0.5 + small noise.
func linearData(n int, seed uint64) *data.Dataset {
	rng := rand.New(rand.NewPCG(seed, 3))
	x := make([]float32, 2*n)
	y := make([]float32, n)
	for i := range n {
		a, b := rng.NormFloat64(), rng.NormFloat64()
		x[2*i], x[2*i+1] = float32(a), float32(b)
		y[i] = float32(2*a - 3*b + 0.5 + 0.01*rng.NormFloat64())
	}
	d, _ := data.NewDataset(x, 2, y)
	return d
}

func TestEveryLossAndOptimizerLearns(t *testing.T) {
	tr, va := linearData(512, 1), linearData(128, 2)
	opts := []train.Optimizer{
		{Type: "sgd", LR: 0.05},
		{Type: "sgd", LR: 0.02, Momentum: 0.9, Nesterov: true, WeightDecay: 1e-5},
		{Type: "adam", LR: 0.02},
		{Type: "adamw", LR: 0.02},
		{Type: "rmsprop", LR: 0.01, Momentum: 0.5},
	}
	for _, loss := range []string{"mse", "l1", "huber"} {
		for _, o := range opts {
			net, err := nn.Build(nn.Sequential(nn.Linear(1)), 2, 1)
			require.NoError(t, err)
			before, err := train.Evaluate(net, va, train.Config{Loss: train.Loss{Type: loss}, BatchSize: 64})
			require.NoError(t, err)
			cfg := train.Config{Epochs: 15, BatchSize: 16, Seed: 1, Loss: train.Loss{Type: loss}, Optimizer: o,
				ClipGradNorm: 10, Schedule: train.Schedule{Type: "step", StepEpochs: 10, Gamma: 0.5}}
			res, err := train.Fit(context.Background(), net, tr, va, cfg, nil)
			require.NoError(t, err, "%s %s", loss, o.Type)
			after := res.History[len(res.History)-1].Val
			assert.Less(t, after["mse"], 0.05*before["mse"], "%s with %+v: val mse %v -> %v", loss, o, before["mse"], after["mse"])
			assert.Greater(t, after["r2"], 0.99, "%s %s", loss, o.Type)
			net.Close()
		}
	}
}

func TestBCEAndClassWeights(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	n := 400
	x := make([]float32, 2*n)
	y := make([]float32, n)
	for i := range n {
		a, b := rng.NormFloat64(), rng.NormFloat64()
		x[2*i], x[2*i+1] = float32(a), float32(b)
		if a+b > 0 {
			y[i] = 1
		}
	}
	ds, _ := data.NewDataset(x, 2, y)
	net, err := nn.Build(nn.Sequential(nn.Linear(8), nn.Tanh(), nn.Linear(1)), 2, 1)
	require.NoError(t, err)
	defer net.Close()
	res, err := train.Fit(context.Background(), net, ds, ds, train.Config{Epochs: 20, BatchSize: 32, Seed: 1,
		Loss: train.Loss{Type: "bce_with_logits"}, Optimizer: train.Optimizer{Type: "adam", LR: 0.01}}, nil)
	require.NoError(t, err)
	assert.Greater(t, res.Best["accuracy"], 0.95)

	net2, err := nn.Build(nn.Sequential(nn.Linear(2)), 2, 1)
	require.NoError(t, err)
	defer net2.Close()
	res, err = train.Fit(context.Background(), net2, ds, ds, train.Config{Epochs: 20, BatchSize: 32, Seed: 1,
		Loss:      train.Loss{Type: "cross_entropy", ClassWeights: []float64{1, 2}, LabelSmoothing: 0.1},
		Optimizer: train.Optimizer{Type: "adam", LR: 0.05}}, nil)
	require.NoError(t, err)
	assert.Greater(t, res.Best["accuracy"], 0.9)
}

func TestScheduleShapes(t *testing.T) {
	c := train.Config{Epochs: 10, Optimizer: train.Optimizer{LR: 1},
		Schedule: train.Schedule{Type: "cosine", WarmupEpochs: 1, MinLR: 0.1}}
	assert.InDelta(t, 0.1, c.LR(0, 10), 1e-12, "warmup starts at lr/steps")
	assert.InDelta(t, 1.0, c.LR(9, 10), 1e-12, "warmup ends at lr")
	assert.InDelta(t, 1.0, c.LR(10, 10), 1e-12, "cosine starts at lr")
	assert.InDelta(t, 0.55, c.LR(55, 10), 1e-12, "cosine midpoint")
	assert.Less(t, c.LR(99, 10), 0.11)
	s := train.Config{Epochs: 10, Optimizer: train.Optimizer{LR: 1}, Schedule: train.Schedule{Type: "step", StepEpochs: 3, Gamma: 0.5}}
	assert.Equal(t, 1.0, s.LR(29, 10))
	assert.Equal(t, 0.5, s.LR(30, 10))
	assert.Equal(t, 0.25, s.LR(60, 10))
}

func TestMetrics(t *testing.T) {
	m := train.ClassMetrics([]int{0, 1, 1, 1}, []int{0, 1, 0, 1}, 2)
	assert.Equal(t, 0.75, m["accuracy"])
	assert.InDelta(t, 2.0/3, m["precision"], 1e-12)
	assert.Equal(t, 1.0, m["recall"])
	assert.InDelta(t, 0.8, m["f1"], 1e-12)
	r := train.RegressionMetrics([]float64{1, 2, 3}, []float64{1, 2, 5})
	assert.InDelta(t, 4.0/3, r["mse"], 1e-12)
	assert.InDelta(t, 2.0/3, r["mae"], 1e-12)
	assert.InDelta(t, 1-4/(78.0/9), r["r2"], 1e-12) // mean 8/3
}

func TestCancellation(t *testing.T) {
	ds := linearData(4096, 1)
	net, err := nn.Build(nn.Sequential(nn.Linear(1)), 2, 1)
	require.NoError(t, err)
	defer net.Close()
	ctx, cancel := context.WithCancel(context.Background())
	steps := 0
	_, err = train.Fit(ctx, net, ds, nil, train.Config{Epochs: 50, BatchSize: 8, ProgressEvery: 5,
		Loss: train.Loss{Type: "mse"}, Optimizer: train.Optimizer{Type: "sgd", LR: 0.01}}, func(e train.Event) {
		if e.Kind == "step" {
			steps++
			if steps == 3 {
				cancel()
			}
		}
	})
	require.Error(t, err)
	assert.True(t, errors.Is(err, context.Canceled), "%v", err)
	assert.Equal(t, 3, steps, "stops at the next progress check")
}

func TestProgressEvents(t *testing.T) {
	ds := linearData(100, 1)
	net, err := nn.Build(nn.Sequential(nn.Linear(1)), 2, 1)
	require.NoError(t, err)
	defer net.Close()
	var evs []train.Event
	_, err = train.Fit(context.Background(), net, ds, ds, train.Config{Epochs: 2, BatchSize: 10, ProgressEvery: 4,
		Loss: train.Loss{Type: "mse"}, Optimizer: train.Optimizer{Type: "sgd", LR: 0.01}}, func(e train.Event) { evs = append(evs, e) })
	require.NoError(t, err)
	kinds := ""
	for _, e := range evs {
		kinds += e.Kind[:1]
	}
	// Steps 4, 8 and 10 of each epoch, then the epoch; done at the end.
	assert.Equal(t, "sssesssed", kinds)
	assert.Equal(t, int64(8), evs[1].Step)
	assert.Equal(t, int64(10), evs[1].Steps)
	assert.Greater(t, evs[1].SamplesPerSec, 0.0)
	assert.Contains(t, evs[3].Metrics, "r2")
	assert.Equal(t, 2, evs[len(evs)-1].Epoch)
}

func TestBitIdenticalOnOneThread(t *testing.T) {
	prev := core.NumThreads()
	require.NoError(t, core.SetNumThreads(1))
	defer core.SetNumThreads(prev)
	tb := loadCSV(t, "digits.csv")
	j := train.Job{
		Model: nn.Sequential(nn.Linear(32), nn.BatchNorm1d(), nn.ReLU(), nn.Dropout(0.3), nn.Linear(0)),
		Data:  data.Options{Target: "digit", Task: data.Classification},
		Split: data.SplitOptions{Val: 0.2, Stratify: true},
		Train: train.Config{Epochs: 3, BatchSize: 32, Seed: 7, Optimizer: train.Optimizer{Type: "adam", LR: 1e-3}},
	}
	weights := func(seed uint64) []float64 {
		j.Train.Seed = seed
		p, err := train.Prepare(j, tb)
		require.NoError(t, err)
		net, err := p.Build()
		require.NoError(t, err)
		defer net.Close()
		_, err = train.Fit(context.Background(), net, p.Train, p.Val, p.Job.Train, nil)
		require.NoError(t, err)
		w, err := net.State()
		require.NoError(t, err)
		return w
	}
	a, b := weights(7), weights(7)
	require.Equal(t, len(a), len(b))
	same := true
	for i := range a {
		if math.Float64bits(a[i]) != math.Float64bits(b[i]) {
			same = false
			t.Errorf("weight %d differs: %v vs %v", i, a[i], b[i])
			break
		}
	}
	assert.True(t, same)
	c := weights(8)
	assert.NotEqual(t, a, c, "another seed trains other weights")
}

func TestBadInputErrors(t *testing.T) {
	tb := loadCSV(t, "breast_cancer.csv")
	base := train.Job{
		Model: nn.Sequential(nn.Linear(8), nn.ReLU(), nn.Linear(0)),
		Data:  data.Options{Target: "diagnosis"},
		Split: data.SplitOptions{Val: 0.2},
		Train: train.Config{Epochs: 1, Seed: 1},
	}
	run := func(j train.Job, tb *data.Table) error {
		_, err := train.Run(context.Background(), j, tb, "", "", nil)
		return err
	}
	j := base
	j.Model = nn.Sequential(nn.Linear(8), nn.Layer{Type: "Convolution5d"}, nn.Linear(0))
	assert.ErrorContains(t, run(j, tb), `layer 1 (Convolution5d "l1"): unknown layer type "Convolution5d"`)

	j = base
	j.Model = nn.Sequential(nn.Linear(8).Named("hidden"), nn.Layer{Type: "linear", Name: "head", In: 16, Out: 2})
	assert.ErrorContains(t, run(j, tb), `layer 1 (linear "head"): in=16 but its input has 8 features`)

	j = base
	j.Data.Target = "tumour"
	assert.ErrorContains(t, run(j, tb), `column "tumour" not found`)

	nan, err := data.ReadCSV(stringsReader("a,b,y\n1,2,0\n3,,1\n5,6,0\n7,8,1\n"))
	require.NoError(t, err)
	j = base
	j.Data.Target = "y"
	j.Split = data.SplitOptions{}
	assert.ErrorContains(t, run(j, nan), `column "b" has 1 missing (NaN) values (first in data row 2) and no imputation is configured`)

	empty, err := data.ReadCSV(stringsReader("a,b,y\n"))
	require.NoError(t, err)
	assert.ErrorContains(t, run(j, empty), "the data set is empty")

	j = base
	j.Model = nn.Sequential(nn.Linear(3)) // 3 outputs, 2 classes is fine; 1 output is not
	j.Model = nn.Sequential(nn.Linear(1))
	assert.ErrorContains(t, run(j, tb), "has class 1 but the network has 1 outputs")

	j = base
	j.Train.Loss.Type = "hinge"
	assert.ErrorContains(t, run(j, tb), `unknown loss "hinge"`)
	j = base
	j.Train.Optimizer.Type = "lbfgs"
	assert.ErrorContains(t, run(j, tb), `unknown optimizer "lbfgs"`)
}
