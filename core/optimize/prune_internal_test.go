package optimize

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
)

// smallCNN is a conv-bn-relu-pool, conv-relu, flatten, MLP network on 8×8
// one-channel images.
func smallCNN() nn.Spec {
	return nn.Sequential(
		nn.Layer{Type: "conv2d", Out: 8, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
		nn.Conv2d(12, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.1),
		nn.Linear(16), nn.ReLU(), nn.Linear(10),
	).WithInputShape(1, 8, 8)
}

func randomize(t *testing.T, net *nn.Net, name string, r *rand.Rand, lo, hi float32) {
	t.Helper()
	v, shape, err := getFloats(net.Handle(), name)
	require.NoError(t, err)
	for i := range v {
		v[i] = lo + (hi-lo)*r.Float32()
	}
	require.NoError(t, setFloats(net.Handle(), name, v, shape))
}

// zeroInputs zeroes, in the weight `name` ([out, in, ...]), the inputs
// (second dimension) whose index is not kept; blocks of `block`
// consecutive inputs belong to one kept channel index.
func zeroInputs(t *testing.T, net *nn.Net, name string, keep []int64, block int) {
	t.Helper()
	v, shape, err := getFloats(net.Handle(), name)
	require.NoError(t, err)
	in := int(shape[1])
	inner := len(v) / int(shape[0]) / in
	for o := range int(shape[0]) {
		for i := range in {
			if slices.Contains(keep, int64(i/block)) {
				continue
			}
			for k := range inner {
				v[(o*in+i)*inner+k] = 0
			}
		}
	}
	require.NoError(t, setFloats(net.Handle(), name, v, shape))
}

func forward(t *testing.T, net *nn.Net, x []float32, rows int64) []float32 {
	t.Helper()
	xt, err := core.NewTensor(x, rows, int64(len(x))/rows)
	require.NoError(t, err)
	defer xt.Close()
	ys, err := net.Forward(xt)
	require.NoError(t, err)
	defer core.CloseAll(ys)
	out, err := core.CopyData[float32](ys[0])
	require.NoError(t, err)
	return out
}

// filterNorms returns the L1 norm of each output channel's weights.
func filterNorms(t *testing.T, net *nn.Net, name string) []float64 {
	v, shape, err := getFloats(net.Handle(), name)
	require.NoError(t, err)
	per := len(v) / int(shape[0])
	norms := make([]float64, shape[0])
	for i, x := range v {
		norms[i/per] += math.Abs(float64(x))
	}
	return norms
}

// Structured pruning of a CNN rebuilds a smaller dense network that
// computes what the original computes with the removed channels' and
// neurons' contributions cut off (their columns in the next layer zeroed).
func TestPruneStructuredConvEquivalent(t *testing.T) {
	spec := smallCNN()
	net, err := nn.Build(spec, 64, 3)
	require.NoError(t, err)
	defer net.Close()
	r := rand.New(rand.NewPCG(1, 2))
	// Batchnorm with non-trivial statistics and affine parameters.
	randomize(t, net, "l1_running_mean", r, -0.5, 0.5)
	randomize(t, net, "l1_running_var", r, 0.5, 2)
	randomize(t, net, "l1_weight", r, 0.5, 1.5)
	randomize(t, net, "l1_bias", r, -0.5, 0.5)
	require.NoError(t, net.SetTraining(false))
	src := &Source{Net: net, Manifest: modelpkg.Manifest{Spec: spec}, Prelude: nn.Prelude{Inputs: 64, Features: 64}}

	keep, err := StructuredKeep(net, 0.5, L1)
	require.NoError(t, err)
	// Both convs and the hidden linear layer shrink; the output layer not.
	require.Len(t, keep, 3)
	assert.Len(t, keep["l0"], 4)
	assert.Len(t, keep["l4"], 6)
	assert.Len(t, keep["l8"], 8)
	// The kept filters are those with the largest L1 norms.
	for name, k := range keep {
		norms := filterNorms(t, net, name+"_weight")
		minKept, maxGone := math.Inf(1), math.Inf(-1)
		for i, n := range norms {
			if slices.Contains(k, int64(i)) {
				minKept = min(minKept, n)
			} else {
				maxGone = max(maxGone, n)
			}
		}
		assert.Greater(t, minKept, maxGone, name)
	}

	small, ns, err := PruneStructured(src, net, spec, 0.5, L1)
	require.NoError(t, err)
	defer small.Close()
	assert.Equal(t, []int64{4, 6, 8, 10}, []int64{ns.Layers[0].Out, ns.Layers[4].Out, ns.Layers[8].Out, ns.Layers[10].Out})
	// conv 1→4 3×3, bn 4, conv 4→6 3×3, linear 6·2·2→8, linear 8→10.
	assert.Equal(t, int64(4*9+4+2*4+6*4*9+6+24*8+8+8*10+10), small.Params)
	assert.Less(t, small.Params, net.Params)

	// The reference: the original with the removed channels' inputs to the
	// next layer zeroed (blocks of 2×2 flattened features for l4).
	ref, err := src.Cloned()
	require.NoError(t, err)
	defer ref.Close()
	zeroInputs(t, ref, "l4_weight", keep["l0"], 1)
	zeroInputs(t, ref, "l8_weight", keep["l4"], 4)
	zeroInputs(t, ref, "l10_weight", keep["l8"], 1)
	x := make([]float32, 7*64)
	for i := range x {
		x[i] = float32(r.NormFloat64())
	}
	want, got := forward(t, ref, x, 7), forward(t, small, x, 7)
	require.Len(t, got, len(want))
	orig := forward(t, net, x, 7)
	differs := false
	for i := range want {
		assert.InDelta(t, want[i], got[i], 1e-5, "output %d", i)
		differs = differs || math.Abs(float64(orig[i]-want[i])) > 1e-3
	}
	assert.True(t, differs, "pruning changed nothing: the test would not see wrong slicing")

	// A conv feeding nothing prunable (the last layer) is refused clearly.
	lone := nn.Sequential(nn.Conv2d(4, 3), nn.ReLU(), nn.Flatten()).WithInputShape(1, 8, 8)
	ln, err := nn.Build(lone, 64, 1)
	require.NoError(t, err)
	defer ln.Close()
	_, err = StructuredKeep(ln, 0.5, L2)
	assert.ErrorContains(t, err, "this network has none")
	// A layernorm over the flattened conv outputs too.
	lnSpec := nn.Sequential(nn.Conv2d(4, 3), nn.Flatten(), nn.LayerNorm(), nn.Linear(10)).WithInputShape(1, 8, 8)
	lnNet, err := nn.Build(lnSpec, 64, 1)
	require.NoError(t, err)
	defer lnNet.Close()
	_, err = StructuredKeep(lnNet, 0.5, L2)
	assert.ErrorContains(t, err, "the layernorm l2 after it normalizes over all its flattened outputs")
}

// Latencies times every module given, on the same batch, and refuses to
// time without data.
func TestLatencies(t *testing.T) {
	big, err := nn.Build(nn.Sequential(nn.Linear(512), nn.ReLU(), nn.Linear(512), nn.ReLU(), nn.Linear(10)), 64, 1)
	require.NoError(t, err)
	defer big.Close()
	small, err := nn.Build(nn.Sequential(nn.Linear(10)), 64, 1)
	require.NoError(t, err)
	defer small.Close()
	require.NoError(t, big.SetTraining(false))
	require.NoError(t, small.SetTraining(false))
	ds, err := data.NewDataset(make([]float32, 3*64), 64, []float32{0, 1, 2})
	require.NoError(t, err)
	l, err := Latencies([]*core.Module{big.Module, small.Module}, ds, 64)
	require.NoError(t, err)
	require.Len(t, l, 2)
	assert.Greater(t, l[0], 0.0)
	assert.Greater(t, l[1], 0.0)
	_, err = Latencies([]*core.Module{small.Module}, nil, 1)
	assert.ErrorContains(t, err, "no data to time on")
}
