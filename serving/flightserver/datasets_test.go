package flightserver_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/kilnml/kiln/arrowio"
	kflight "github.com/kilnml/kiln/serving/flightserver"
)

// mixedBatch returns a batch of n rows, starting at row first, with a float
// column, an int column, a string column with nulls and a 2x2
// fixed_shape_tensor column.
func mixedBatch(t *testing.T, first, n int) arrow.RecordBatch {
	t.Helper()
	mem := memory.NewGoAllocator()
	tt, err := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float32, []int64{2, 2}, arrowio.DimNames("h", "w"))
	require.NoError(t, err)
	schema := arrow.NewSchema([]arrow.Field{
		{Name: "f", Type: arrow.PrimitiveTypes.Float32},
		{Name: "i", Type: arrow.PrimitiveTypes.Int64},
		{Name: "s", Type: arrow.BinaryTypes.String, Nullable: true},
		{Name: "t", Type: tt},
	}, func() *arrow.Metadata { m := arrow.NewMetadata([]string{"origin"}, []string{"test"}); return &m }())
	fb := array.NewFloat32Builder(mem)
	ib := array.NewInt64Builder(mem)
	sb := array.NewStringBuilder(mem)
	vb := array.NewFloat32Builder(mem)
	for r := first; r < first+n; r++ {
		fb.Append(float32(r) * 0.5)
		ib.Append(int64(r) * 1000003)
		if r%3 == 0 {
			sb.AppendNull()
		} else {
			sb.Append(strings.Repeat("x", r%7))
		}
		for k := 0; k < 4; k++ {
			vb.Append(float32(r*4 + k))
		}
	}
	vals := vb.NewArray()
	defer vals.Release()
	ta, err := arrowio.NewFixedShapeTensorArray(tt, vals)
	require.NoError(t, err)
	cols := []arrow.Array{fb.NewArray(), ib.NewArray(), sb.NewArray(), ta}
	rec := array.NewRecordBatch(schema, cols, int64(n))
	for _, c := range cols {
		c.Release()
	}
	return rec
}

func TestDatasetRoundTrip(t *testing.T) {
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	recs := []arrow.RecordBatch{mixedBatch(t, 0, 10), mixedBatch(t, 10, 7), mixedBatch(t, 17, 0), mixedBatch(t, 17, 25)}
	acks, err := e.put(ctx, "mixed", recs...)
	require.NoError(t, err)
	require.NotEmpty(t, acks)
	last := acks[len(acks)-1]
	require.True(t, last.Committed)
	require.Equal(t, kflight.PutProgress{Batches: 4, Rows: 42, Bytes: last.Bytes, Committed: true}, last)
	for i := 1; i < len(acks); i++ {
		require.GreaterOrEqual(t, acks[i].Batches, acks[i-1].Batches, "acks are cumulative")
	}

	// Listed, described, read back batch for batch.
	lf, err := e.client.ListFlights(ctx, &flight.Criteria{})
	require.NoError(t, err)
	var infos []*flight.FlightInfo
	for {
		fi, err := lf.Recv()
		if err != nil {
			break
		}
		infos = append(infos, fi)
	}
	require.Len(t, infos, 1)
	require.Equal(t, []string{"datasets", "mixed"}, infos[0].FlightDescriptor.Path)
	require.EqualValues(t, 42, infos[0].TotalRecords)
	st, err := os.Stat(filepath.Join(e.data, "mixed.arrow"))
	require.NoError(t, err)
	require.Equal(t, st.Size(), infos[0].TotalBytes)
	schema, err := flight.DeserializeSchema(infos[0].Schema, memory.DefaultAllocator)
	require.NoError(t, err)
	require.True(t, schema.Equal(recs[0].Schema()), "schema %v", schema)

	back := e.get(t, ctx, "mixed")
	require.Len(t, back, len(recs))
	for i := range recs {
		require.True(t, array.RecordEqual(recs[i], back[i]), "batch %d differs:\n%v\n%v", i, recs[i], back[i])
		require.True(t, back[i].Schema().Equal(recs[i].Schema()))
	}
	_, ok := back[0].Column(3).DataType().(*arrowio.FixedShapeTensorType)
	require.True(t, ok, "the tensor column comes back as fixed_shape_tensor")

	// The file on disk is a plain Arrow IPC file.
	f, err := os.Open(filepath.Join(e.data, "mixed.arrow"))
	require.NoError(t, err)
	defer f.Close()
	fr, err := ipc.NewFileReader(f)
	require.NoError(t, err)
	defer fr.Close()
	require.Equal(t, 4, fr.NumRecords())

	// A second put replaces the dataset atomically; a prefix filters.
	_, err = e.put(ctx, "mixed", mixedBatch(t, 100, 3))
	require.NoError(t, err)
	info, err := e.srv.Dataset("mixed")
	require.NoError(t, err)
	require.EqualValues(t, 3, info.Rows)
	_, err = e.put(ctx, "other", mixedBatch(t, 0, 1))
	require.NoError(t, err)
	lf, err = e.client.ListFlights(ctx, &flight.Criteria{Expression: []byte("oth")})
	require.NoError(t, err)
	fi, err := lf.Recv()
	require.NoError(t, err)
	require.Equal(t, "other", fi.FlightDescriptor.Path[1])
	_, err = lf.Recv()
	require.Error(t, err) // io.EOF: only one
}

