package flightserver

import (
	"bytes"
	"io"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	gproto "google.golang.org/protobuf/proto"
)

// split cuts raw into buffers of at most n bytes, as gRPC receives a
// message in HTTP/2 frames.
func split(raw []byte, n int) mem.BufferSlice {
	var s mem.BufferSlice
	for len(raw) > 0 {
		k := min(n, len(raw))
		s = append(s, mem.SliceBuffer(bytes.Clone(raw[:k])))
		raw = raw[k:]
	}
	return s
}

func TestFlightCodecDecodesLikeProtobuf(t *testing.T) {
	body := make([]byte, 3*minPooledBody+5)
	for i := range body {
		body[i] = byte(i * 7)
	}
	full := &flight.FlightData{
		FlightDescriptor: &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "x"}},
		DataHeader:       []byte("header bytes"),
		AppMetadata:      []byte("meta"),
		DataBody:         body,
	}
	std, err := gproto.Marshal(full)
	require.NoError(t, err)
	// Fields out of order, an unknown field of every wire type, and a
	// repeated header (the last wins).
	var odd []byte
	odd = protowire.AppendTag(odd, fdDataBody, protowire.BytesType)
	odd = protowire.AppendBytes(odd, []byte("small body"))
	odd = protowire.AppendTag(odd, 7, protowire.VarintType)
	odd = protowire.AppendVarint(odd, 300)
	odd = protowire.AppendTag(odd, 8, protowire.Fixed32Type)
	odd = protowire.AppendFixed32(odd, 1)
	odd = protowire.AppendTag(odd, 9, protowire.Fixed64Type)
	odd = protowire.AppendFixed64(odd, 2)
	odd = protowire.AppendTag(odd, 10, protowire.BytesType)
	odd = protowire.AppendBytes(odd, []byte("unknown"))
	odd = protowire.AppendTag(odd, fdDataHeader, protowire.BytesType)
	odd = protowire.AppendBytes(odd, []byte("first"))
	odd = protowire.AppendTag(odd, fdDataHeader, protowire.BytesType)
	odd = protowire.AppendBytes(odd, []byte("second"))

	codec := newFlightCodec()
	for name, raw := range map[string][]byte{"standard": std, "odd": odd, "empty": nil} {
		for _, frame := range []int{1, 7, 16 << 10, 1 << 30} {
			want := new(flight.FlightData)
			require.NoError(t, gproto.Unmarshal(raw, want))
			got := &flight.FlightData{DataHeader: []byte("stale")}
			require.NoError(t, codec.Unmarshal(split(raw, frame), got), "%s in frames of %d", name, frame)
			// (protobuf keeps unknown fields; the codec drops them.)
			require.True(t, gproto.Equal(want.FlightDescriptor, got.FlightDescriptor), "%s in frames of %d: %v", name, frame, got)
			require.Equal(t, string(want.DataHeader), string(got.DataHeader), "%s in frames of %d", name, frame)
			require.Equal(t, string(want.AppMetadata), string(got.AppMetadata), "%s in frames of %d", name, frame)
			require.True(t, bytes.Equal(want.DataBody, got.DataBody), "%s in frames of %d", name, frame)
		}
	}
	// Other messages go through the protobuf codec.
	var d flight.FlightDescriptor
	raw, _ := gproto.Marshal(full.FlightDescriptor)
	require.NoError(t, codec.Unmarshal(split(raw, 3), &d))
	require.Equal(t, []string{"datasets", "x"}, d.Path)
}

func TestFlightCodecRefusesMalformed(t *testing.T) {
	raw, err := gproto.Marshal(&flight.FlightData{DataHeader: []byte("h"), DataBody: make([]byte, 100)})
	require.NoError(t, err)
	codec := newFlightCodec()
	for _, bad := range [][]byte{
		raw[:len(raw)-1],   // body cut short
		raw[:len(raw)-100], // body missing
		{0x12},             // header without length
		{0x12, 0x05, 'a'},  // header cut short
		{0x80},             // truncated tag
		{0x00},             // field number 0
		protowire.AppendTag(nil, 4, protowire.StartGroupType),
		append(protowire.AppendTag(nil, fdDescriptor, protowire.BytesType), 2, 0xff, 0xff), // bad descriptor
	} {
		require.Error(t, codec.Unmarshal(split(bad, 2), new(flight.FlightData)), "%x", bad)
	}
}

