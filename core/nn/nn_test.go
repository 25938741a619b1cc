package nn_test

import (
	"math"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/nn"
)

func forward(t *testing.T, net *nn.Net, x []float32, shape ...int64) *core.Tensor {
	t.Helper()
	in, err := core.NewTensor(x, shape...)
	require.NoError(t, err)
	defer in.Close()
	outs, err := net.Forward(in)
	require.NoError(t, err)
	require.Len(t, outs, 1)
	return outs[0]
}

func TestEveryLayerBuildsAndRuns(t *testing.T) {
	cnn := nn.Sequential(
		nn.Conv2d(4, 3).Named("c1"), nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
		nn.Conv2d(4, 1), nn.AvgPool2d(1), nn.GELU(), nn.Flatten(), nn.Dropout(0.2),
		nn.Linear(6), nn.LayerNorm(), nn.Tanh(), nn.Linear(5), nn.BatchNorm1d(), nn.Sigmoid(),
		nn.Linear(3), nn.Softmax(),
	).WithInputShape(1, 8, 8)
	net, err := nn.Build(cnn, 64, 1)
	require.NoError(t, err)
	defer net.Close()
	assert.Equal(t, []int64{4, 3, 3}, net.Layers[3].Out)
	assert.Equal(t, []int64{3}, net.Outputs)
	count := int64(0)
	for _, l := range net.Layers {
		count += l.Params
	}
	assert.Equal(t, count, net.Params)
	assert.Equal(t, net.Params, net.NumParameters(), "inferred count matches libtorch's")
	require.NoError(t, net.SetTraining(false))
	x := make([]float32, 2*64)
	for i := range x {
		x[i] = float32(i%7) / 7
	}
	y := forward(t, net, x, 2, 64)
	defer y.Close()
	assert.Equal(t, []int64{2, 3}, y.Shape())
	v, _ := core.Data[float32](y)
	assert.InDelta(t, 1.0, v[0]+v[1]+v[2], 1e-5, "softmax rows sum to 1")

	seq := nn.Sequential(nn.Conv1d(3, 2), nn.MaxPool1d(2), nn.AvgPool1d(1), nn.BatchNorm1d(), nn.Flatten(), nn.Linear(2)).WithInputShape(2, 5)
	n1, err := nn.Build(seq, 10, 1)
	require.NoError(t, err)
	defer n1.Close()
	y1 := forward(t, n1, make([]float32, 30), 3, 10)
	defer y1.Close()
	assert.Equal(t, []int64{3, 2}, y1.Shape())

	emb := nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(1))
	n2, err := nn.Build(emb, 3, 1)
	require.NoError(t, err)
	defer n2.Close()
	y2 := forward(t, n2, []float32{1, 2, 9, 0, 0, 3}, 2, 3)
	defer y2.Close()
	assert.Equal(t, []int64{2, 1}, y2.Shape())
}

func TestInitLikePyTorch(t *testing.T) {
	net, err := nn.Build(nn.Sequential(nn.Linear(200).Named("fc")), 400, 7)
	require.NoError(t, err)
	defer net.Close()
	// An identity-sized probe: forward of unit vectors reads W columns.
	require.NoError(t, net.SetTraining(false))
	x := make([]float32, 400)
	y := forward(t, net, x, 1, 400) // zeros in: the bias
	defer y.Close()
	b, _ := core.Data[float32](y)
	bound := 1 / math.Sqrt(400)
	lo, hi := 0.0, 0.0
	for _, v := range b {
		lo, hi = math.Min(lo, float64(v)), math.Max(hi, float64(v))
	}
	assert.GreaterOrEqual(t, lo, -bound)
	assert.LessOrEqual(t, hi, bound)
	assert.Less(t, lo, -0.8*bound, "bias spans its range")
	assert.Greater(t, hi, 0.8*bound)

	// Same seed, same weights; another seed, other weights.
	again, err := nn.Build(nn.Sequential(nn.Linear(200).Named("fc")), 400, 7)
	require.NoError(t, err)
	defer again.Close()
	other, err := nn.Build(nn.Sequential(nn.Linear(200).Named("fc")), 400, 8)
	require.NoError(t, err)
	defer other.Close()
	require.NoError(t, again.SetTraining(false))
	require.NoError(t, other.SetTraining(false))
	ya := forward(t, again, x, 1, 400)
	defer ya.Close()
	yo := forward(t, other, x, 1, 400)
	defer yo.Close()
	va, _ := core.Data[float32](ya)
	vo, _ := core.Data[float32](yo)
	assert.Equal(t, b, va)
	assert.NotEqual(t, b, vo)
}

