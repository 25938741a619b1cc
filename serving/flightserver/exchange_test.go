package flightserver_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/batcher"
	kflight "github.com/kilnml/kiln/serving/flightserver"
)

// exchange sends recs to a DoExchange with desc, each with app metadata
// "batch-i", and returns the answers and the metadata they carried.
func (e *env) exchange(ctx context.Context, desc *flight.FlightDescriptor, recs ...arrow.RecordBatch) ([]arrow.RecordBatch, []string, error) {
	stream, err := e.client.DoExchange(ctx)
	if err != nil {
		return nil, nil, err
	}
	w := flight.NewRecordWriter(stream, ipc.WithSchema(recs[0].Schema()))
	w.SetFlightDescriptor(desc)
	errc := make(chan error, 1)
	go func() {
		defer stream.CloseSend()
		for i, r := range recs {
			if err := w.WriteWithAppMetadata(r, []byte(fmt.Sprintf("batch-%d", i))); err != nil {
				errc <- err
				return
			}
		}
		errc <- w.Close()
	}()
	var out []arrow.RecordBatch
	var metas []string
	rdr, err := flight.NewRecordReader(stream)
	if err != nil {
		<-errc
		return nil, nil, err
	}
	defer rdr.Release()
	for rdr.Next() {
		r := rdr.RecordBatch()
		r.Retain()
		out = append(out, r)
		metas = append(metas, string(rdr.LatestAppMetadata()))
	}
	werr := <-errc
	if rdr.Err() != nil {
		return out, metas, rdr.Err()
	}
	return out, metas, werr
}

func float32Array(vals []float32) arrow.Array {
	b := array.NewFloat32Builder(memory.DefaultAllocator)
	defer b.Release()
	b.AppendValues(vals, nil)
	return b.NewArray()
}

// rows4 returns n rows of 4 features, row r = [r, r+0.25, -r, r*r/10].
func rows4(first, n int) []float32 {
	x := make([]float32, 0, 4*n)
	for r := first; r < first+n; r++ {
		f := float32(r)
		x = append(x, f, f+0.25, -f, f*f/10)
	}
	return x
}

func tensorColumn(t *testing.T, vals []float32, shape ...int64) arrow.Array {
	t.Helper()
	typ, err := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float32, shape)
	require.NoError(t, err)
	v := float32Array(vals)
	defer v.Release()
	a, err := arrowio.NewFixedShapeTensorArray(typ, v)
	require.NoError(t, err)
	return a
}

func record(names []string, cols ...arrow.Array) arrow.RecordBatch {
	fields := make([]arrow.Field, len(cols))
	for i, c := range cols {
		fields[i] = arrow.Field{Name: names[i], Type: c.DataType()}
	}
	return array.NewRecordBatch(arrow.NewSchema(fields, nil), cols, int64(cols[0].Len()))
}

func floats(t *testing.T, a arrow.Array) []float32 {
	t.Helper()
	switch c := a.(type) {
	case *array.Float32:
		return c.Float32Values()
	case *arrowio.FixedShapeTensorArray:
		return c.ListStorage().ListValues().(*array.Float32).Float32Values()
	}
	t.Fatalf("unexpected column type %s", a.DataType())
	return nil
}

// reference runs rows through the manager directly, as the gRPC service
// does, in requests of at most 8 rows.
func reference(t *testing.T, e *env, mgr interface {
	Acquire(string, string) (kflight.Model, error)
}, model, version string, x []float32, k int) [][]float32 {
	t.Helper()
	m, err := mgr.Acquire(model, version)
	require.NoError(t, err)
	defer m.Release()
	rows := len(x) / k
	var outs [][]float32
	for lo := 0; lo < rows; lo += 8 {
		hi := min(lo+8, rows)
		data := make([]byte, 4*(hi-lo)*k)
		for i, v := range x[lo*k : hi*k] {
			binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(v))
		}
		res, err := m.Infer(context.Background(), []batcher.Tensor{{DType: core.Float32, Shape: []int64{int64(hi - lo), int64(k)}, Data: data}})
		require.NoError(t, err)
		if outs == nil {
			outs = make([][]float32, len(res))
		}
		for j, o := range res {
			for i := 0; i < len(o.Data); i += 4 {
				outs[j] = append(outs[j], math.Float32frombits(binary.LittleEndian.Uint32(o.Data[i:])))
			}
		}
	}
	return outs
}

