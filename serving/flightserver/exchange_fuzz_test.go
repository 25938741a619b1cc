package flightserver

import (
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/serving/repository"
)

// exchangeCase is a model configuration and a record batch of inputs that
// fits it, as DoExchange receives them.
type exchangeCase struct {
	cfg *repository.Config
	rec arrow.RecordBatch
}

// exchangeCases returns one case per way DoExchange maps columns to
// inputs: a FixedSizeList column, a permuted fixed_shape_tensor, stacked
// feature columns, a plain column for a [1] input, and the rows as the
// first dimension of a model without batching.
func exchangeCases(t testing.TB) []exchangeCase {
	mem := memory.NewGoAllocator()
	in := func(name string, dt repository.DataType, dims ...int64) repository.TensorSpec {
		return repository.TensorSpec{Name: name, DataType: dt, Dims: dims}
	}
	cfg := func(maxBatch int, inputs ...repository.TensorSpec) *repository.Config {
		return &repository.Config{Name: "m", MaxBatchSize: maxBatch, Inputs: inputs,
			Outputs: []repository.TensorSpec{in("y", repository.FP32, 1)}}
	}
	f32 := func(n int) arrow.Array {
		b := array.NewFloat32Builder(mem)
		defer b.Release()
		for i := range n {
			b.Append(float32(i) / 2)
		}
		return b.NewArray()
	}
	fsl := func(elem arrow.Array, k int32) arrow.Array {
		d := array.NewData(arrow.FixedSizeListOf(k, elem.DataType()), elem.Len()/int(k), []*memory.Buffer{nil}, []arrow.ArrayData{elem.Data()}, 0, 0)
		defer d.Release()
		return array.MakeFromData(d)
	}
	rec := func(names []string, cols ...arrow.Array) arrow.RecordBatch {
		fields := make([]arrow.Field, len(cols))
		for i, c := range cols {
			fields[i] = arrow.Field{Name: names[i], Type: c.DataType()}
		}
		return array.NewRecordBatch(arrow.NewSchema(fields, nil), cols, int64(cols[0].Len()))
	}
	tt, err := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float32, []int64{2, 3}, arrowio.Permutation(1, 0))
	require.NoError(t, err)
	tensor, err := arrowio.NewFixedShapeTensorArray(tt, f32(4*6))
	require.NoError(t, err)
	ib := array.NewInt64Builder(mem)
	ib.AppendValues([]int64{1, 2, 3, 4, 5, 6}, nil)
	ints := ib.NewArray()
	fb := array.NewFloat64Builder(mem)
	fb.AppendValues([]float64{1, 2, 3}, nil)
	f64 := fb.NewArray()
	return []exchangeCase{
		{cfg(8, in("x", repository.FP32, 3)), rec([]string{"x"}, fsl(f32(12), 3))},
		{cfg(8, in("x", repository.FP32, 3, 2)), rec([]string{"x"}, tensor)},
		{cfg(8, in("input", repository.FP32, 2)), rec([]string{"a", "b"}, f32(5), f32(5))},
		{cfg(8, in("x", repository.FP64, 1)), rec([]string{"x"}, f64)},
		{cfg(0, in("x", repository.Int64, -1, 2)), rec([]string{"x"}, fsl(ints, 2))},
	}
}

// FuzzExchangeInputs feeds an arbitrary record batch message, after a
// case's schema, through what DoExchange does with it before the model:
// the FlightData header check, arrow-go's IPC reader, validateRecord, the
// column-to-input plan and gather. Nothing may panic; every refusal is
// INVALID_ARGUMENT; an accepted input holds exactly rows × per-row
// elements of its datatype, the bytes the batcher copies.
func FuzzExchangeInputs(f *testing.F) {
	cases := exchangeCases(f)
	type msgs struct{ schema, batch *flight.FlightData }
	var ms []msgs
	for i, c := range cases {
		var cs captureStream
		w := flight.NewRecordWriter(&cs, ipc.WithSchema(c.rec.Schema()))
		if err := w.Write(c.rec); err != nil {
			f.Fatal(err)
		}
		if err := w.Close(); err != nil {
			f.Fatal(err)
		}
		if len(cs.msgs) != 2 {
			f.Fatalf("case %d: %d messages", i, len(cs.msgs))
		}
		ms = append(ms, msgs{cs.msgs[0], cs.msgs[1]})
		f.Add(uint8(i), cs.msgs[1].DataHeader, cs.msgs[1].DataBody)
	}
	lim := headerLimits{maxLength: 1 << 16, maxUncompressed: 1 << 20}
	f.Fuzz(func(t *testing.T, which uint8, header, body []byte) {
		k := int(which) % len(cases)
		c, m := cases[k], ms[k]
		if checkFlightData(&flight.FlightData{DataHeader: header, DataBody: body}, lim) != nil {
			return
		}
		mr := &listMessages{msgs: []*ipc.Message{
			ipc.NewMessage(memory.NewBufferBytes(m.schema.DataHeader), memory.NewBufferBytes(m.schema.DataBody)),
			ipc.NewMessage(memory.NewBufferBytes(header), memory.NewBufferBytes(body)),
		}}
		rdr, err := ipc.NewReaderFromMessageReader(mr, ipc.WithAllocator(memory.NewGoAllocator()))
		if err != nil {
			return
		}
		defer rdr.Release()
		for rdr.Next() {
			rec := rdr.RecordBatch()
			if validateRecord(rec) != nil {
				continue
			}
			p, err := newPlan("m", c.cfg, rec.Schema())
			if err != nil {
				requireInvalid(t, err)
				continue
			}
			for _, src := range p.inputs {
				b, err := src.gather(rec)
				if err != nil {
					requireInvalid(t, err)
					continue
				}
				want := rec.NumRows() * src.rowElems * int64(src.dt.Size())
				if int64(len(b)) != want {
					t.Fatalf("case %d input %q: %d bytes for %d rows of %d elements", k, src.name, len(b), rec.NumRows(), src.rowElems)
				}
			}
		}
	})
}

func requireInvalid(t *testing.T, err error) {
	t.Helper()
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("refused without INVALID_ARGUMENT: %v", err)
	}
}

// The seeds themselves are accepted: each case's batch becomes its
// inputs.
func TestExchangeCasesGather(t *testing.T) {
	for i, c := range exchangeCases(t) {
		p, err := newPlan("m", c.cfg, c.rec.Schema())
		require.NoError(t, err, "case %d", i)
		require.NoError(t, validateRecord(c.rec), "case %d", i)
		for _, src := range p.inputs {
			b, err := src.gather(c.rec)
			require.NoError(t, err, "case %d", i)
			require.EqualValues(t, c.rec.NumRows()*src.rowElems*int64(src.dt.Size()), len(b), "case %d", i)
		}
	}
}
