package flightserver_test

import (
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	kflight "github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/manager"
)

// affineStats returns the statistics of affine's serving version 2.
func affineStats(t *testing.T, mgr *manager.Manager) (inferences, executions uint64) {
	t.Helper()
	v, err := mgr.Acquire("affine", "")
	require.NoError(t, err)
	defer v.Release()
	s := v.Stats().Snapshot()
	return s.InferenceCount, s.ExecutionCount
}

// TestExchangeBatchLargerThanLimits: a batch far larger than affine's
// max_batch_size (8) runs as one execution on the batch as it came, and its
// answers are those of the model row by row.
func TestExchangeBatchLargerThanLimits(t *testing.T) {
	mgr := newManager(t)
	e := start(t, kflight.Options{Models: kflight.ManagerModels(mgr)})
	ctx := ctxT(t)
	const rows = 5000
	x := rows4(0, rows)
	inf0, ex0 := affineStats(t, mgr)
	out, metas, err := e.exchange(ctx, modelDesc("affine"), record([]string{"x"}, tensorColumn(t, x, 4)))
	require.NoError(t, err)
	require.Equal(t, []string{"batch-0"}, metas)
	require.Len(t, out, 1)
	require.EqualValues(t, rows, out[0].NumRows())
	y := floats(t, out[0].Column(0))
	require.Len(t, y, 4*rows)
	for i, v := range x {
		require.InDelta(t, v*3+1, y[i], float64(1e-3*max(1, abs(v))), "value %d", i) // version 2: scale 3
	}
	inf1, ex1 := affineStats(t, mgr)
	require.EqualValues(t, rows, inf1-inf0)
	require.EqualValues(t, 1, ex1-ex0, "one execution, not %d requests of max_batch_size rows", rows/8)
}

func abs(v float32) float32 {
	if v < 0 {
		return -v
	}
	return v
}

// TestExchangeSlicedAndReorderedInputs: batches that are slices of larger
// arrays (with offsets), and inputs in another column order than the
// model's, with extra columns, give the same answers as plain batches.
func TestExchangeSlicedAndReorderedInputs(t *testing.T) {
	e := start(t, kflight.Options{Models: kflight.ManagerModels(newManager(t))})
	ctx := ctxT(t)

	// affine: rows 7..36 of a 50-row column, in several slices.
	x := rows4(0, 50)
	whole := record([]string{"x"}, tensorColumn(t, x, 4))
	defer whole.Release()
	var recs []arrow.RecordBatch
	for _, s := range [][2]int64{{7, 20}, {20, 21}, {21, 37}} {
		recs = append(recs, whole.NewSlice(s[0], s[1]))
	}
	out, _, err := e.exchange(ctx, modelDesc("affine"), recs...)
	require.NoError(t, err)
	var y []float32
	for _, o := range out {
		y = append(y, floats(t, o.Column(0))...)
	}
	require.Len(t, y, 4*30)
	for i, v := range x[4*7 : 4*37] {
		require.InDelta(t, v*3+1, y[i], float64(1e-3*max(1, abs(v))), "value %d", i)
	}

	// pair: columns b, an unused one, then a (the model takes a, b), the
	// batch a slice with an offset.
	const rows = 40
	bb := array.NewInt64Builder(memory.DefaultAllocator)
	ub := array.NewStringBuilder(memory.DefaultAllocator)
	a := make([]float32, 0, rows*3)
	for r := 0; r < rows; r++ {
		bb.Append(int64(r%7 - 3))
		ub.Append("unused")
		a = append(a, float32(r), 0.5, -float32(r))
	}
	full := record([]string{"b", "note", "a"}, bb.NewArray(), ub.NewArray(), tensorColumn(t, a, 3))
	defer full.Release()
	slice := full.NewSlice(5, 33)
	out, _, err = e.exchange(ctx, modelDesc("pair"), slice)
	require.NoError(t, err)
	prod := floats(t, out[0].Column(0))
	require.Len(t, prod, 28*3)
	for i := 0; i < 28; i++ {
		r := i + 5
		for j := 0; j < 3; j++ {
			require.Equal(t, a[3*r+j]*float32(r%7-3), prod[3*i+j], "row %d", r)
		}
	}
}

// TestExchangeErrorMidStream: after good batches, a bad one (nulls) ends
// the stream with INVALID_ARGUMENT; the good batches were answered first,
// and the server keeps serving.
func TestExchangeErrorMidStream(t *testing.T) {
	e := start(t, kflight.Options{Models: kflight.ManagerModels(newManager(t))})
	ctx := ctxT(t)
	good := func(first, n int) arrow.RecordBatch {
		b := array.NewInt64Builder(memory.DefaultAllocator)
		a := make([]float32, 0, 3*n)
		for r := first; r < first+n; r++ {
			b.Append(int64(r))
			a = append(a, 1, 2, 3)
		}
		return record([]string{"a", "b"}, tensorColumn(t, a, 3), b.NewArray())
	}
	nb := array.NewInt64Builder(memory.DefaultAllocator)
	nb.AppendValues([]int64{1, 2, 3}, []bool{true, false, true})
	bad := record([]string{"a", "b"}, tensorColumn(t, make([]float32, 9), 3), nb.NewArray())
	out, metas, err := e.exchange(ctx, modelDesc("pair"), good(0, 10), good(10, 100), bad, good(110, 5))
	requireCode(t, err, codes.InvalidArgument, "nulls")
	require.Equal(t, []string{"batch-0", "batch-1"}, metas, "the batches before the bad one are answered")
	require.EqualValues(t, 10, out[0].NumRows())
	require.EqualValues(t, 100, out[1].NumRows())
	require.Equal(t, []float32{10, 20, 30}, floats(t, out[1].Column(0))[:3])

	out, _, err = e.exchange(ctx, modelDesc("pair"), good(0, 3))
	require.NoError(t, err)
	require.EqualValues(t, 3, out[0].NumRows())
}
