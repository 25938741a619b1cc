package core_test

import (
	"math"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native"
)

func roundTrip[T core.Element](t *testing.T, data []T, shape ...int64) {
	t.Helper()
	dt := core.DTypeOf[T]()
	x, err := core.NewTensor(data, shape...)
	require.NoError(t, err, dt.String())
	defer x.Close()
	assert.Equal(t, dt, x.DType())
	assert.Equal(t, shape, x.Shape())
	assert.True(t, x.IsContiguous())
	got, err := core.Data[T](x)
	require.NoError(t, err)
	assert.Equal(t, data, got, dt.String())
	// The view is the tensor's C memory, not the Go slice we passed.
	p, err := x.DataPtr()
	require.NoError(t, err)
	assert.Equal(t, p, unsafe.Pointer(&got[0]))
	assert.NotEqual(t, unsafe.Pointer(&data[0]), p, "NewTensor must copy into C memory")
	assert.Equal(t, int64(len(data)*dt.Size()), x.NumBytes())
}

func TestRoundTripEveryDType(t *testing.T) {
	roundTrip(t, []float32{1.5, -2, 3.25, float32(math.Inf(1)), 0, 7}, 2, 3)
	roundTrip(t, []float64{1e300, -2, math.SmallestNonzeroFloat64, 4}, 4)
	roundTrip(t, []int64{math.MaxInt64, math.MinInt64, 0, 42, -1, 9}, 3, 2)
	roundTrip(t, []int32{math.MaxInt32, math.MinInt32, 5}, 3, 1)
	roundTrip(t, []int16{math.MaxInt16, math.MinInt16}, 2)
	roundTrip(t, []int8{127, -128, 0, 1}, 1, 2, 2)
	roundTrip(t, []uint8{255, 0, 128}, 3)
	roundTrip(t, []bool{true, false, true, true}, 2, 2)
	roundTrip(t, []core.Half{core.HalfFromFloat32(1.5), core.HalfFromFloat32(-65504), core.HalfFromFloat32(6e-8)}, 3)
	roundTrip(t, []core.BHalf{core.BHalfFromFloat32(3.140625), core.BHalfFromFloat32(-1e30)}, 2)
}

func TestScalarAndEmpty(t *testing.T) {
	s, err := core.Scalar(int64(7))
	require.NoError(t, err)
	defer s.Close()
	assert.Equal(t, 0, s.Dim())
	assert.Equal(t, int64(1), s.NumElements())
	v, err := core.Data[int64](s)
	require.NoError(t, err)
	assert.Equal(t, []int64{7}, v)

	e, err := core.NewTensor([]float32{}, 0, 4)
	require.NoError(t, err)
	defer e.Close()
	assert.Equal(t, []int64{0, 4}, e.Shape())
	d, err := core.Data[float32](e)
	require.NoError(t, err)
	assert.Empty(t, d)
}

func TestNewTensorErrors(t *testing.T) {
	_, err := core.NewTensor([]float32{1, 2, 3}, 2, 2)
	assert.ErrorContains(t, err, "shape [2 2] holds 4 elements, data has 3")
	_, err = core.NewTensor([]float32{1}, -1)
	assert.ErrorContains(t, err, "negative")
	_, err = core.Zeros(core.DType(99), 2)
	assert.ErrorContains(t, err, "unknown dtype")
	x, err := core.NewTensor([]float32{1, 2})
	require.NoError(t, err)
	defer x.Close()
	_, err = core.Data[int64](x)
	assert.ErrorContains(t, err, "dtype mismatch")
}

func TestConversionsMatchLibtorch(t *testing.T) {
	// Every half bit pattern widens as libtorch widens it.
	halves := make([]core.Half, 1<<16)
	for i := range halves {
		halves[i] = core.Half(i)
	}
	h, err := core.NewTensor(halves)
	require.NoError(t, err)
	defer h.Close()
	f, err := h.To(core.Float32)
	require.NoError(t, err)
	defer f.Close()
	wide, err := core.Data[float32](f)
	require.NoError(t, err)
	for i, w := range wide {
		got := halves[i].Float32()
		if math.IsNaN(float64(w)) {
			require.True(t, math.IsNaN(float64(got)), "half %#04x", i)
			continue
		}
		require.Equal(t, math.Float32bits(w), math.Float32bits(got), "half %#04x", i)
	}

	// Narrowing float32 -> half and bfloat16 rounds as libtorch rounds.
	var vals []float32
	for e := -30; e <= 20; e++ {
		for m := 0; m < 300; m++ {
			v := float32(math.Ldexp(1+float64(m)/300, e))
			vals = append(vals, v, -v)
		}
	}
	vals = append(vals, 0, 65504, 65520, 1e10, float32(math.Inf(-1)), 5.960464477539063e-08, 2.98e-8)
	src, err := core.NewTensor(vals)
	require.NoError(t, err)
	defer src.Close()
	for _, dt := range []core.DType{core.Float16, core.BFloat16} {
		n, err := src.To(dt)
		require.NoError(t, err)
		bits, err := n.Bytes()
		require.NoError(t, err)
		for i, v := range vals {
			want := uint16(bits[2*i]) | uint16(bits[2*i+1])<<8
			var got uint16
			if dt == core.Float16 {
				got = uint16(core.HalfFromFloat32(v))
			} else {
				got = uint16(core.BHalfFromFloat32(v))
			}
			require.Equal(t, want, got, "%v of %g", dt, v)
		}
		n.Close()
	}
}