func TestSpecErrorsNameTheLayer(t *testing.T) {
	cases := []struct {
		spec nn.Spec
		feat int64
		want string
	}{
		{nn.Sequential(nn.Linear(4), nn.Layer{Type: "Convolution3d"}), 8, `layer 1 (Convolution3d "l1"): unknown layer type "Convolution3d"`},
		{nn.Sequential(nn.Linear(16).Named("fc1"), nn.Layer{Type: "linear", Name: "fc2", In: 32, Out: 2}), 8, `layer 1 (linear "fc2"): in=32 but its input has 16 features`},
		{nn.Sequential(nn.Conv2d(4, 3)), 64, `layer 0 (conv2d "l0"): needs [channels, height, width] samples, got shape [64]`},
		{nn.Sequential(nn.Conv2d(4, 9)).WithInputShape(1, 8, 8), 64, `layer 0 (conv2d "l0"): output shape [4 0 0] is empty`},
		{nn.Sequential(nn.Linear(4)).WithInputShape(1, 8, 9), 64, `input_shape [1 8 9] holds 72 values but samples have 64 features`},
		{nn.Sequential(nn.Dropout(1.5)), 8, `layer 0 (dropout "l0"): p must be in [0, 1)`},
		{nn.Sequential(nn.Linear(4).Named("a"), nn.Linear(4).Named("a")), 8, `layer 1 (linear "a"): name already used by layer 0`},
		{nn.Sequential(nn.Linear(4).Named("bad name")), 8, `must be an identifier`},
		{nn.Sequential(), 8, `no layers`},
	}
	for _, c := range cases {
		_, err := nn.Build(c.spec, c.feat, 1)
		require.Error(t, err, c.want)
		assert.Contains(t, err.Error(), c.want)
	}
}

func TestParseSpecJSONAndYAML(t *testing.T) {
	y := `
name: mlp
layers:
  - {type: Linear, out: 16, name: fc1}
  - type: relu
  - {type: dropout, p: 0.1}
  - {type: linear, out: 3}
`
	j := `{"name":"mlp","layers":[{"type":"Linear","out":16,"name":"fc1"},{"type":"relu"},{"type":"dropout","p":0.1},{"type":"linear","out":3}]}`
	sy, err := nn.ParseSpec([]byte(y))
	require.NoError(t, err)
	sj, err := nn.ParseSpec([]byte(j))
	require.NoError(t, err)
	assert.Equal(t, sj, sy)
	assert.Len(t, sy.Layers, 4)
	assert.Equal(t, 0.1, sy.Layers[2].P)

	_, err = nn.ParseSpec([]byte("layers:\n  - {type: linear, outt: 3}\n"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), `unknown field "outt"`)
}

func TestSavedNetLoadsBack(t *testing.T) {
	net, err := nn.Build(nn.Sequential(nn.Linear(5), nn.BatchNorm1d(), nn.ReLU(), nn.Linear(2)), 3, 3)
	require.NoError(t, err)
	defer net.Close()
	require.NoError(t, net.SetTraining(false))
	p := filepath.Join(t.TempDir(), "net.pt")
	require.NoError(t, net.Save(p))
	m, err := core.LoadModule(p)
	require.NoError(t, err)
	defer m.Close()
	x := []float32{1, 2, 3, -1, 0, 1}
	a := forward(t, net, x, 2, 3)
	defer a.Close()
	in, _ := core.NewTensor(x, 2, 3)
	defer in.Close()
	b, err := m.Forward(in)
	require.NoError(t, err)
	defer core.CloseAll(b)
	va, _ := core.Data[float32](a)
	vb, _ := core.Data[float32](b[0])
	assert.Equal(t, va, vb)

	// float64 input is converted inside forward.
	x64 := make([]float64, len(x))
	for i, v := range x {
		x64[i] = float64(v)
	}
	in64, _ := core.NewTensor(x64, 2, 3)
	defer in64.Close()
	c, err := m.Forward(in64)
	require.NoError(t, err)
	defer core.CloseAll(c)
	vc, _ := core.Data[float32](c[0])
	assert.Equal(t, va, vc)
}

