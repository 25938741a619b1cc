package flightserver

import (
	"encoding/binary"
	"io"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	gproto "google.golang.org/protobuf/proto"
)

// captureStream keeps the FlightData a flight.Writer sends.
type captureStream struct{ msgs []*flight.FlightData }

func (c *captureStream) Send(fd *flight.FlightData) error {
	c.msgs = append(c.msgs, gproto.Clone(fd).(*flight.FlightData))
	return nil
}

// flightMessages returns the FlightData of a stream of one schema and one
// record batch of n rows of (x float32, tags dictionary<string>,
// v fixed_size_list<float32>[2]), as Flight clients send them.
func flightMessages(t testing.TB, n int, opts ...ipc.Option) []*flight.FlightData {
	mem := memory.NewGoAllocator()
	dict := arrow.DictionaryType{IndexType: arrow.PrimitiveTypes.Int8, ValueType: arrow.BinaryTypes.String}
	schema := arrow.NewSchema([]arrow.Field{
		{Name: "x", Type: arrow.PrimitiveTypes.Float32},
		{Name: "tags", Type: &dict, Nullable: true},
		{Name: "v", Type: arrow.FixedSizeListOf(2, arrow.PrimitiveTypes.Float32)},
	}, nil)
	b := array.NewRecordBuilder(mem, schema)
	defer b.Release()
	for i := range n {
		b.Field(0).(*array.Float32Builder).Append(float32(i))
		require.NoError(t, b.Field(1).(*array.BinaryDictionaryBuilder).AppendString([]string{"a", "b"}[i%2]))
		lb := b.Field(2).(*array.FixedSizeListBuilder)
		lb.Append(true)
		lb.ValueBuilder().(*array.Float32Builder).AppendValues([]float32{1, 2}, nil)
	}
	rec := b.NewRecordBatch()
	defer rec.Release()
	var c captureStream
	w := flight.NewRecordWriter(&c, append([]ipc.Option{ipc.WithSchema(schema)}, opts...)...)
	require.NoError(t, w.Write(rec))
	require.NoError(t, w.Close())
	return c.msgs
}

// schemaFieldCount returns the position of the field count of a Schema
// message's fields vector.
func schemaFieldCount(t testing.TB, header []byte) int {
	b := fbuf(header)
	msg, err := b.root()
	require.NoError(t, err)
	kind, err := msg.byteField(1)
	require.NoError(t, err)
	require.Equal(t, byte(hdrSchema), kind)
	schema, ok, err := msg.subtable(2)
	require.True(t, ok)
	require.NoError(t, err)
	p, err := schema.ref(1)
	require.NoError(t, err)
	return p
}

func TestCheckIPCHeaderAcceptsArrowMessages(t *testing.T) {
	for _, opts := range [][]ipc.Option{nil, {ipc.WithLZ4()}, {ipc.WithZstd()}} {
		msgs := flightMessages(t, 100, opts...)
		require.GreaterOrEqual(t, len(msgs), 3) // schema, dictionary, batch
		for i, fd := range msgs {
			require.NoError(t, checkIPCHeader(fd.DataHeader, fd.DataBody, headerLimits{}), "message %d", i)
		}
	}
}

// A one-field Schema whose field count says 0x7fffffff made arrow-go's
// reader allocate about 176 GiB; DoPut and DoExchange must refuse it
// first (checkFlightData runs on every FlightData they receive).
func TestFlightCodecRefusesHugeSchemaFieldCount(t *testing.T) {
	msgs := flightMessages(t, 1)
	fd := msgs[0]
	p := schemaFieldCount(t, fd.DataHeader)
	require.Equal(t, uint32(3), binary.LittleEndian.Uint32(fd.DataHeader[p:]))
	for _, count := range []uint32{0x7fffffff, 1000} {
		bad := gproto.Clone(fd).(*flight.FlightData)
		binary.LittleEndian.PutUint32(bad.DataHeader[p:], count)
		raw, err := gproto.Marshal(bad)
		require.NoError(t, err)
		got := new(flight.FlightData)
		require.NoError(t, newFlightCodec().Unmarshal(split(raw, 4096), got))
		err = checkFlightData(got, headerLimits{})
		require.Equal(t, codes.InvalidArgument, status.Code(err), "count %#x: %v", count, err)
	}
}

