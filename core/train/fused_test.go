package train_test

import (
	"context"
	"math"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
)

// A Keras-style network (Dense(16, relu) → Dense(1, sigmoid)) with
// binary_crossentropy trains fused (the sigmoid's input as logits) and
// saves a package whose forward returns the sigmoid's probabilities.
func TestBinaryCrossentropyOnSigmoid(t *testing.T) {
	csv := mixedCSV(t, 600)
	tb, err := data.ReadCSVFile(csv)
	require.NoError(t, err)
	j := train.Job{
		Model: nn.Sequential(nn.Linear(16), nn.ReLU(), nn.Linear(1), nn.Sigmoid()),
		Data:  data.Options{Target: "kind", Impute: "mean"},
		Split: data.SplitOptions{Val: 0.2, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 15, BatchSize: 32, Seed: 5, Loss: train.Loss{Type: "binary_crossentropy"},
			Optimizer: train.Optimizer{Type: "adam", LR: 0.01}},
	}
	p, err := train.Prepare(j, tb)
	require.NoError(t, err)
	assert.Len(t, p.TrainModel.Layers, 3, "the sigmoid is fused into the loss")
	out := filepath.Join(t.TempDir(), "pkg")
	rep, err := train.Run(context.Background(), j, tb, csv, out, nil)
	require.NoError(t, err)
	assert.Greater(t, rep.Test["accuracy"], 0.85)
	for _, h := range rep.Result.History {
		assert.False(t, math.IsNaN(h.TrainLoss) || math.IsInf(h.TrainLoss, 0))
	}

	m, err := modelpkg.Read(out)
	require.NoError(t, err)
	assert.Equal(t, data.Classification, m.Task)
	assert.Equal(t, []string{"large", "small"}, m.Labels)
	assert.Contains(t, m.Outputs[0].Meaning, "probability")
	assert.Len(t, m.Spec.Layers, 4)

	// The package's outputs are probabilities that classify as the
	// reported accuracy says: > 0.5 is labels[1].
	mod, err := modelpkg.LoadModule(out)
	require.NoError(t, err)
	defer mod.Close()
	pre := m.Preprocessing
	rows := make([]int, tb.Rows())
	for i := range rows {
		rows[i] = i
	}
	x, err := pre.EncodeFeatures(tb, rows)
	require.NoError(t, err)
	y, err := pre.EncodeTarget(tb, rows)
	require.NoError(t, err)
	in, err := core.NewTensor(x, int64(len(rows)), int64(pre.NumInputs()))
	require.NoError(t, err)
	defer in.Close()
	outs, err := mod.Forward(in)
	require.NoError(t, err)
	defer outs[0].Close()
	v, err := core.CopyData[float32](outs[0])
	require.NoError(t, err)
	correct := 0
	for i, pv := range v {
		require.True(t, pv >= 0 && pv <= 1, "output %d is %v, not a probability", i, pv)
		if (pv > 0.5) == (y[i] == 1) {
			correct++
		}
	}
	assert.Greater(t, float64(correct)/float64(len(v)), 0.85)
}

func TestSparseCategoricalCrossentropyOnSoftmax(t *testing.T) {
	tb := loadCSV(t, "digits.csv")
	j := train.Job{
		Model: nn.Sequential(nn.Linear(32), nn.ReLU(), nn.Linear(0), nn.Softmax()),
		Data:  data.Options{Target: "digit"},
		Split: data.SplitOptions{Val: 0.2, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 8, BatchSize: 32, Seed: 1, Loss: train.Loss{Type: "sparse_categorical_crossentropy"},
			Optimizer: train.Optimizer{Type: "adam", LR: 0.01}},
	}
	out := filepath.Join(t.TempDir(), "pkg")
	rep, err := train.Run(context.Background(), j, tb, "digits.csv", out, nil)
	require.NoError(t, err)
	assert.Greater(t, rep.Test["accuracy"], 0.9)
	m, err := modelpkg.Read(out)
	require.NoError(t, err)
	assert.Contains(t, m.Outputs[0].Meaning, "probabilities")
	assert.Equal(t, []int64{-1, 10}, m.Outputs[0].Shape)
}

func TestLossActivationMismatch(t *testing.T) {
	lin := nn.Sequential(nn.Linear(8), nn.ReLU(), nn.Linear(1))
	sig := nn.Sequential(nn.Linear(8), nn.ReLU(), nn.Linear(1), nn.Sigmoid())
	soft := nn.Sequential(nn.Linear(8), nn.ReLU(), nn.Linear(3), nn.Softmax())
	for _, c := range []struct {
		spec nn.Spec
		loss string
		want string
	}{
		{sig, "bce_with_logits", "applied twice"},
		{lin, "binary_crossentropy", "takes the output of a sigmoid"},
		{soft, "cross_entropy", "applied twice"},
		{lin, "categorical_crossentropy", "takes the output of a softmax"},
		{nn.Sequential(nn.Sigmoid()), "binary_crossentropy", "only a sigmoid"},
	} {
		_, err := train.TrainSpec(c.spec, c.loss)
		require.Error(t, err, c.loss)
		assert.Contains(t, err.Error(), c.want)
		assert.Equal(t, core.InvalidArgument, core.CodeOf(err))
	}
	s, err := train.TrainSpec(sig, "binary_crossentropy")
	require.NoError(t, err)
	assert.Len(t, s.Layers, 3)
	s, err = train.TrainSpec(lin, "mse")
	require.NoError(t, err)
	assert.Len(t, s.Layers, 3)
}

// EarlyStopping with restore_best_weights false keeps the last epoch's
// weights; ModelCheckpoint with save_best_only writes a package when the
// monitored metric improves.
func TestModelCheckpointAndNoRestore(t *testing.T) {
	tb := loadCSV(t, "breast_cancer.csv")
	no := false
	ck := filepath.Join(t.TempDir(), "best")
	j := train.Job{
		Model: nn.Sequential(nn.Linear(16), nn.ReLU(), nn.Linear(0)),
		Data:  data.Options{Target: "diagnosis"},
		Split: data.SplitOptions{Val: 0.3, Stratify: true},
		Train: train.Config{Epochs: 12, BatchSize: 16, Seed: 1, Optimizer: train.Optimizer{Type: "adam", LR: 0.01},
			EarlyStopping:   &train.EarlyStopping{Patience: 100, RestoreBestWeights: &no},
			ModelCheckpoint: &train.ModelCheckpoint{Path: ck, SaveBestOnly: true}},
	}
	rep, err := train.Run(context.Background(), j, tb, "breast_cancer.csv", "", nil)
	require.NoError(t, err)
	m, err := modelpkg.Read(ck)
	require.NoError(t, err, "save_best_only wrote the best epoch's package")
	assert.Equal(t, data.Classification, m.Task)
	// The net holds the last epoch's weights: its validation loss is the
	// last epoch's, not (necessarily) the best one.
	last := rep.Result.History[len(rep.Result.History)-1].Val["loss"]
	assert.InDelta(t, last, rep.Val["loss"], 1e-6)

	bad := j
	bad.Train.ModelCheckpoint = &train.ModelCheckpoint{Path: ck, Monitor: "auc"}
	_, err = train.Run(context.Background(), bad, tb, "breast_cancer.csv", "", nil)
	require.ErrorContains(t, err, "unknown metric")
}
