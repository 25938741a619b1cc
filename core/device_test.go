package core_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
)

// On this libtorch (Debian's 1.13, no CUDA) every GPU is refused with a
// coded error naming the device; the CPU works; bad spellings are the
// caller's error. With a CUDA libtorch and a GPU the GPU cases are run by
// scripts/gpu-check instead.
func TestCheckDevice(t *testing.T) {
	require.NoError(t, core.CheckDevice(""))
	require.NoError(t, core.CheckDevice("cpu"))
	for _, bad := range []string{"gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda:0:1", "cuda:1000", "mps", " cpu"} {
		err := core.CheckDevice(bad)
		require.Error(t, err, bad)
		require.Equal(t, core.InvalidArgument, core.CodeOf(err), "%s: %v", bad, err)
		require.Contains(t, err.Error(), "want cpu, cuda or cuda:N")
	}
	if core.CUDACompiled() {
		n := core.CUDADeviceCount()
		// A libtorch with CUDA: a GPU index past those present is
		// UNAVAILABLE, naming how many there are.
		err := core.CheckDevice("cuda:7")
		if n > 7 {
			require.NoError(t, err)
			return
		}
		require.Error(t, err)
		require.Equal(t, core.Unavailable, core.CodeOf(err), "%v", err)
		if n == 0 {
			require.Contains(t, err.Error(), "device cuda:7: no CUDA GPU present")
		} else {
			require.Contains(t, err.Error(), "device cuda:7: no GPU 7 (")
		}
		return
	}
	require.Equal(t, 0, core.CUDADeviceCount())
	for _, d := range []string{"cuda", "cuda:0", "cuda:3"} {
		err := core.CheckDevice(d)
		require.Error(t, err)
		require.Equal(t, core.Unsupported, core.CodeOf(err), "%v", err)
		require.Contains(t, err.Error(), "device "+d+": this libtorch")
		require.Contains(t, err.Error(), "has no CUDA")
	}
	_, _, err := core.CUDAMemory(0)
	require.Equal(t, core.Unsupported, core.CodeOf(err), "%v", err)
}

func TestModuleToDevice(t *testing.T) {
	m, f := loadFixture(t, "mlp")
	require.Equal(t, "cpu", m.Device())
	forward := func() *core.Tensor {
		ins := make([]*core.Tensor, len(f.Inputs))
		for i, tf := range f.Inputs {
			ins[i] = loadTensor(t, tf)
			defer ins[i].Close()
		}
		outs, err := m.Forward(ins...)
		require.NoError(t, err)
		require.Len(t, outs, 1)
		t.Cleanup(func() { outs[0].Close() })
		return outs[0]
	}
	before := forward()

	err := m.To("cuda:0")
	if core.CUDADeviceCount() > 0 {
		t.Skip("a GPU is present: scripts/gpu-check compares GPU outputs")
	}
	require.Error(t, err)
	require.Contains(t, err.Error(), "cuda:0")
	require.Contains(t, []core.Code{core.Unsupported, core.Unavailable}, core.CodeOf(err))
	// The module stayed on the CPU and still answers the same.
	require.Equal(t, "cpu", m.Device())
	require.Zero(t, maxAbsDiff(t, before, forward()))

	require.Equal(t, core.InvalidArgument, core.CodeOf(m.To("tpu")))
	require.NoError(t, m.To("cpu"))
	require.NoError(t, m.To(""))
	require.Equal(t, "cpu", m.Device())
	require.Zero(t, maxAbsDiff(t, before, forward()))

	require.NoError(t, m.Close())
	require.ErrorIs(t, m.To("cpu"), core.ErrClosed)
}