func TestExchangeAffineMatchesDirectInference(t *testing.T) {
	mgr := newManager(t)
	models := kflight.ManagerModels(mgr)
	e := start(t, kflight.Options{Models: models})
	ctx := ctxT(t)
	before := mgr.Loaded()
	var inferBefore uint64
	for _, v := range before {
		if v.Name() == "affine" && v.Number() == 2 {
			inferBefore = v.Stats().Snapshot().InferenceCount
		}
	}

	// Three batches, one larger than max_batch_size (8), one empty.
	sizes := []int{37, 0, 5}
	var recs []arrow.RecordBatch
	var all []float32
	first := 0
	for _, n := range sizes {
		x := rows4(first, n)
		all = append(all, x...)
		first += n
		recs = append(recs, record([]string{"x"}, tensorColumn(t, x, 4)))
	}
	out, metas, err := e.exchange(ctx, modelDesc("affine"), recs...)
	require.NoError(t, err)
	require.Len(t, out, 3)
	require.Equal(t, []string{"batch-0", "batch-1", "batch-2"}, metas)
	var y, s []float32
	for i, o := range out {
		require.EqualValues(t, sizes[i], o.NumRows())
		require.Equal(t, []string{"y", "s"}, []string{o.Schema().Field(0).Name, o.Schema().Field(1).Name})
		yt, ok := o.Column(0).DataType().(*arrowio.FixedShapeTensorType)
		require.True(t, ok)
		require.Equal(t, []int64{4}, yt.Shape())
		require.Equal(t, arrow.FLOAT32, o.Column(1).DataType().ID())
		y = append(y, floats(t, o.Column(0))...)
		s = append(s, floats(t, o.Column(1))...)
	}
	want := reference(t, e, models, "affine", "", all, 4)
	require.Equal(t, want[0], y)
	require.Equal(t, want[1], s)
	for i, v := range all {
		require.InDelta(t, v*3+1, y[i], 1e-4) // version 2: scale 3
	}
	// The requests went through the shared batcher and its statistics.
	for _, v := range mgr.Loaded() {
		if v.Name() == "affine" && v.Number() == 2 {
			require.GreaterOrEqual(t, v.Stats().Snapshot().InferenceCount, inferBefore+42+42)
		}
	}

	// Version 1, with the inputs as a FixedSizeList column and as four
	// stacked columns (with and without kiln.features metadata).
	x := rows4(0, 11)
	fsl := array.NewFixedSizeListBuilder(memory.DefaultAllocator, 4, arrow.PrimitiveTypes.Float32)
	for r := 0; r < 11; r++ {
		fsl.Append(true)
		fsl.ValueBuilder().(*array.Float32Builder).AppendValues(x[4*r:4*r+4], nil)
	}
	cols := make([]arrow.Array, 4)
	for j := range cols {
		v := make([]float32, 11)
		for r := range v {
			v[r] = x[4*r+j]
		}
		cols[j] = float32Array(v)
	}
	ids := array.NewInt64Builder(memory.DefaultAllocator)
	for r := 0; r < 11; r++ {
		ids.Append(int64(r))
	}
	idCol := ids.NewArray()
	// Reverse column order with metadata naming the right order.
	md := arrow.NewMetadata([]string{kflight.FeaturesMetadataKey}, []string{`["c0","c1","c2","c3"]`})
	withMeta := array.NewRecordBatch(arrow.NewSchema([]arrow.Field{
		{Name: "id", Type: arrow.PrimitiveTypes.Int64}, {Name: "c3", Type: arrow.PrimitiveTypes.Float32},
		{Name: "c2", Type: arrow.PrimitiveTypes.Float32}, {Name: "c1", Type: arrow.PrimitiveTypes.Float32},
		{Name: "c0", Type: arrow.PrimitiveTypes.Float32}}, &md), []arrow.Array{idCol, cols[3], cols[2], cols[1], cols[0]}, 11)
	for name, rec := range map[string]arrow.RecordBatch{
		"fixed size list":     record([]string{"x"}, fsl.NewArray()),
		"stacked":             record([]string{"a", "b", "c", "d"}, cols...),
		"stacked by metadata": withMeta,
	} {
		t.Run(name, func(t *testing.T) {
			out, _, err := e.exchange(ctx, modelDesc("affine", "1"), rec)
			require.NoError(t, err)
			require.Len(t, out, 1)
			y := floats(t, out[0].Column(0))
			for i, v := range x {
				require.InDelta(t, v*2+1, y[i], 1e-4) // version 1: scale 2
			}
		})
	}
}

