package nn_test

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/nn"
)

// values returns a tensor's float32 values (closing it).
func values(t *testing.T, x *core.Tensor) []float32 {
	t.Helper()
	defer x.Close()
	v, err := core.Data[float32](x)
	require.NoError(t, err)
	return append([]float32(nil), v...)
}

// TestOptimizeForInference: a frozen, optimized network answers as the
// original in eval mode does (to float rounding), and it is frozen: put
// back in training mode, it still answers the same, deterministically,
// where the original's dropout and batch statistics change its answers.
func TestOptimizeForInference(t *testing.T) {
	spec := nn.Sequential(
		nn.Layer{Type: "conv2d", Out: 8, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
		nn.Flatten(), nn.Dropout(0.5), nn.Linear(4),
	).WithInputShape(1, 8, 8)
	build := func() *nn.Net {
		net, err := nn.Build(spec, 64, 7)
		require.NoError(t, err)
		t.Cleanup(func() { net.Close() })
		return net
	}
	r := rand.New(rand.NewPCG(1, 2))
	x := make([]float32, 3*64)
	for i := range x {
		x[i] = float32(r.NormFloat64())
	}

	orig, opt := build(), build()
	require.NoError(t, orig.SetTraining(false))
	want := values(t, forward(t, orig, x, 3, 64))
	require.NoError(t, opt.OptimizeForInference())
	got := values(t, forward(t, opt, x, 3, 64))
	require.InDeltaSlice(t, want, got, 1e-5)

	// Training mode: the original's answers move (dropout), the frozen
	// network's do not.
	require.NoError(t, orig.SetTraining(true))
	a, b := values(t, forward(t, orig, x, 3, 64)), values(t, forward(t, orig, x, 3, 64))
	require.NotEqual(t, a, b, "the original network in training mode answered twice the same: the check below would prove nothing")
	require.NoError(t, opt.SetTraining(true))
	for range 2 {
		require.InDeltaSlice(t, want, values(t, forward(t, opt, x, 3, 64)), 1e-5)
	}
}
