package core_test

import (
	"path/filepath"
	"runtime"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/testkit"
)

// descOf returns ForwardInto's descriptor entry for one tensor.
func descOf(dt core.DType, shape ...int64) []int64 {
	return append([]int64{int64(dt), int64(len(shape))}, shape...)
}

func addrOf[T any](s []T) uintptr { return uintptr(unsafe.Pointer(&s[0])) }

func TestForwardInto(t *testing.T) {
	m, f := loadFixture(t, "mlp")
	x := loadTensor(t, f.Inputs[0])
	defer x.Close()
	want, err := m.Forward(x)
	require.NoError(t, err)
	defer core.CloseAll(want)
	wantVals, err := core.Data[float32](want[0])
	require.NoError(t, err)
	xv, err := core.Data[float32](x)
	require.NoError(t, err)
	in := append([]float32(nil), xv...)
	out := make([]float32, len(wantVals))
	var pin runtime.Pinner
	pin.Pin(&in[0])
	pin.Pin(&out[0])
	defer pin.Unpin()
	inDesc := descOf(core.Float32, x.Shape()...)
	outDesc := descOf(core.Float32, want[0].Shape()...)
	desc := append(append([]int64(nil), inDesc...), outDesc...)

	live := core.LiveTensors()
	st, err := m.ForwardInto(desc, []uintptr{addrOf(in)}, []uintptr{addrOf(out)})
	require.NoError(t, err)
	require.Equal(t, core.ForwardIntoDone, st)
	require.InDeltaSlice(t, wantVals, out, 1e-6)
	require.Equal(t, live, core.LiveTensors(), "ForwardInto left native tensors behind")

	// Another output shape, or another number of outputs: nothing written.
	clear(out)
	bad := append(append([]int64(nil), inDesc...), descOf(core.Float32, int64(len(out)))...)
	st, err = m.ForwardInto(bad, []uintptr{addrOf(in)}, []uintptr{addrOf(out)})
	require.NoError(t, err)
	require.Equal(t, core.ForwardIntoMismatch, st)
	two := append(append(append([]int64(nil), inDesc...), outDesc...), outDesc...)
	st, err = m.ForwardInto(two, []uintptr{addrOf(in)}, []uintptr{addrOf(out), addrOf(out)})
	require.NoError(t, err)
	require.Equal(t, core.ForwardIntoMismatch, st)
	st, err = m.ForwardInto(append(append([]int64(nil), inDesc...), descOf(core.Int64, want[0].Shape()...)...),
		[]uintptr{addrOf(in)}, []uintptr{addrOf(out)})
	require.NoError(t, err)
	require.Equal(t, core.ForwardIntoMismatch, st)
	require.Equal(t, make([]float32, len(out)), out)

	// Bad descriptors and inputs the model rejects are INVALID_ARGUMENT
	// errors, not crashes.
	for name, d := range map[string][]int64{
		"dtype code":         append(descOf(99, x.Shape()...), outDesc...),
		"negative dimension": append(descOf(core.Float32, -1, 8), outDesc...),
		"too many dims":      append([]int64{int64(core.Float32), int64(core.ForwardIntoMaxDims + 1)}, make([]int64, core.ForwardIntoMaxDims+1)...),
		"short":              inDesc[:len(inDesc)-1],
		"wrong width":        append(descOf(core.Float32, 1, 3), outDesc...),
	} {
		_, err := m.ForwardInto(d, []uintptr{addrOf(in)}, []uintptr{addrOf(out)})
		require.Error(t, err, name)
		require.Equal(t, core.InvalidArgument, core.CodeOf(err), "%s: %v", name, err)
	}
	require.Equal(t, live, core.LiveTensors())

	// An output that is the input itself (the model works in place).
	inplace, err := core.LoadModule(filepath.Join(testkit.Fixture(t, "inplace"), "inplace.pt"))
	require.NoError(t, err)
	defer inplace.Close()
	v := []float32{1, 2, 3, 4}
	o1, o2 := make([]float32, 4), make([]float32, 4)
	pin.Pin(&v[0])
	pin.Pin(&o1[0])
	pin.Pin(&o2[0])
	d := append(append(descOf(core.Float32, 2, 2), descOf(core.Float32, 2, 2)...), descOf(core.Float32, 2, 2)...)
	st, err = inplace.ForwardInto(d, []uintptr{addrOf(v)}, []uintptr{addrOf(o1), addrOf(o2)})
	require.NoError(t, err)
	require.Equal(t, core.ForwardIntoAliased, st)
	require.Equal(t, make([]float32, 4), o1)
}
