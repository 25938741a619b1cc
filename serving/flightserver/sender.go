package flightserver

import (
	"bytes"
	"sync/atomic"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
)

// minSharedPart is the smallest piece of a record batch body that an
// outgoing FlightData references instead of copying: smaller pieces (and
// every piece gRPC would not count references of, see
// mem.IsBelowBufferPoolingThreshold) are copied into the message's own
// bytes.
const minSharedPart = 16 << 10

// payloadSender is an ipc.PayloadWriter that sends each IPC message of a
// DoExchange answer as a FlightData without copying the record batch's
// buffers: the message (an outMessage, which flightCodec marshals) holds
// the body's pieces as they lie in the batch's Arrow buffers, and a
// reference on the batch that gRPC drops once it has written them to the
// connection. arrow-go's flight.Writer copies each body twice instead: into
// a bytes.Buffer, then into the marshalled protobuf message.
type payloadSender struct {
	stream grpc.ServerStream
	rec    arrow.RecordBatch // the batch being written (see write)
	meta   []byte            // its app_metadata
}

func (p *payloadSender) Start() error { return nil }
func (p *payloadSender) Close() error { return nil }

// write writes rec through w, the ipc.Writer over p, each of its messages
// with app_metadata meta (as flight.Writer.WriteWithAppMetadata does).
func (p *payloadSender) write(w *ipc.Writer, rec arrow.RecordBatch, meta []byte) error {
	p.rec, p.meta = rec, meta
	defer func() { p.rec, p.meta = nil, nil }()
	return w.Write(rec)
}

// WritePayload sends one IPC message.
func (p *payloadSender) WritePayload(pl ipc.Payload) error {
	m := pl.Meta()
	msg := &outMessage{header: bytes.Clone(m.Bytes()), meta: p.meta}
	m.Release()
	var body bodyPieces
	if err := pl.SerializeBody(&body); err != nil {
		return err
	}
	msg.size = body.n
	if p.rec != nil && body.within(p.rec) {
		p.rec.Retain()
		msg.parts, msg.release = body.parts, p.rec.Release
	} else {
		// Buffers the IPC writer made for this message (which it frees
		// when this returns): one copy.
		b := make([]byte, 0, body.n)
		for _, part := range body.parts {
			b = append(b, part...)
		}
		msg.parts = [][]byte{b}
	}
	return p.stream.SendMsg(msg)
}

// bodyPieces collects the slices an ipc.Payload's SerializeBody writes,
// without copying them.
type bodyPieces struct {
	parts [][]byte
	n     int
}

func (b *bodyPieces) Write(p []byte) (int, error) {
	b.parts = append(b.parts, p[:len(p):len(p)])
	b.n += len(p)
	return len(p), nil
}

// within reports whether every large piece lies within a buffer of rec
// (so that holding rec keeps it valid); smaller pieces are copied anyway.
func (b *bodyPieces) within(rec arrow.RecordBatch) bool {
	var spans [][2]uintptr
	var add func(d arrow.ArrayData)
	add = func(d arrow.ArrayData) {
		for _, buf := range d.Buffers() {
			if buf != nil && buf.Len() > 0 {
				s := uintptr(unsafe.Pointer(unsafe.SliceData(buf.Bytes())))
				spans = append(spans, [2]uintptr{s, s + uintptr(buf.Len())})
			}
		}
		for _, c := range d.Children() {
			add(c)
		}
		if d.DataType().ID() == arrow.DICTIONARY {
			add(d.Dictionary())
		}
	}
	for _, col := range rec.Columns() {
		add(col.Data())
	}
next:
	for _, p := range b.parts {
		if len(p) < minSharedPart {
			continue
		}
		s := uintptr(unsafe.Pointer(unsafe.SliceData(p)))
		for _, sp := range spans {
			if sp[0] <= s && s+uintptr(len(p)) <= sp[1] {
				continue next
			}
		}
		return false
	}
	return true
}

// outMessage is a FlightData to send, with its body in pieces: flightCodec
// marshals it into a mem.BufferSlice that references the large pieces
// rather than copying them, and runs release once gRPC has dropped them.
type outMessage struct {
	header, meta []byte
	parts        [][]byte
	size         int
	release      func() // nil: the pieces need no release
}

// marshal returns the FlightData's protobuf wire format (data_header,
// app_metadata, data_body: the fields FlightData's own marshalling writes,
// in its order) as buffers.
func (m *outMessage) marshal() mem.BufferSlice {
	head := make([]byte, 0, len(m.header)+len(m.meta)+32)
	head = protowire.AppendTag(head, fdDataHeader, protowire.BytesType)
	head = protowire.AppendBytes(head, m.header)
	if len(m.meta) > 0 {
		head = protowire.AppendTag(head, fdAppMetadata, protowire.BytesType)
		head = protowire.AppendBytes(head, m.meta)
	}
	if m.size > 0 {
		head = protowire.AppendTag(head, fdDataBody, protowire.BytesType)
		head = protowire.AppendVarint(head, uint64(m.size))
	}
	out := mem.BufferSlice{mem.SliceBuffer(head)}
	var shared []int
	for i, p := range m.parts {
		if len(p) >= minSharedPart && m.release != nil && !mem.IsBelowBufferPoolingThreshold(len(p)) {
			shared = append(shared, i)
		}
	}
	var rel *releaseOnPut
	if len(shared) > 0 {
		rel = &releaseOnPut{release: m.release}
		rel.left.Store(int32(len(shared)))
	} else if m.release != nil {
		defer m.release() // every piece is copied below
	}
	var small []byte
	for i, p := range m.parts {
		if len(shared) > 0 && shared[0] == i {
			shared = shared[1:]
			if len(small) > 0 {
				out = append(out, mem.SliceBuffer(small))
				small = nil
			}
			out = append(out, mem.NewBuffer(&p, rel))
			continue
		}
		small = append(small, p...)
	}
	if len(small) > 0 {
		out = append(out, mem.SliceBuffer(small))
	}
	return out
}

// releaseOnPut is the mem.BufferPool of the pieces of one outMessage that
// gRPC holds: once it has put them all back, the message's release runs.
type releaseOnPut struct {
	left    atomic.Int32
	release func()
}

func (r *releaseOnPut) Get(int) *[]byte {
	panic("flightserver: releaseOnPut is not a pool to get from")
}

func (r *releaseOnPut) Put(*[]byte) {
	if r.left.Add(-1) == 0 {
		r.release()
	}
}
