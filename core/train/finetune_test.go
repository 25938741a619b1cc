package train_test

import (
	"context"
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

func digitsJob() train.Job {
	return train.Job{
		Model: nn.Sequential(nn.Linear(16).Named("a"), nn.ReLU(), nn.Linear(10).Named("b")),
		Data:  data.Options{Target: "digit", Scale: "minmax"},
		Split: data.SplitOptions{Val: 0.2, Stratify: true},
		Train: train.Config{Epochs: 2, BatchSize: 32, Seed: 1, Optimizer: train.Optimizer{Type: "adam", LR: 1e-3}},
	}
}

// Freezing by prefix leaves those parameters bit-identical while the
// others train, with their own learning rate for a parameter group.
func TestFitFreezesByPrefix(t *testing.T) {
	job := digitsJob()
	p, err := train.Prepare(job, loadCSV(t, "digits.csv"))
	require.NoError(t, err)
	net, err := nn.Build(p.Job.Model, 64, 1) // no prelude: the state is a_weight, a_bias, b_weight, b_bias
	require.NoError(t, err)
	defer net.Close()
	before, err := net.State()
	require.NoError(t, err)
	cfg := p.Job.Train
	cfg.Freeze = []string{"a_"}
	cfg.ParamGroups = []train.ParamGroup{{Prefix: "b_w", LR: 1e-2}}
	res, err := train.Fit(context.Background(), net, p.Train, p.Val, cfg, nil)
	require.NoError(t, err)
	assert.Less(t, res.History[1].TrainLoss, res.History[0].TrainLoss)
	after, err := net.State()
	require.NoError(t, err)
	na := 16*64 + 16
	assert.Equal(t, before[:na], after[:na], "frozen a_* bit-identical")
	changed := 0
	for i := na; i < len(before); i++ {
		if before[i] != after[i] {
			changed++
		}
	}
	assert.Greater(t, changed, (len(before)-na)/2, "b_* trained")

	for _, c := range []struct {
		cfg  func(*train.Config)
		want string
	}{
		{func(c *train.Config) { c.Freeze = []string{"zz"} }, `freeze prefix "zz" matches no parameter`},
		{func(c *train.Config) { c.Freeze = []string{"a_", "b_"} }, "every parameter is frozen"},
		{func(c *train.Config) {
			c.Freeze = []string{"a_"}
			c.ParamGroups = []train.ParamGroup{{Prefix: "a_", LR: 1}}
		}, `parameter group "a_" matches no trainable parameter`},
		{func(c *train.Config) { c.ParamGroups = []train.ParamGroup{{Prefix: "b_", LR: -1}} }, "lr must be > 0"},
		{func(c *train.Config) { c.FreezeBN = true }, "freeze_bn needs freeze prefixes"},
	} {
		cfg := p.Job.Train
		c.cfg(&cfg)
		_, err := train.Fit(context.Background(), net, p.Train, p.Val, cfg, nil)
		require.Error(t, err, c.want)
		assert.Contains(t, err.Error(), c.want)
	}
}

// A job with init fine-tunes a TorchScript model (here a Kiln package:
// any module works) and saves it back as a package.
func TestRunInitFineTunes(t *testing.T) {
	tb := loadCSV(t, "digits.csv")
	first := filepath.Join(t.TempDir(), "first")
	_, err := train.Run(context.Background(), digitsJob(), tb, "digits.csv", first, nil)
	require.NoError(t, err)
	job := digitsJob()
	job.Model = nn.Spec{}
	job.Data.Scale = ""
	job.Init = &train.InitModel{Path: first}
	job.Train.Freeze = []string{"a_"}
	out := filepath.Join(t.TempDir(), "tuned")
	rep, err := train.Run(context.Background(), job, tb, "digits.csv", out, nil)
	require.NoError(t, err)
	assert.Greater(t, rep.Val["accuracy"], 0.5)
	m, err := modelpkg.Read(out)
	require.NoError(t, err)
	assert.Equal(t, []int64{-1, 64}, m.Inputs[0].Shape)
	assert.Equal(t, []int64{-1, 10}, m.Outputs[0].Shape)
	hp, err := train.Hyperparameters(&m)
	require.NoError(t, err)
	assert.Equal(t, []string{"a_"}, hp.Freeze)
	a, err := core.LoadModule(filepath.Join(first, "model.pt"))
	require.NoError(t, err)
	defer a.Close()
	b, err := core.LoadModule(filepath.Join(out, "model.pt"))
	require.NoError(t, err)
	defer b.Close()
	assert.Equal(t, a.NumParameters(), b.NumParameters())

	bad := job
	bad.Data.Scale = "standard"
	_, err = train.Run(context.Background(), bad, tb, "digits.csv", "", nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "data.scale must be none")
	bad = job
	bad.Init = &train.InitModel{Path: first, InputShape: []int64{1, 8, 9}}
	_, err = train.Run(context.Background(), bad, tb, "digits.csv", "", nil)
	require.Error(t, err)
	assert.True(t, core.HasCode(err, core.InvalidArgument), err)
}
