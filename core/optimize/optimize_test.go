package optimize_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
)

var dataDir, pkgDir string

// TestMain exports the data sets and trains the digits MLP once into a
// package the tests optimize.
func TestMain(m *testing.M) { testkit.MainWithFixture(m, "datasets", &dataDir, trainDigits) }

func trainDigits() error {
	pkgDir = filepath.Join(dataDir, "digits-mlp")
	tb, err := data.ReadCSVFile(filepath.Join(dataDir, "digits.csv"))
	if err == nil {
		_, err = train.Run(context.Background(), digitsJob(), tb, "digits.csv", pkgDir, nil)
	}
	if err != nil {
		return fmt.Errorf("training the digits MLP: %w", err)
	}
	return nil
}

// digitsJob is core/train's digits MLP check, wider so that pruning has
// neurons to remove.
func digitsJob() train.Job {
	return train.Job{
		Model: nn.Sequential(nn.Linear(256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128), nn.ReLU(), nn.Linear(0)),
		Data:  data.Options{Target: "digit", Task: data.Classification},
		Split: data.SplitOptions{Val: 0.15, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 40, BatchSize: 32, Seed: 1,
			Optimizer:     train.Optimizer{Type: "adam", LR: 1e-3},
			Schedule:      train.Schedule{Type: "cosine", WarmupEpochs: 1},
			EarlyStopping: &train.EarlyStopping{Patience: 8, Metric: "accuracy"}},
	}
}

func open(t *testing.T) (*optimize.Source, *optimize.Splits) {
	t.Helper()
	src, err := optimize.Open(pkgDir)
	require.NoError(t, err)
	t.Cleanup(func() { src.Close() })
	tb, err := data.ReadCSVFile(filepath.Join(dataDir, "digits.csv"))
	require.NoError(t, err)
	sp, err := src.Splits(tb, nil)
	require.NoError(t, err)
	return src, sp
}

func fileSize(t *testing.T, p string) int64 {
	st, err := os.Stat(p)
	require.NoError(t, err)
	return st.Size()
}

// pyCheck loads a package's model.pt in Python torch and prints its
// test-set predictions' agreement with Kiln's (run by the caller).
func pyLoad(t *testing.T, dir string) string {
	t.Helper()
	code := `import sys, torch
m = torch.jit.load(sys.argv[1])
m.eval()
x = torch.zeros(3, 64)
print(tuple(m(x).shape))`
	out, err := exec.Command(testkit.Python(t), "-c", code, filepath.Join(dir, "model.pt")).CombinedOutput()
	require.NoError(t, err, "%s", out)
	return strings.TrimSpace(string(out))
}

func TestDynamicInt8(t *testing.T) {
	src, sp := open(t)
	res, err := optimize.Run(context.Background(), src, sp, optimize.Options{Quantize: optimize.Int8})
	require.NoError(t, err)
	defer res.Module.Close()
	out := filepath.Join(t.TempDir(), "int8")
	require.NoError(t, optimize.SavePackage(out, src, sp, res))
	require.NoError(t, res.Record.Report.WriteText(os.Stderr))
	before, after := res.Record.Before, res.Record.After
	ratio := float64(fileSize(t, filepath.Join(pkgDir, "model.pt"))) / float64(fileSize(t, filepath.Join(out, "model.pt")))
	t.Logf("int8 (%s): %.2fx smaller on disk, accuracy %.4f -> %.4f", res.Record.Engine, ratio, before.Value, after.Value)
	assert.GreaterOrEqual(t, ratio, 3.5)
	assert.GreaterOrEqual(t, before.Value, 0.95)
	assert.GreaterOrEqual(t, after.Value, before.Value-0.01)

	// The package serves in Kiln and loads in Python torch.
	m, err := modelpkg.LoadModule(filepath.Join(out, "model.pt"))
	require.NoError(t, err)
	defer m.Close()
	acc, err := optimize.Score(m, sp.Test, data.Classification, 10)
	require.NoError(t, err)
	assert.InDelta(t, after.Value, acc["accuracy"], 1e-9)
	assert.Equal(t, "(3, 10)", pyLoad(t, out))
}