func TestDatasetSummaryRecomputed(t *testing.T) {
	dir := t.TempDir()
	e := start(t, kflight.Options{DataDir: dir})
	ctx := ctxT(t)
	_, err := e.put(ctx, "d", mixedBatch(t, 0, 5), mixedBatch(t, 5, 6))
	require.NoError(t, err)
	// Without the summary file (or with a stale one), the counts come from
	// the data.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "d.meta.json"), []byte(`{"rows":999,"batches":2,"bytes":1}`), 0o644))
	e2 := start(t, kflight.Options{DataDir: dir})
	info, err := e2.client.GetFlightInfo(ctx, datasetDesc("d"))
	require.NoError(t, err)
	require.EqualValues(t, 11, info.TotalRecords)
}

func TestDatasetNames(t *testing.T) {
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	for _, name := range []string{"../escape", ".hidden", "a/b", "", "x\x00y", strings.Repeat("a", 129), "..", "a\\b"} {
		_, err := e.put(ctx, name, mixedBatch(t, 0, 1))
		requireCode(t, err, codes.InvalidArgument, "dataset name")
		_, err = e.client.GetFlightInfo(ctx, datasetDesc(name))
		requireCode(t, err, codes.InvalidArgument)
		_, err = e.client.DoGet(ctx, &flight.Ticket{Ticket: []byte("datasets/" + name)})
		if err == nil {
			stream, _ := e.client.DoGet(ctx, &flight.Ticket{Ticket: []byte("datasets/" + name)})
			_, err = stream.Recv()
		}
		requireCode(t, err, codes.InvalidArgument)
	}
	require.Empty(t, visibleFiles(t, e.data))
	_, err := os.Stat(filepath.Join(filepath.Dir(e.data), "escape.arrow"))
	require.True(t, os.IsNotExist(err))
	// Wrong descriptors.
	_, err = e.client.GetFlightInfo(ctx, &flight.FlightDescriptor{Type: flight.DescriptorCMD, Cmd: []byte("x")})
	requireCode(t, err, codes.InvalidArgument, "datasets")
	_, err = e.client.GetFlightInfo(ctx, datasetDesc("missing"))
	requireCode(t, err, codes.NotFound)
	stream, err := e.client.DoGet(ctx, &flight.Ticket{Ticket: []byte("datasets/missing")})
	require.NoError(t, err)
	_, err = stream.Recv()
	requireCode(t, err, codes.NotFound)
}

// capture records the FlightData messages a writer produces.
type capture struct{ msgs []*flight.FlightData }

func (c *capture) Send(d *flight.FlightData) error {
	c.msgs = append(c.msgs, d)
	return nil
}

// messages returns the FlightData of recs' schema followed by their batches.
func messages(t *testing.T, recs ...arrow.RecordBatch) []*flight.FlightData {
	t.Helper()
	var c capture
	w := flight.NewRecordWriter(&c, ipc.WithSchema(recs[0].Schema()))
	for _, r := range recs {
		require.NoError(t, w.Write(r))
	}
	require.NoError(t, w.Close())
	return c.msgs
}

