package flightserver

import (
	"context"
	"fmt"
	"testing"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
)

func affineColumn(t *testing.T, mem memory.Allocator, rows int) arrow.RecordBatch {
	t.Helper()
	b := array.NewFloat32Builder(mem)
	defer b.Release()
	for i := range rows * 4 {
		b.Append(float32(i))
	}
	vals := b.NewArray()
	defer vals.Release()
	typ, err := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float32, []int64{4})
	require.NoError(t, err)
	col, err := arrowio.NewFixedShapeTensorArray(typ, vals)
	require.NoError(t, err)
	defer col.Release()
	return array.NewRecordBatch(arrow.NewSchema([]arrow.Field{{Name: "x", Type: typ}}, nil), []arrow.Array{col}, int64(rows))
}

func affinePlan(t *testing.T, schema *arrow.Schema) *plan {
	t.Helper()
	cfg := &repository.Config{Name: "affine", MaxBatchSize: 8,
		Inputs:  []repository.TensorSpec{{Name: "x", DataType: repository.FP32, Dims: []int64{4}}},
		Outputs: []repository.TensorSpec{{Name: "y", DataType: repository.FP32, Dims: []int64{4}}}}
	p, err := newPlan("affine", cfg, schema)
	require.NoError(t, err)
	return p
}

// TestInputTensorSharesCMemory: a column in C memory becomes a tensor over
// the same bytes (a slice of it too, at its offset); one in Go memory is
// copied once.
func TestInputTensorSharesCMemory(t *testing.T) {
	cmem := arrowio.NewAllocator()
	for _, c := range []struct {
		name   string
		mem    memory.Allocator
		shared bool
	}{{"C memory", cmem, true}, {"Go memory", memory.NewGoAllocator(), false}} {
		t.Run(c.name, func(t *testing.T) {
			whole := affineColumn(t, c.mem, 20)
			defer whole.Release()
			rec := whole.NewSlice(3, 15)
			defer rec.Release()
			p := affinePlan(t, rec.Schema())
			x, err := p.inputs[0].tensor(rec)
			require.NoError(t, err)
			defer x.Close()
			require.Equal(t, []int64{12, 4}, x.Shape())
			got, err := core.CopyData[float32](x)
			require.NoError(t, err)
			for i, v := range got {
				require.Equal(t, float32(12+i), v) // row 3 starts at value 12
			}
			ptr, err := x.DataPtr()
			require.NoError(t, err)
			want := unsafe.Pointer(unsafe.SliceData(whole.Column(0).(*arrowio.FixedShapeTensorArray).ListStorage().ListValues().(*array.Float32).Float32Values()[12:]))
			require.Equal(t, c.shared, ptr == want, "tensor at %p, Arrow values at %p", ptr, want)
		})
	}
}

// TestExchangeReturnsBodies: the bodies the codec received into C memory
// all go back to bodyPool once the answers are sent, and no tensor stays
// alive, also when a stream fails mid-way.
func TestExchangeReturnsBodies(t *testing.T) {
	repo, err := repository.Open(testkit.Fixture(t, "flight-repo"))
	require.NoError(t, err)
	mgr := manager.New(repo, manager.Options{})
	require.NoError(t, mgr.Load("affine"))
	t.Cleanup(mgr.Close)
	srv, err := New(Options{DataDir: t.TempDir(), Addr: "127.0.0.1:0", Models: ManagerModels(mgr)})
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background()))
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	c, err := flight.NewClientWithMiddleware(srv.Addr().String(), nil, nil, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })

	live0, out0 := core.LiveTensors(), bodyPool.outstanding()
	for round := range 3 {
		stream, err := c.DoExchange(context.Background())
		require.NoError(t, err)
		recs := []arrow.RecordBatch{affineColumn(t, memory.DefaultAllocator, 8192), affineColumn(t, memory.DefaultAllocator, 20000)}
		w := flight.NewRecordWriter(stream, ipc.WithSchema(recs[0].Schema()))
		w.SetFlightDescriptor(&flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"models", "affine"}})
		for _, r := range recs {
			require.NoError(t, w.Write(r))
		}
		if round == 2 { // a batch whose body is cut short ends the stream
			msg := &flight.FlightData{DataHeader: []byte("not an IPC message"), DataBody: make([]byte, 100<<10)}
			require.NoError(t, stream.Send(msg))
		}
		require.NoError(t, stream.CloseSend())
		rdr, err := flight.NewRecordReader(stream)
		require.NoError(t, err)
		n := 0
		for rdr.Next() {
			n += int(rdr.RecordBatch().NumRows())
		}
		require.Equal(t, 28192, n, fmt.Sprintf("round %d: %v", round, rdr.Err()))
		if round == 2 {
			require.Error(t, rdr.Err())
		} else {
			require.NoError(t, rdr.Err())
		}
		rdr.Release()
	}
	// At most as many tensors as before: tensors of earlier tests may
	// still be released meanwhile (a retired model version's), never more.
	require.Eventually(t, func() bool {
		return bodyPool.outstanding() == out0 && core.LiveTensors() <= live0
	}, 10e9, 10e6, "bodies out %d (before %d), live tensors %d (before %d)", bodyPool.outstanding(), out0, core.LiveTensors(), live0)
}