func TestStructuredPruneFineTune(t *testing.T) {
	src, sp := open(t)
	res, err := optimize.Run(context.Background(), src, sp, optimize.Options{Prune: 0.5, Structured: true, FineTuneEpochs: 10})
	require.NoError(t, err)
	defer res.Module.Close()
	require.NoError(t, res.Record.Report.WriteText(os.Stderr))
	before, after := res.Record.Before, res.Record.After
	// Hidden widths 256 and 128 halve: 64*128+128 + 128*64+64 + 64*10+10.
	assert.Equal(t, int64(64*128+128+128*64+64+64*10+10), after.Params)
	assert.Equal(t, []int64{128, 64, 10}, []int64{res.Spec.Layers[0].Out, res.Spec.Layers[3].Out, res.Spec.Layers[5].Out})
	assert.GreaterOrEqual(t, after.Value, before.Value-0.02)
	t.Logf("structured 50%%: params %d -> %d, accuracy %.4f -> %.4f, b64 %.3f -> %.3f ms",
		before.Params, after.Params, before.Value, after.Value, before.LatencyB64, after.LatencyB64)
	out := filepath.Join(t.TempDir(), "pruned")
	require.NoError(t, optimize.SavePackage(out, src, sp, res))
	assert.Equal(t, "(3, 10)", pyLoad(t, out))
}

// A digits CNN loses half its conv channels and hidden neurons, becomes a
// smaller dense network and fine-tunes back.
func TestStructuredPruneCNN(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "digits-cnn")
	tb, err := data.ReadCSVFile(filepath.Join(dataDir, "digits.csv"))
	require.NoError(t, err)
	job := digitsJob()
	job.Model = nn.Sequential(
		nn.Layer{Type: "conv2d", Out: 16, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
		nn.Conv2d(32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64), nn.ReLU(), nn.Linear(0),
	).WithInputShape(1, 8, 8)
	job.Train.Epochs = 12
	_, err = train.Run(context.Background(), job, tb, "digits.csv", dir, nil)
	require.NoError(t, err)
	src, err := optimize.Open(dir)
	require.NoError(t, err)
	defer src.Close()
	sp, err := src.Splits(tb, nil)
	require.NoError(t, err)
	res, err := optimize.Run(context.Background(), src, sp, optimize.Options{Prune: 0.5, Structured: true, Norm: optimize.L1, FineTuneEpochs: 8})
	require.NoError(t, err)
	defer res.Module.Close()
	require.NoError(t, res.Record.Report.WriteText(os.Stderr))
	before, after := res.Record.Before, res.Record.After
	assert.Equal(t, []int64{8, 16, 32}, []int64{res.Spec.Layers[0].Out, res.Spec.Layers[4].Out, res.Spec.Layers[7].Out})
	// conv 1→8, bn 8, conv 8→16, linear 16·2·2→32, linear 32→10.
	assert.Equal(t, int64(8*9+8+2*8+16*8*9+16+64*32+32+32*10+10), after.Params)
	assert.Less(t, after.FileBytes, before.FileBytes)
	assert.GreaterOrEqual(t, before.Value, 0.9)
	assert.GreaterOrEqual(t, after.Value, before.Value-0.03)
	out := filepath.Join(t.TempDir(), "pruned")
	require.NoError(t, optimize.SavePackage(out, src, sp, res))
	assert.Equal(t, "(3, 10)", pyLoad(t, out))
}

func TestUnstructuredPrune(t *testing.T) {
	for _, global := range []bool{false, true} {
		src, _ := open(t)
		s, err := optimize.PruneUnstructured(src.Net, 0.7, global)
		require.NoError(t, err)
		assert.InDelta(t, 0.7, s, 0.001, "global=%v", global)
		z, n, err := optimize.Sparsity(src.Net, src.Manifest.Spec)
		require.NoError(t, err)
		assert.InDelta(t, 0.7, float64(z)/float64(n), 0.001)
	}
}