func TestCheckIPCHeaderRefusesLies(t *testing.T) {
	msgs := flightMessages(t, 10)
	batch := msgs[len(msgs)-1]
	require.NoError(t, checkIPCHeader(batch.DataHeader, batch.DataBody, headerLimits{}))
	// The body cut short: the declared bodyLength and buffers exceed it.
	require.Error(t, checkIPCHeader(batch.DataHeader, batch.DataBody[:len(batch.DataBody)/2], headerLimits{}))
	// A record batch longer than the limit.
	require.Error(t, checkIPCHeader(batch.DataHeader, batch.DataBody, headerLimits{maxLength: 5}))
	// Fields beyond the limit.
	require.Error(t, checkIPCHeader(msgs[0].DataHeader, nil, headerLimits{maxFields: 2}))
	// Truncated headers never panic and are refused.
	for n := range len(batch.DataHeader) {
		_ = checkIPCHeader(batch.DataHeader[:n], batch.DataBody, headerLimits{})
	}
	require.Error(t, checkIPCHeader(nil, nil, headerLimits{}))
}

// FuzzFlightData decodes arbitrary FlightData wire messages with the
// Flight codec and, when the header passes checkFlightData, reads it as
// Arrow IPC: nothing may panic, and nothing accepted may make the Arrow
// reader allocate beyond what the message carries.
func FuzzFlightData(f *testing.F) {
	for _, opts := range [][]ipc.Option{nil, {ipc.WithLZ4()}} {
		for _, fd := range flightMessages(f, 3, opts...) {
			raw, err := gproto.Marshal(fd)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(raw)
		}
	}
	codec := newFlightCodec()
	lim := headerLimits{maxLength: 1 << 16, maxUncompressed: 1 << 20}
	f.Fuzz(func(t *testing.T, raw []byte) {
		fd := new(flight.FlightData)
		if err := codec.Unmarshal(split(raw, 64), fd); err != nil {
			return
		}
		if err := checkFlightData(fd, lim); err != nil {
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("error without INVALID_ARGUMENT: %v", err)
			}
			return
		}
		if len(fd.DataHeader) == 0 {
			return
		}
		msg := ipc.NewMessage(memory.NewBufferBytes(fd.DataHeader), memory.NewBufferBytes(fd.DataBody))
		defer msg.Release()
		if msg.Type() == ipc.MessageSchema {
			// Decoding the schema is what allocated from the field count.
			if r, err := ipc.NewReaderFromMessageReader(&oneMessage{msg: msg}); err == nil {
				r.Release()
			}
		}
	})
}

// FuzzFlightStream feeds a valid schema message then an arbitrary record
// batch message through the codec into arrow-go's IPC reader.
func FuzzFlightStream(f *testing.F) {
	msgs := flightMessages(f, 4)
	for _, fd := range msgs[1:] {
		raw, err := gproto.Marshal(fd)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
	}
	codec := newFlightCodec()
	lim := headerLimits{maxLength: 1 << 16, maxUncompressed: 1 << 20}
	schemaMsg := msgs[0]
	f.Fuzz(func(t *testing.T, raw []byte) {
		fd := new(flight.FlightData)
		if err := codec.Unmarshal(split(raw, 64), fd); err != nil || len(fd.DataHeader) == 0 {
			return
		}
		if checkFlightData(fd, lim) != nil {
			return
		}
		mr := &listMessages{msgs: []*ipc.Message{
			ipc.NewMessage(memory.NewBufferBytes(schemaMsg.DataHeader), memory.NewBufferBytes(schemaMsg.DataBody)),
			ipc.NewMessage(memory.NewBufferBytes(fd.DataHeader), memory.NewBufferBytes(fd.DataBody)),
		}}
		rdr, err := ipc.NewReaderFromMessageReader(mr, ipc.WithAllocator(memory.NewGoAllocator()))
		if err != nil {
			return
		}
		defer rdr.Release()
		for rdr.Next() {
			rec := rdr.RecordBatch()
			for _, col := range rec.Columns() {
				_ = col.Len()
			}
		}
	})
}

// oneMessage is an ipc.MessageReader of one message.
type oneMessage struct {
	msg  *ipc.Message
	done bool
}

func (o *oneMessage) Message() (*ipc.Message, error) {
	if o.done {
		return nil, io.EOF
	}
	o.done = true
	o.msg.Retain()
	return o.msg, nil
}
func (o *oneMessage) Retain()  {}
func (o *oneMessage) Release() {}

// listMessages is an ipc.MessageReader over a list of messages.
type listMessages struct{ msgs []*ipc.Message }

func (l *listMessages) Message() (*ipc.Message, error) {
	if len(l.msgs) == 0 {
		return nil, io.EOF
	}
	m := l.msgs[0]
	l.msgs = l.msgs[1:]
	return m, nil
}
func (l *listMessages) Retain()  {}
func (l *listMessages) Release() {}