func TestDoPutBrokenStreamsStoreNothing(t *testing.T) {
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	// An existing dataset that broken replacements must leave intact.
	good := []arrow.RecordBatch{mixedBatch(t, 0, 4)}
	_, err := e.put(ctx, "keep", good...)
	require.NoError(t, err)
	before := visibleFiles(t, e.data)

	msgs := messages(t, mixedBatch(t, 0, 3), mixedBatch(t, 3, 3))
	other := arrow.NewSchema([]arrow.Field{{Name: "z", Type: arrow.PrimitiveTypes.Int8}}, nil)
	otherMsgs := messages(t, array.NewRecordBatch(other, []arrow.Array{array.NewInt8Builder(memory.DefaultAllocator).NewArray()}, 0))
	truncated := &flight.FlightData{DataHeader: msgs[1].DataHeader, DataBody: msgs[1].DataBody[:len(msgs[1].DataBody)/3]}
	cases := map[string][]*flight.FlightData{
		"garbage header":   {msgs[0], msgs[1], {DataHeader: []byte("this is not a flatbuffer message at all"), DataBody: []byte{1, 2, 3}}},
		"truncated body":   {msgs[0], msgs[1], truncated},
		"schema change":    {msgs[0], msgs[1], otherMsgs[0], otherMsgs[1]},
		"garbage schema":   {{DataHeader: []byte{0xff, 0xff, 0xff}}},
		"no schema at all": {},
	}
	for name, seq := range cases {
		for _, target := range []string{"keep", "fresh"} {
			t.Run(name+"/"+target, func(t *testing.T) {
				stream, err := e.client.DoPut(ctx)
				require.NoError(t, err)
				for i, m := range seq {
					m := &flight.FlightData{DataHeader: m.DataHeader, DataBody: m.DataBody, AppMetadata: m.AppMetadata}
					if i == 0 {
						m.FlightDescriptor = datasetDesc(target)
					}
					if err := stream.Send(m); err != nil {
						break // the server may have failed the stream already
					}
				}
				require.NoError(t, stream.CloseSend())
				_, err = readAcks(stream)
				requireCode(t, err, codes.InvalidArgument)
				require.ElementsMatch(t, before, visibleFiles(t, e.data), "nothing partial stored")
			})
		}
	}
	back := e.get(t, ctx, "keep")
	require.Len(t, back, 1)
	require.True(t, array.RecordEqual(good[0], back[0]))
}

func TestDoPutClientDisconnect(t *testing.T) {
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := e.client.DoPut(cctx)
	require.NoError(t, err)
	w := flight.NewRecordWriter(stream, ipc.WithSchema(mixedBatch(t, 0, 1).Schema()))
	w.SetFlightDescriptor(datasetDesc("half"))
	for i := 0; i < 3; i++ {
		require.NoError(t, w.Write(mixedBatch(t, i*10, 10)))
	}
	// Wait until the server has made some batches durable, then go away.
	res, err := stream.Recv()
	require.NoError(t, err)
	require.Contains(t, string(res.GetAppMetadata()), `"batches"`)
	cancel()
	// The server notices, removes its temporary file, and lists nothing.
	deadline := time.Now().Add(time.Minute)
	for len(visibleFiles(t, e.data)) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	require.Empty(t, visibleFiles(t, e.data))
	infos, err := e.srv.Datasets()
	require.NoError(t, err)
	require.Empty(t, infos)
	// And keeps serving.
	_, err = e.put(ctx, "whole", mixedBatch(t, 0, 2))
	require.NoError(t, err)
	require.Len(t, e.get(t, ctx, "whole"), 1)
}

func TestDoPutManyBatchesUnreadAcks(t *testing.T) {
	// A client that reads no acknowledgement until the end (as pyarrow's
	// writer does) must not stall the upload, however many batches.
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	schema := arrow.NewSchema([]arrow.Field{{Name: "v", Type: arrow.PrimitiveTypes.Int32}}, nil)
	b := array.NewInt32Builder(memory.DefaultAllocator)
	b.AppendValues([]int32{1, 2, 3}, nil)
	col := b.NewArray()
	rec := array.NewRecordBatch(schema, []arrow.Array{col}, 3)
	recs := make([]arrow.RecordBatch, 3000)
	for i := range recs {
		recs[i] = rec
	}
	acks, err := e.put(ctx, "many", recs...)
	require.NoError(t, err)
	require.Equal(t, kflight.PutProgress{Batches: 3000, Rows: 9000, Bytes: acks[len(acks)-1].Bytes, Committed: true}, acks[len(acks)-1])
}