func TestHalfPrecision(t *testing.T) {
	src, sp := open(t)
	for _, mode := range []string{optimize.FP16, optimize.BF16} {
		res, err := optimize.Run(context.Background(), src, sp, optimize.Options{Quantize: mode})
		require.NoError(t, err)
		res.Module.Close()
		b, a := res.Record.Before, res.Record.After
		t.Logf("%s: %d -> %d bytes, accuracy %.4f -> %.4f", mode, b.FileBytes, a.FileBytes, b.Value, a.Value)
		assert.Less(t, float64(a.FileBytes), 0.6*float64(b.FileBytes))
		assert.GreaterOrEqual(t, a.Value, b.Value-0.01)
	}
}

func TestErrors(t *testing.T) {
	src, sp := open(t)
	for _, s := range []float64{-0.1, 1, 1.5} {
		_, err := optimize.Run(context.Background(), src, sp, optimize.Options{Prune: s})
		require.Error(t, err)
		assert.Contains(t, err.Error(), "outside [0, 1)")
		_, err = optimize.PruneUnstructured(src.Net, s, false)
		assert.ErrorContains(t, err, "outside [0, 1)")
	}
	_, err := optimize.Run(context.Background(), src, sp, optimize.Options{Quantize: optimize.Int8, Engine: "fbgemm-nonexistent"})
	assert.ErrorContains(t, err, `quantized engine "fbgemm-nonexistent" is not supported by this libtorch (it supports:`)
	_, err = optimize.Run(context.Background(), src, sp, optimize.Options{Quantize: "int4"})
	assert.ErrorContains(t, err, `unknown quantization "int4"`)

	// A network without linear layers has nothing to quantize to int8.
	spec := nn.Sequential(nn.Layer{Type: "conv2d", Out: 10, Kernel: 8}, nn.Flatten()).WithInputShape(1, 8, 8)
	net, err := nn.Build(spec, 64, 1)
	require.NoError(t, err)
	defer net.Close()
	noLin := &optimize.Source{Net: net, Manifest: modelpkg.Manifest{Spec: spec}, Prelude: nn.Prelude{Inputs: 64, Features: 64}}
	_, _, err = optimize.Quantize(noLin, net, spec, optimize.Int8, "")
	assert.ErrorContains(t, err, "nothing to quantize to int8: the network has no linear layers (it has conv2d, flatten)")
	_, _, err = optimize.PruneStructured(noLin, net, spec, 0.5, optimize.L2)
	assert.ErrorContains(t, err, "structured pruning needs a linear layer feeding another")

	// Nothing to prune: no linear or conv layer.
	act := nn.Sequential(nn.ReLU())
	anet, err := nn.Build(act, 64, 1)
	require.NoError(t, err)
	defer anet.Close()
	_, err = optimize.PruneUnstructured(anet, 0.5, false)
	assert.ErrorContains(t, err, "the network has no linear or conv layers to prune")
	_, err = optimize.PruneUnstructured(anet, 0.5, true)
	assert.ErrorContains(t, err, "the network has no linear or conv layers to prune")
	_, _, err = optimize.PruneStructured(&optimize.Source{Net: anet, Manifest: modelpkg.Manifest{Spec: act}, Prelude: nn.Prelude{Inputs: 64, Features: 64}}, anet, act, 0.5, optimize.L2)
	assert.ErrorContains(t, err, "structured pruning needs a linear layer feeding another")
	_, _, err = optimize.PruneStructured(noLin, net, spec, 1, optimize.L2)
	assert.ErrorContains(t, err, "outside [0, 1)")

	// Layernorm between two linear layers refuses structured pruning.
	ln := nn.Sequential(nn.Linear(32), nn.LayerNorm(), nn.ReLU(), nn.Linear(10))
	lnet, err := nn.Build(ln, 64, 1)
	require.NoError(t, err)
	defer lnet.Close()
	_, _, err = optimize.PruneStructured(&optimize.Source{Net: lnet, Manifest: modelpkg.Manifest{Spec: ln}, Prelude: nn.Prelude{Inputs: 64, Features: 64}}, lnet, ln, 0.5, optimize.L2)
	assert.ErrorContains(t, err, "layernorm l1 after it normalizes over all its outputs")

	// Data that is not the training data.
	tb, err := data.ReadCSVFile(filepath.Join(dataDir, "breast_cancer.csv"))
	require.NoError(t, err)
	_, err = src.Splits(tb, nil)
	assert.ErrorContains(t, err, "is not the data the model was trained on")
}