// A spec that parses but declares an absurd network is refused by
// validation, with INVALID_ARGUMENT, before libtorch allocates anything.
func TestSpecLimits(t *testing.T) {
	relus := make([]nn.Layer, 1_000_000)
	for i := range relus {
		relus[i] = nn.ReLU()
	}
	cases := []struct {
		spec nn.Spec
		feat int64
		want string
	}{
		{nn.Sequential(nn.Linear(1 << 40)), 4, `out=1099511627776 is larger than the limit`},
		{nn.Sequential(nn.Linear(1<<20), nn.Linear(1<<20)), 4, `layer 1 (linear "l1"): the network would have more than 1073741824 parameters`},
		{nn.Sequential(relus...), 4, `1000000 layers, more than the limit 1024`},
		{nn.Sequential(nn.Embedding(1<<28, 8)), 4, `more than 1073741824 parameters`},
		{nn.Sequential(nn.Conv2d(1<<16, 1<<14)).WithInputShape(1<<14, 1<<7, 1<<7), 1 << 28, `its weight would have more than 1073741824 elements`},
		// 3 × 6148914691236517206 is 2^64 + 2: it wrapped to 2.
		{nn.Sequential(nn.Linear(1)).WithInputShape(3, 6148914691236517206), 2, `input_shape [3 6148914691236517206] holds more than 268435456 values`},
		{nn.Sequential(nn.Conv1d(1, 1).Named("c")).WithInputShape(1, 4), 4, ``},
		{nn.Sequential(nn.Layer{Type: "conv1d", Out: 1, Kernel: 1, Padding: 1 << 28}).WithInputShape(1, 4), 4, `output shape [1 536870916] holds more than 268435456 values per sample`},
		// A kernel larger than the input gave [1 1] with stride 2; libtorch refuses it.
		{nn.Sequential(nn.Layer{Type: "conv1d", Out: 1, Kernel: 4, Stride: 2}).WithInputShape(1, 3), 3, `output shape [1 0] is empty`},
		{nn.Sequential(nn.Layer{Type: "batchnorm1d", Momentum: math.NaN()}), 3, `momentum must be a finite number`},
		{nn.Sequential(nn.Layer{Type: "linear", Out: 2, Stride: -1}), 3, `stride must be >= 0`},
		{nn.Sequential(nn.Linear(1)), 1 << 40, `network input has 1099511627776 features`},
	}
	for _, c := range cases {
		infos, err := c.spec.Infer(c.feat)
		if c.want == "" {
			require.NoError(t, err)
			assert.Equal(t, []int64{1, 4}, infos[0].Out)
			continue
		}
		require.Error(t, err, c.want)
		assert.Contains(t, err.Error(), c.want)
		assert.True(t, core.HasCode(err, core.InvalidArgument), "%v has code %v", err, core.CodeOf(err))
	}
	_, err := nn.Build(nn.Sequential(nn.Linear(1<<40)), 4, 1)
	require.Error(t, err)
	assert.True(t, core.HasCode(err, core.InvalidArgument))

	_, err = nn.ParseSpec([]byte("layers: [{type: linear, out: 1}]\nbogus: 1\n"))
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
}

// TestCheckLayers: what can be checked before the data's width is known.
func TestCheckLayers(t *testing.T) {
	require.NoError(t, nn.Sequential(nn.Linear(4), nn.ReLU(), nn.Layer{Type: "Batch_Norm1d"}, nn.Linear(2)).CheckLayers())
	for _, c := range []struct {
		spec nn.Spec
		want string
	}{
		{nn.Spec{}, "no layers"},
		{nn.Sequential(nn.Linear(4), nn.Layer{Type: "linearr"}), `layer 1 (linearr "l1"): unknown layer type "linearr"`},
		{nn.Sequential(nn.Layer{}), "missing type"},
		{nn.Sequential(nn.Linear(1 << 40)), "layer 0"},
		{nn.Spec{Layers: make([]nn.Layer, nn.MaxLayers+1)}, "more than the limit"},
	} {
		err := c.spec.CheckLayers()
		require.Error(t, err, "%+v", c.spec)
		assert.Contains(t, err.Error(), c.want)
		assert.Equal(t, core.InvalidArgument, core.CodeOf(err))
	}
}