func TestExchangeOtherModels(t *testing.T) {
	e := start(t, kflight.Options{Models: kflight.ManagerModels(newManager(t))})
	ctx := ctxT(t)

	// image: a [2,3] fixed_shape_tensor input, 40 rows in chunks of 16.
	x := make([]float32, 40*6)
	for i := range x {
		x[i] = float32(i%17) - 3
	}
	out, _, err := e.exchange(ctx, modelDesc("image"), record([]string{"x"}, tensorColumn(t, x, 2, 3)))
	require.NoError(t, err)
	flat, mean := floats(t, out[0].Column(0)), floats(t, out[0].Column(1))
	for i := range x {
		require.InDelta(t, 2*x[i], flat[i], 1e-5)
	}
	for r := 0; r < 40; r++ {
		var sum float32
		for _, v := range x[6*r : 6*r+6] {
			sum += v
		}
		require.InDelta(t, sum/6, mean[r], 1e-5)
	}

	// pair: two inputs, a FixedSizeList-free tensor column and an int64 one.
	b := array.NewInt64Builder(memory.DefaultAllocator)
	a := make([]float32, 0, 50*3)
	for r := 0; r < 50; r++ {
		b.Append(int64(r % 5))
		a = append(a, float32(r), 1, -2)
	}
	out, _, err = e.exchange(ctx, modelDesc("pair"), record([]string{"b", "a"}, b.NewArray(), tensorColumn(t, a, 3)))
	require.NoError(t, err)
	prod := floats(t, out[0].Column(0))
	for r := 0; r < 50; r++ {
		for j := 0; j < 3; j++ {
			require.Equal(t, a[3*r+j]*float32(r%5), prod[3*r+j])
		}
	}

	// int_ops: no batching, the rows are the whole tensor.
	ib := array.NewInt64Builder(memory.DefaultAllocator)
	ib.AppendValues([]int64{1, -2, 7, 1 << 40}, nil)
	out, _, err = e.exchange(ctx, modelDesc("int_ops"), record([]string{"ids"}, ib.NewArray()))
	require.NoError(t, err)
	require.Equal(t, []int64{2, -4, 14, 1 << 41}, out[0].Column(0).(*array.Int64).Int64Values())
	require.Equal(t, []float32{0.5, -1, 3.5, float32(1<<40) * 0.5}, out[0].Column(1).(*array.Float32).Float32Values())
}

func TestExchangeErrors(t *testing.T) {
	e := start(t, kflight.Options{Models: kflight.ManagerModels(newManager(t))})
	ctx := ctxT(t)
	good := record([]string{"x"}, tensorColumn(t, rows4(0, 3), 4))
	f64 := array.NewFloat64Builder(memory.DefaultAllocator)
	f64.AppendValues([]float64{1, 2, 3, 4, 5, 6, 7, 8}, nil)
	f64vals := f64.NewArray()
	f64typ, _ := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float64, []int64{4})
	f64col, err := arrowio.NewFixedShapeTensorArray(f64typ, f64vals)
	require.NoError(t, err)
	nulls := array.NewInt64Builder(memory.DefaultAllocator)
	nulls.AppendValues([]int64{1, 2, 3, 4}, []bool{true, false, true, true})
	nullCol := nulls.NewArray()
	cases := []struct {
		name  string
		desc  *flight.FlightDescriptor
		rec   arrow.RecordBatch
		code  codes.Code
		parts []string
	}{
		{"unknown model", modelDesc("nope"), good, codes.NotFound, []string{"nope"}},
		{"unknown version", modelDesc("affine", "9"), good, codes.NotFound, nil},
		{"bad descriptor", &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "x"}}, good, codes.InvalidArgument, []string{`["models", NAME]`}},
		{"missing column", modelDesc("pair"), record([]string{"a"}, tensorColumn(t, []float32{1, 2, 3}, 3)), codes.InvalidArgument, []string{`missing input column "b"`}},
		{"wrong dtype", modelDesc("affine"), record([]string{"x"}, f64col), codes.InvalidArgument, []string{`"x"`, "FP32"}},
		{"wrong shape", modelDesc("affine"), record([]string{"x"}, tensorColumn(t, rows4(0, 2), 2, 4)), codes.InvalidArgument, []string{"[2,4]"}},
		{"too few stacked columns", modelDesc("affine"), record([]string{"a", "b"}, float32Array([]float32{1}), float32Array([]float32{2})), codes.InvalidArgument, []string{"feature width is 4"}},
		{"nulls", modelDesc("pair"), record([]string{"a", "b"}, tensorColumn(t, make([]float32, 12), 3), nullCol), codes.InvalidArgument, []string{"nulls"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := e.exchange(ctx, c.desc, c.rec)
			requireCode(t, err, c.code, c.parts...)
			// The server keeps serving.
			out, _, err := e.exchange(ctx, modelDesc("affine"), good)
			require.NoError(t, err)
			require.EqualValues(t, 3, out[0].NumRows())
		})
	}
	// Without models, DoExchange is unavailable; datasets still work.
	e2 := start(t, kflight.Options{})
	_, _, err = e2.exchange(ctx, modelDesc("affine"), good)
	requireCode(t, err, codes.Unavailable, "no model manager")
}