func TestDoPutLargeBatchesConcurrently(t *testing.T) {
	// Bodies of these sizes are decoded into recycled buffers: streams
	// running at once, batch after batch, must each store exactly their
	// own bytes.
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	schema := arrow.NewSchema([]arrow.Field{{Name: "v", Type: arrow.PrimitiveTypes.Float64}, {Name: "s", Type: arrow.BinaryTypes.String}}, nil)
	batches := func(seed, n, rows int) []arrow.RecordBatch {
		out := make([]arrow.RecordBatch, n)
		for i := range out {
			vb := array.NewFloat64Builder(memory.DefaultAllocator)
			sb := array.NewStringBuilder(memory.DefaultAllocator)
			for r := 0; r < rows; r++ {
				vb.Append(float64(seed*1e9 + i*1e6 + r))
				sb.Append(fmt.Sprintf("%d-%d-%d", seed, i, r))
			}
			v, s := vb.NewArray(), sb.NewArray()
			out[i] = array.NewRecordBatch(schema, []arrow.Array{v, s}, int64(rows))
			v.Release()
			s.Release()
		}
		return out
	}
	const streams = 4
	sent := make([][]arrow.RecordBatch, streams)
	errs := make(chan error, streams)
	for k := range streams {
		sent[k] = batches(k, 6, 20000+k*3000) // 0.4 to 0.7 MB per batch
		go func() {
			_, err := e.put(ctx, fmt.Sprintf("big%d", k), sent[k]...)
			errs <- err
		}()
	}
	for range streams {
		require.NoError(t, <-errs)
	}
	for k := range streams {
		back := e.get(t, ctx, fmt.Sprintf("big%d", k))
		require.Len(t, back, len(sent[k]))
		for i := range back {
			require.True(t, array.RecordEqual(sent[k][i], back[i]), "stream %d batch %d", k, i)
		}
	}
}

// lyingBatch returns a batch of a 4-row string column "s" (with a valid
// int32 column "n" beside it) whose IPC field node will declare nulls
// nulls, while its validity bitmap marks rows 1 and 3 null: arrow-go's
// writer sends the null count an array claims.
func lyingBatch(t *testing.T, nulls int) arrow.RecordBatch {
	t.Helper()
	mem := memory.DefaultAllocator
	sb := array.NewStringBuilder(mem)
	defer sb.Release()
	sb.AppendValues([]string{"a", "", "c", ""}, []bool{true, false, true, false})
	good := sb.NewStringArray()
	defer good.Release()
	d := good.Data()
	lying := array.NewData(d.DataType(), d.Len(), d.Buffers(), nil, nulls, d.Offset())
	defer lying.Release()
	s := array.MakeFromData(lying)
	defer s.Release()
	nb := array.NewInt32Builder(mem)
	defer nb.Release()
	nb.AppendValues([]int32{1, 2, 3, 4}, nil)
	n := nb.NewArray()
	defer n.Release()
	schema := arrow.NewSchema([]arrow.Field{{Name: "n", Type: arrow.PrimitiveTypes.Int32}, {Name: "s", Type: arrow.BinaryTypes.String, Nullable: true}}, nil)
	return array.NewRecordBatch(schema, []arrow.Array{n, s}, 4)
}

// A batch whose null count contradicts its validity bitmap is refused
// with INVALID_ARGUMENT naming the column, and nothing of its stream is
// stored, not even the good batches before it: a DoPut stores a whole
// stream or nothing.
func TestDoPutRefusesLyingNullCount(t *testing.T) {
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	// The honest batch is stored.
	honest := lyingBatch(t, 2)
	_, err := e.put(ctx, "honest", honest)
	require.NoError(t, err)
	back := e.get(t, ctx, "honest")
	require.Len(t, back, 1)
	require.NoError(t, array.ValidateRecordFull(back[0]))
	before := visibleFiles(t, e.data)
	for _, nulls := range []int{99, 5, 1, 3} {
		t.Run(fmt.Sprint(nulls), func(t *testing.T) {
			_, err := e.put(ctx, "lying", lyingBatch(t, 2), lyingBatch(t, nulls), lyingBatch(t, 2))
			requireCode(t, err, codes.InvalidArgument, `column "s"`, "null")
			require.ElementsMatch(t, before, visibleFiles(t, e.data), "nothing of the stream stored")
		})
	}
}