func TestFromBlobIsZeroCopyAndReleases(t *testing.T) {
	const n = 6
	buf := native.Malloc(n * 4)
	vals := unsafe.Slice((*float32)(buf), n)
	for i := range vals {
		vals[i] = float32(i)
	}
	var released atomic.Int32
	x, err := core.FromBlob(buf, core.Float32, []int64{2, 3}, nil, func() {
		released.Add(1)
		native.FreeC(buf)
	})
	require.NoError(t, err)
	p, err := x.DataPtr()
	require.NoError(t, err)
	assert.Equal(t, buf, p, "libtorch must see the caller's buffer")

	// A view that shares the storage keeps the buffer alive after Close.
	view, err := x.Contiguous()
	require.NoError(t, err)
	require.NoError(t, x.Close())
	assert.Equal(t, int32(0), released.Load())
	got, err := core.Data[float32](view)
	require.NoError(t, err)
	assert.Equal(t, []float32{0, 1, 2, 3, 4, 5}, got)
	require.NoError(t, view.Close())
	assert.Equal(t, int32(1), released.Load(), "release runs once the last view is gone")
}

func TestFromBlobStrides(t *testing.T) {
	// A column-major 2x3 view of six values.
	buf := native.Malloc(6 * 8)
	defer native.FreeC(buf)
	vals := unsafe.Slice((*float64)(buf), 6)
	for i := range vals {
		vals[i] = float64(i)
	}
	x, err := core.FromBlob(buf, core.Float64, []int64{2, 3}, []int64{1, 2}, nil)
	require.NoError(t, err)
	defer x.Close()
	assert.False(t, x.IsContiguous())
	_, err = x.DataPtr()
	assert.ErrorContains(t, err, "not contiguous")
	s, err := x.Strides()
	require.NoError(t, err)
	assert.Equal(t, []int64{1, 2}, s)
	rows, err := core.CopyData[float64](x)
	require.NoError(t, err)
	assert.Equal(t, []float64{0, 2, 4, 1, 3, 5}, rows)
}

func TestFromBlobErrorKeepsOwnership(t *testing.T) {
	buf := native.Malloc(16)
	defer native.FreeC(buf)
	called := false
	_, err := core.FromBlob(buf, core.Float32, []int64{2, -2}, nil, func() { called = true })
	assert.ErrorContains(t, err, "negative")
	_, err = core.FromBlob(buf, core.Float32, []int64{2, 2}, []int64{1}, func() { called = true })
	assert.ErrorContains(t, err, "1 strides for 2 dimensions")
	_, err = core.FromBlob(nil, core.Float32, []int64{2, 2}, nil, func() { called = true })
	assert.ErrorContains(t, err, "NULL")
	assert.False(t, called, "release must not run when wrapping fails")
}

func TestClosedTensor(t *testing.T) {
	x, err := core.Zeros(core.Int32, 2, 2)
	require.NoError(t, err)
	require.NoError(t, x.Close())
	require.NoError(t, x.Close(), "closing twice is a no-op")
	_, err = x.DataPtr()
	assert.ErrorIs(t, err, core.ErrClosed)
	_, err = x.To(core.Float32)
	assert.ErrorIs(t, err, core.ErrClosed)
}

func TestParseDType(t *testing.T) {
	for name, want := range map[string]core.DType{
		"float32": core.Float32, "torch.float64": core.Float64, "half": core.Float16,
		"long": core.Int64, "bool": core.Bool, "bfloat16": core.BFloat16, "uint8": core.Uint8,
	} {
		got, err := core.ParseDType(name)
		require.NoError(t, err, name)
		assert.Equal(t, want, got, name)
	}
	_, err := core.ParseDType("complex64")
	assert.ErrorContains(t, err, "complex64")
}

func TestThreads(t *testing.T) {
	require.NoError(t, core.SetNumThreads(2))
	assert.Equal(t, 2, core.NumThreads())
	assert.Error(t, core.SetNumThreads(0))
	assert.Regexp(t, `^\d+\.\d+`, core.TorchVersion())
}