func TestExchangePermutedTensor(t *testing.T) {
	e := start(t, kflight.Options{Models: kflight.ManagerModels(newManager(t))})
	ctx := ctxT(t)
	// image takes [2,3] per row. Rows stored physically as [3,2] with
	// permutation [1,0] are logically [2,3]: logical (i,j) = physical (j,i).
	const rows = 20
	logical := make([]float32, rows*6)
	phys := make([]float32, rows*6)
	for r := 0; r < rows; r++ {
		for i := 0; i < 2; i++ {
			for j := 0; j < 3; j++ {
				v := float32(r*10 + i*3 + j)
				logical[r*6+i*3+j] = v
				phys[r*6+j*2+i] = v
			}
		}
	}
	permuted := func(shape []int64, perm ...int64) arrow.Array {
		typ, err := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float32, shape, arrowio.Permutation(perm...))
		require.NoError(t, err)
		v := float32Array(phys)
		defer v.Release()
		a, err := arrowio.NewFixedShapeTensorArray(typ, v)
		require.NoError(t, err)
		return a
	}
	out, _, err := e.exchange(ctx, modelDesc("image"), record([]string{"x"}, permuted([]int64{3, 2}, 1, 0)))
	require.NoError(t, err)
	flat := floats(t, out[0].Column(0))
	require.Len(t, flat, len(logical))
	for i := range logical {
		require.Equal(t, 2*logical[i], flat[i], "value %d", i)
	}
	// The same as sending the logical rows row-major.
	want, _, err := e.exchange(ctx, modelDesc("image"), record([]string{"x"}, tensorColumn(t, logical, 2, 3)))
	require.NoError(t, err)
	require.Equal(t, floats(t, want[0].Column(1)), floats(t, out[0].Column(1)))

	// A permutation whose logical shape does not fit is refused by that
	// shape, and the server keeps serving.
	_, _, err = e.exchange(ctx, modelDesc("image"), record([]string{"x"}, permuted([]int64{2, 3}, 1, 0)))
	requireCode(t, err, codes.InvalidArgument, "[3,2]")
	// An identity permutation is plain row-major.
	out, _, err = e.exchange(ctx, modelDesc("image"), record([]string{"x"}, permuted([]int64{2, 3}, 0, 1)))
	require.NoError(t, err)
	require.Equal(t, 2*phys[5], floats(t, out[0].Column(0))[5])
}

func TestExchangeCorruptIPC(t *testing.T) {
	e := start(t, kflight.Options{Models: kflight.ManagerModels(newManager(t))})
	ctx := ctxT(t)
	good := record([]string{"x"}, tensorColumn(t, rows4(0, 3), 4))
	msgs := messages(t, good)
	cases := map[string][]*flight.FlightData{
		"garbage header": {msgs[0], {DataHeader: []byte("not a flatbuffer message at all"), DataBody: []byte{1, 2, 3}}},
		"truncated body": {msgs[0], {DataHeader: msgs[1].DataHeader, DataBody: msgs[1].DataBody[:len(msgs[1].DataBody)/2]}},
		"garbage schema": {{DataHeader: []byte{0xff, 0xff, 0xff}}},
	}
	for name, seq := range cases {
		t.Run(name, func(t *testing.T) {
			stream, err := e.client.DoExchange(ctx)
			require.NoError(t, err)
			for i, m := range seq {
				m := &flight.FlightData{DataHeader: m.DataHeader, DataBody: m.DataBody}
				if i == 0 {
					m.FlightDescriptor = modelDesc("affine")
				}
				if err := stream.Send(m); err != nil {
					break
				}
			}
			require.NoError(t, stream.CloseSend())
			for err == nil {
				_, err = stream.Recv()
			}
			requireCode(t, err, codes.InvalidArgument)
			out, _, err := e.exchange(ctx, modelDesc("affine"), good)
			require.NoError(t, err)
			require.EqualValues(t, 3, out[0].NumRows())
		})
	}
}
