package optimize_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/native"
	nopt "github.com/kilnml/kiln/native/optimize"
)

// calibration returns the first n rows of the training split: raw model
// inputs, as a user would pass them.
func calibration(t *testing.T, sp *optimize.Splits, n int) *data.Dataset {
	t.Helper()
	n = min(n, sp.Train.Len())
	ds, err := data.NewDataset(sp.Train.X[:n*sp.Train.Features], sp.Train.Features, make([]float32, n))
	require.NoError(t, err)
	return ds
}

// forward runs m on ds's rows and returns the flat float32 outputs.
func forward(t *testing.T, m *core.Module, ds *data.Dataset) []float32 {
	t.Helper()
	x, err := core.NewTensor(ds.X, int64(ds.Len()), int64(ds.Features))
	require.NoError(t, err)
	defer x.Close()
	out, err := m.Forward(x)
	require.NoError(t, err)
	defer out[0].Close()
	v, err := core.CopyData[float32](out[0])
	require.NoError(t, err)
	return v
}

// pyForward loads dir's model.pt in Python torch, with the quantized
// engine the manifest records, and returns its outputs on ds's rows.
func pyForward(t *testing.T, dir string, ds *data.Dataset) []float32 {
	t.Helper()
	in := filepath.Join(t.TempDir(), "x.f32")
	b := make([]byte, 4*len(ds.X))
	for i, v := range ds.X {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	require.NoError(t, os.WriteFile(in, b, 0o644))
	code := `import json, sys, numpy as np, torch
d, inp, out, cols = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
eng = json.load(open(d + "/manifest.json"))["optimization"]["engine"]
torch.backends.quantized.engine = eng
m = torch.jit.load(d + "/model.pt")
x = torch.from_numpy(np.fromfile(inp, dtype="<f4").reshape(-1, cols))
with torch.no_grad():
    m(x).numpy().astype("<f4").tofile(out)`
	outp := filepath.Join(t.TempDir(), "y.f32")
	res, err := exec.Command(testkit.Python(t), "-c", code, dir, in, outp, itoa(ds.Features)).CombinedOutput()
	require.NoError(t, err, "%s", res)
	raw, err := os.ReadFile(outp)
	require.NoError(t, err)
	v := make([]float32, len(raw)/4)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return v
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

func maxAbsDiff(t *testing.T, a, b []float32) float64 {
	t.Helper()
	require.Equal(t, len(a), len(b))
	d := 0.0
	for i := range a {
		d = max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

// checkStatic quantizes src statically on engine, checks accuracy within
// two points of fp32, and that the saved package gives the same outputs
// in Kiln (loaded under another process-wide engine) and Python torch.
func checkStatic(t *testing.T, src *optimize.Source, sp *optimize.Splits, engine, weights string) (*optimize.Result, string) {
	t.Helper()
	res, err := optimize.Run(context.Background(), src, sp, optimize.Options{
		Quantize: optimize.Int8, Engine: engine, Calibration: calibration(t, sp, 300), Weights: weights})
	require.NoError(t, err)
	defer res.Module.Close()
	rec := res.Record
	require.NoError(t, rec.Report.WriteText(os.Stderr))
	assert.Equal(t, "static", rec.Method)
	assert.Equal(t, engine, rec.Engine)
	require.NotNil(t, rec.Static)
	assert.Equal(t, 300, rec.Static.CalibrationRows)
	assert.Equal(t, "int8 static ("+engine+")", rec.After.Name)
	before, after := rec.Before, rec.After
	t.Logf("static int8 (%s, %s): %d -> %d bytes (%.2fx), accuracy %.4f -> %.4f, layers int8 %v float %v",
		engine, rec.Static.Weights, before.FileBytes, after.FileBytes, float64(before.FileBytes)/float64(after.FileBytes),
		before.Value, after.Value, rec.Static.Quantized, rec.Static.Float)
	assert.GreaterOrEqual(t, after.Value, before.Value-0.02)

	out := filepath.Join(t.TempDir(), "static-"+engine)
	require.NoError(t, optimize.SavePackage(out, src, sp, res))
	var man struct {
		Optimization struct {
			Method, Engine string
			Static         struct {
				CalibrationRows int `json:"calibration_rows"`
				Activations     []optimize.QParams
			}
		}
	}
	b, err := os.ReadFile(filepath.Join(out, "manifest.json"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &man))
	assert.Equal(t, "static", man.Optimization.Method)
	assert.Equal(t, engine, man.Optimization.Engine)
	assert.Equal(t, 300, man.Optimization.Static.CalibrationRows)
	assert.NotEmpty(t, man.Optimization.Static.Activations)

	// Kiln loads the package under the engine it was quantized for even
	// when the process uses another one, and puts the other one back.
	engines, err := optimize.Engines()
	require.NoError(t, err)
	other := engines[0]
	if other == engine {
		other = engines[len(engines)-1]
	}
	require.NoError(t, nopt.SetQEngine(other))
	m, err := modelpkg.LoadModule(filepath.Join(out, "model.pt"))
	require.NoError(t, err)
	defer m.Close()
	cur, err := nopt.QEngine()
	require.NoError(t, err)
	assert.Equal(t, other, cur)
	acc, err := optimize.Score(m, sp.Test, data.Classification, 10)
	require.NoError(t, err)
	assert.InDelta(t, after.Value, acc["accuracy"], 1e-9)
	kiln := forward(t, m, sp.Test)
	assert.LessOrEqual(t, maxAbsDiff(t, kiln, forward(t, res.Module, sp.Test)), 1e-6)
	assert.LessOrEqual(t, maxAbsDiff(t, kiln, pyForward(t, out, sp.Test)), 1e-6, "Python torch vs Kiln")
	return res, out
}

func TestStaticInt8MLP(t *testing.T) {
	engines, err := optimize.Engines()
	require.NoError(t, err)
	src, sp := open(t)
	for _, e := range engines {
		for _, w := range []string{optimize.PerTensor, optimize.PerChannel} {
			t.Run(e+"/"+w, func(t *testing.T) {
				res, out := checkStatic(t, src, sp, e, w)
				assert.Equal(t, "qint8 symmetric "+w, res.Record.Static.Weights)
				assert.Equal(t, []string{"l0+l1", "l3+l4", "l5"}, res.Record.Static.Quantized)
				assert.Empty(t, res.Record.Static.Float)
				ratio := float64(fileSize(t, filepath.Join(pkgDir, "model.pt"))) / float64(fileSize(t, filepath.Join(out, "model.pt")))
				t.Logf("%s %s: %.2fx smaller on disk", e, w, ratio)
				// Per channel stores 16 more bytes per neuron (394 here).
				want := 3.5
				if w == optimize.PerChannel {
					want = 3.1
				}
				assert.GreaterOrEqual(t, ratio, want)
			})
		}
	}
}

var (
	cnnOnce sync.Once
	cnnDir  string
	cnnErr  error
)

// cnnPackage trains (once) a small CNN on the digits as 1×8×8 images:
// two convolutions, the second followed by batchnorm, so that static int8
// runs conv+relu fused, conv+batchnorm+relu folded and fused, max pooling
// and flatten on int8 tensors.
func cnnPackage(t *testing.T) string {
	t.Helper()
	cnnOnce.Do(func() {
		cnnDir = filepath.Join(dataDir, "digits-cnn")
		job := train.Job{
			Model: nn.Sequential(
				nn.Layer{Type: "conv2d", Out: 8, Kernel: 3, Padding: 1}, nn.ReLU(), nn.MaxPool2d(2),
				nn.Layer{Type: "conv2d", Out: 16, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(),
				nn.Flatten(), nn.Linear(0)).WithInputShape(1, 8, 8),
			Data:  data.Options{Target: "digit", Task: data.Classification},
			Split: data.SplitOptions{Val: 0.15, Test: 0.2, Stratify: true},
			Train: train.Config{Epochs: 15, BatchSize: 32, Seed: 1,
				Optimizer: train.Optimizer{Type: "adam", LR: 3e-3}},
		}
		tb, err := data.ReadCSVFile(filepath.Join(dataDir, "digits.csv"))
		if err != nil {
			cnnErr = err
			return
		}
		_, cnnErr = train.Run(context.Background(), job, tb, "digits.csv", cnnDir, nil)
	})
	require.NoError(t, cnnErr)
	return cnnDir
}

func TestStaticInt8Conv(t *testing.T) {
	dir := cnnPackage(t)
	src, err := optimize.Open(dir)
	require.NoError(t, err)
	defer src.Close()
	tb, err := data.ReadCSVFile(filepath.Join(dataDir, "digits.csv"))
	require.NoError(t, err)
	sp, err := src.Splits(tb, nil)
	require.NoError(t, err)
	engines, err := optimize.Engines()
	require.NoError(t, err)
	for _, e := range engines {
		t.Run(e, func(t *testing.T) {
			res, _ := checkStatic(t, src, sp, e, "")
			st := res.Record.Static
			// The batchnorm folds into the second conv, whose ReLU fuses.
			assert.Equal(t, []string{"l0+l1", "l2", "l3+l4+l5", "l6", "l7"}, st.Quantized)
			assert.Empty(t, st.Float)
			assert.GreaterOrEqual(t, res.Record.Before.Value, 0.9)
		})
	}
}

func TestStaticInt8Errors(t *testing.T) {
	src, sp := open(t)
	run := func(o optimize.Options) error {
		res, err := optimize.Run(context.Background(), src, sp, o)
		if err == nil {
			res.Module.Close()
		}
		return err
	}
	cal := calibration(t, sp, 50)
	// Empty, wrong width.
	assert.ErrorContains(t, run(optimize.Options{Quantize: optimize.Int8, Calibration: &data.Dataset{Features: 64}}),
		"the calibration set is empty")
	narrow, err := data.NewDataset(make([]float32, 10*5), 5, make([]float32, 10))
	require.NoError(t, err)
	assert.ErrorContains(t, run(optimize.Options{Quantize: optimize.Int8, Calibration: narrow}),
		"the calibration set has 5 columns per row, the model takes 64 input columns")
	// Missing columns and no rows, from a table.
	tb, err := data.NewTable([]string{"p0", "p1"}, []float64{1, 2, 3, 4})
	require.NoError(t, err)
	_, err = src.Calibration(tb)
	assert.ErrorContains(t, err, `calibration data: kiln: column "p2" not found`)
	empty, err := data.NewTable([]string{"p0"}, nil)
	require.NoError(t, err)
	_, err = src.Calibration(empty)
	assert.ErrorContains(t, err, "the calibration data is empty")
	// An engine this libtorch lacks; calibration for another mode.
	assert.ErrorContains(t, run(optimize.Options{Quantize: optimize.Int8, Engine: "no-such-engine", Calibration: cal}),
		`quantized engine "no-such-engine" is not supported by this libtorch (it supports:`)
	assert.ErrorContains(t, run(optimize.Options{Quantize: optimize.FP16, Calibration: cal}),
		"calibration data is for static int8")
	assert.ErrorContains(t, run(optimize.Options{Quantize: optimize.Int8, Calibration: cal, Weights: "per-row"}),
		`unknown weight scheme "per-row"`)
	// Nothing to quantize.
	spec := nn.Sequential(nn.Flatten(), nn.Softmax())
	net, err := nn.Build(spec, 64, 1)
	require.NoError(t, err)
	defer net.Close()
	bare := &optimize.Source{Net: net, Manifest: modelpkg.Manifest{Spec: spec}, Prelude: nn.Prelude{Inputs: 64, Features: 64}}
	_, _, err = optimize.QuantizeStatic(bare, net, spec, "qnnpack", cal, "")
	assert.ErrorContains(t, err, "nothing to quantize to static int8: the network has no linear or conv layers (it has flatten, softmax)")

	// A package recording an engine this libtorch lacks does not load.
	dir := t.TempDir()
	b, err := os.ReadFile(filepath.Join(pkgDir, "model.pt"))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "model.pt"), b, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "manifest.json"),
		[]byte(`{"model": "model.pt", "optimization": {"engine": "no-such-engine"}}`), 0o644))
	_, err = modelpkg.LoadModule(filepath.Join(dir, "model.pt"))
	assert.ErrorContains(t, err, `(int8 for the no-such-engine engine): quantized engine "no-such-engine" is not supported by this libtorch`)
}

// TestAddPackedInt8 checks that the native packing of int8 layers names
// what is wrong with a layer it cannot pack, and packs good linear and
// conv layers, returning the weight's element count.
func TestAddPackedInt8(t *testing.T) {
	engine, err := optimize.ChooseEngine("")
	require.NoError(t, err)
	net, err := nn.Build(nn.Sequential(nn.Linear(4)), 3, 1)
	require.NoError(t, err)
	defer net.Close()
	h := net.Handle()
	zeros := func(shape ...int64) native.Tensor {
		x, err := core.Zeros(core.Float32, shape...)
		require.NoError(t, err)
		t.Cleanup(func() { x.Close() })
		return x.Handle()
	}
	w2, w3, bias, wide := zeros(4, 3), zeros(4, 3, 2), zeros(4), zeros(5)
	none := native.Tensor{}
	require.NoError(t, nopt.WithQEngine(engine, func() error {
		_, err := nopt.AddPackedInt8(h, "p", "conv3d", w2, none, true, 1, 0)
		assert.EqualError(t, err, `int8 layer p: unknown kind "conv3d" (want linear, conv1d or conv2d)`)
		_, err = nopt.AddPackedInt8(h, "p", "conv1d", w2, none, true, 1, 0)
		assert.EqualError(t, err, "int8 conv1d p: weight has shape [4, 3], want 3 dimensions")
		_, err = nopt.AddPackedInt8(h, "p", "conv1d", w3, none, true, 0, 0)
		assert.EqualError(t, err, "int8 conv1d p: stride 0, padding 0")
		_, err = nopt.AddPackedInt8(h, "p", "linear", w2, wide, false, 1, 0)
		assert.EqualError(t, err, "int8 linear p: bias has shape [5], want [4]")

		n, err := nopt.AddPackedInt8(h, "lin_packed", "linear", w2, bias, true, 1, 0)
		require.NoError(t, err)
		assert.Equal(t, int64(12), n)
		n, err = nopt.AddPackedInt8(h, "conv_packed", "conv1d", w3, none, false, 1, 1)
		require.NoError(t, err)
		assert.Equal(t, int64(24), n)
		return nil
	}))
}