func TestBodyPoolReuses(t *testing.T) {
	b := bodyPool.get(minPooledBody + 1)
	require.Len(t, b, minPooledBody+1)
	require.Equal(t, 2*minPooledBody, cap(b))
	bodyPool.put(b)
	small := bodyPool.get(100)
	require.Len(t, small, 100)
	bodyPool.put(small)                         // ignored: not pooled
	bodyPool.put(make([]byte, 3*minPooledBody)) // ignored: not a class size
	require.Len(t, bodyPool.get(3*minPooledBody), 3*minPooledBody)
}

// fakePut is a DoPut stream that delivers msgs as the codec decodes them:
// each body in a buffer of bodyPool.
type fakePut struct {
	flight.FlightService_DoPutServer
	msgs []*flight.FlightData
}

func (f *fakePut) Recv() (*flight.FlightData, error) {
	if len(f.msgs) == 0 {
		return nil, io.EOF
	}
	m := f.msgs[0]
	f.msgs = f.msgs[1:]
	body := bodyPool.get(len(m.DataBody))
	copy(body, m.DataBody)
	return &flight.FlightData{FlightDescriptor: m.FlightDescriptor, DataHeader: m.DataHeader, DataBody: body}, nil
}

type captured struct{ msgs []*flight.FlightData }

func (c *captured) Send(m *flight.FlightData) error {
	c.msgs = append(c.msgs, &flight.FlightData{FlightDescriptor: m.FlightDescriptor, DataHeader: bytes.Clone(m.DataHeader), DataBody: bytes.Clone(m.DataBody)})
	return nil
}

func TestPutReaderRecyclesBodiesOnlyWhenReleased(t *testing.T) {
	schema := arrow.NewSchema([]arrow.Field{{Name: "v", Type: arrow.PrimitiveTypes.Int64}}, nil)
	const rows = 3 * minPooledBody / 8 // bodies well above minPooledBody
	var recs []arrow.RecordBatch
	for i := range 4 {
		b := array.NewInt64Builder(memory.DefaultAllocator)
		for r := range rows {
			b.Append(int64(i*rows + r))
		}
		col := b.NewArray()
		recs = append(recs, array.NewRecordBatch(schema, []arrow.Array{col}, rows))
		col.Release()
	}
	var c captured
	w := flight.NewRecordWriter(&c, ipc.WithSchema(schema))
	w.SetFlightDescriptor(&flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "d"}})
	for _, r := range recs {
		require.NoError(t, w.Write(r))
	}
	require.NoError(t, w.Close())
	// A message of only app_metadata is skipped.
	stream := &fakePut{msgs: append(c.msgs[:2:2], append([]*flight.FlightData{{AppMetadata: []byte("m")}}, c.msgs[2:]...)...)}

	rdr, err := newPutReader(stream, memory.DefaultAllocator, headerLimits{}, nil)
	require.NoError(t, err)
	require.Equal(t, []string{"datasets", "d"}, rdr.LatestFlightDescriptor().GetPath())
	puts := func() int64 { return bodyPool.puts.Load() }
	read := func(i int) arrow.RecordBatch {
		rec, err := rdr.Read()
		require.NoError(t, err)
		require.True(t, array.RecordEqual(recs[i], rec), "batch %d", i)
		return rec
	}
	read(0)
	p := puts()
	read(1) // batch 0 dropped: its body goes back
	require.Equal(t, p+1, puts())
	held := read(2)
	held.Retain() // batch 1's body goes back, batch 2's is held
	require.Equal(t, p+2, puts())
	read(3)
	require.Equal(t, p+2, puts(), "a retained batch keeps its body")
	require.True(t, array.RecordEqual(recs[2], held))
	held.Release()
	require.Equal(t, p+3, puts())
	_, err = rdr.Read()
	require.ErrorIs(t, err, io.EOF)
	rdr.Release()
	require.Equal(t, p+4, puts())
}
