package train_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
)

// The checks of issue 3 on scikit-learn's bundled data: test-set accuracy
// of an MLP on breast-cancer and on digits, and of a small CNN on digits.

func runJob(t *testing.T, j train.Job, csv string) *train.Report {
	t.Helper()
	rep, err := train.Run(context.Background(), j, loadCSV(t, csv), csv, "", nil)
	require.NoError(t, err)
	t.Logf("%s: best epoch %d of %d (%s), val %v, test %v, %.0f samples/s",
		csv, rep.Result.BestEpoch, len(rep.Result.History), rep.Result.StopReason, rep.Val, rep.Test, rep.Result.SamplesPerSec)
	return rep
}

func TestBreastCancerMLP(t *testing.T) {
	j := train.Job{
		Model: nn.Sequential(nn.Linear(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16), nn.ReLU(), nn.Linear(0)),
		Data:  data.Options{Target: "diagnosis"},
		Split: data.SplitOptions{Val: 0.15, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 60, BatchSize: 32, Seed: 1,
			Optimizer:     train.Optimizer{Type: "adam", LR: 1e-3, WeightDecay: 1e-4},
			EarlyStopping: &train.EarlyStopping{Patience: 10, Metric: "loss"}},
	}
	rep := runJob(t, j, "breast_cancer.csv")
	assert.GreaterOrEqual(t, rep.Test["accuracy"], 0.95)
}

func TestDigitsMLP(t *testing.T) {
	j := train.Job{
		Model: nn.Sequential(nn.Linear(128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(0)),
		Data:  data.Options{Target: "digit", Task: data.Classification},
		Split: data.SplitOptions{Val: 0.15, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 40, BatchSize: 32, Seed: 1,
			Optimizer:     train.Optimizer{Type: "adam", LR: 1e-3},
			Schedule:      train.Schedule{Type: "cosine", WarmupEpochs: 1},
			EarlyStopping: &train.EarlyStopping{Patience: 8, Metric: "accuracy"}},
	}
	rep := runJob(t, j, "digits.csv")
	assert.GreaterOrEqual(t, rep.Test["accuracy"], 0.95)
}

func TestDigitsCNN(t *testing.T) {
	j := train.Job{
		Model: nn.Sequential(
			nn.Layer{Type: "conv2d", Out: 16, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(),
			nn.Layer{Type: "conv2d", Out: 32, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
			nn.Flatten(), nn.Dropout(0.25), nn.Linear(0),
		).WithInputShape(1, 8, 8),
		Data:  data.Options{Target: "digit", Task: data.Classification, Scale: "minmax"},
		Split: data.SplitOptions{Val: 0.15, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 25, BatchSize: 64, Seed: 1,
			Optimizer:     train.Optimizer{Type: "adamw", LR: 3e-3},
			Schedule:      train.Schedule{Type: "cosine"},
			EarlyStopping: &train.EarlyStopping{Patience: 8, Metric: "accuracy"}},
	}
	rep := runJob(t, j, "digits.csv")
	assert.GreaterOrEqual(t, rep.Test["accuracy"], 0.97)
}

// TestChannelsLastTrainsTheSameNetwork: a CPU epoch of a convolutional
// network runs in channels-last memory by default (Config.MemoryFormat;
// native/trainer: ChannelsLastScope);
// the weights it learns are those of the standard layout, up to the
// summation order of the convolutions, and the model it saves predicts the
// same.
func TestChannelsLastTrainsTheSameNetwork(t *testing.T) {
	ds := loadCSV(t, "digits.csv")
	spec := nn.Sequential(
		nn.Layer{Type: "conv2d", Out: 8, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
		nn.Flatten(), nn.Linear(0),
	).WithInputShape(1, 8, 8)
	j := train.Job{
		Model: spec,
		Data:  data.Options{Target: "digit", Task: data.Classification, Scale: "minmax"},
		Split: data.SplitOptions{Val: 0.15, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 2, BatchSize: 64, Seed: 3, Optimizer: train.Optimizer{Type: "adamw", LR: 3e-3}},
	}
	run := func(format string) *train.Report {
		j.Train.MemoryFormat = format
		rep, err := train.Run(context.Background(), j, ds, "digits.csv", "", nil)
		require.NoError(t, err)
		return rep
	}
	std, cl := run("contiguous_format"), run("channels_last")
	t.Logf("train loss per epoch: standard %v, channels-last %v", []float64{std.Result.History[0].TrainLoss, std.Result.History[1].TrainLoss}, []float64{cl.Result.History[0].TrainLoss, cl.Result.History[1].TrainLoss})
	require.Len(t, cl.Result.History, len(std.Result.History))
	for i := range std.Result.History {
		assert.InDelta(t, std.Result.History[i].TrainLoss, cl.Result.History[i].TrainLoss, 1e-3*std.Result.History[i].TrainLoss, "epoch %d", i+1)
	}
	assert.InDelta(t, std.Test["accuracy"], cl.Test["accuracy"], 0.01)
}

func TestMemoryFormatIsChecked(t *testing.T) {
	err := train.Config{Epochs: 1, BatchSize: 8, Optimizer: train.Optimizer{Type: "sgd", LR: 0.1}, Loss: train.Loss{Type: "mse"},
		MemoryFormat: "nhwc"}.Validate()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "memory_format")

	j, err := train.ParseJob([]byte("model: {layers: [{type: linear, out: 1}]}\ntrain: {memory_format: contiguous_format}\n"))
	require.NoError(t, err)
	assert.Equal(t, "contiguous_format", j.Train.MemoryFormat)
}
