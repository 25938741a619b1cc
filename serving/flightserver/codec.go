package flightserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	gproto "google.golang.org/protobuf/proto"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/serving/limits"
)

// FlightData field numbers (Flight.proto).
const (
	fdDescriptor  = 1
	fdDataHeader  = 2
	fdAppMetadata = 3
	fdDataBody    = 1000
)

// flightCodec is the Flight server's gRPC codec. It decodes FlightData
// itself, copying the record batch body once, straight from the buffers
// gRPC received it in into a pooled buffer (see bodyPool), where the
// protobuf codec would first gather the whole message into one buffer and
// then copy the body out of it into a freshly zeroed one. Every other
// message, and every message it sends, goes through the protobuf codec.
type flightCodec struct{ proto encoding.CodecV2 }

func newFlightCodec() flightCodec { return flightCodec{proto: encoding.GetCodecV2(proto.Name)} }

func (c flightCodec) Name() string { return proto.Name }

func (c flightCodec) Marshal(v any) (mem.BufferSlice, error) {
	if m, ok := v.(*outMessage); ok {
		return m.marshal(), nil
	}
	return c.proto.Marshal(v)
}

func (c flightCodec) Unmarshal(data mem.BufferSlice, v any) error {
	fd, ok := v.(*flight.FlightData)
	if !ok {
		return c.proto.Unmarshal(data, v)
	}
	r := data.Reader()
	defer r.Close()
	if err := unmarshalFlightData(r, fd); err != nil {
		bodyPool.put(fd.DataBody)
		fd.DataBody = nil
		return fmt.Errorf("decoding FlightData: %w", err)
	}
	return nil
}

var errTruncated = errors.New("truncated message")

// unmarshalFlightData decodes the protobuf wire format of a FlightData
// message from r, as proto.Unmarshal would: fields may come in any order,
// the last of a repeated field wins, unknown fields are skipped.
func unmarshalFlightData(r *mem.Reader, fd *flight.FlightData) error {
	gproto.Reset(fd)
	readBytes := func(n uint64) ([]byte, error) {
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, errTruncated
		}
		return b, nil
	}
	for r.Remaining() > 0 {
		tag, err := binary.ReadUvarint(r)
		if err != nil {
			return errTruncated
		}
		num, typ := protowire.Number(tag>>3), protowire.Type(tag&7)
		if !num.IsValid() {
			return fmt.Errorf("invalid field number %d", num)
		}
		switch typ {
		case protowire.VarintType:
			if _, err := binary.ReadUvarint(r); err != nil {
				return errTruncated
			}
			continue
		case protowire.Fixed32Type, protowire.Fixed64Type:
			n := 4
			if typ == protowire.Fixed64Type {
				n = 8
			}
			if d, _ := r.Discard(n); d != n {
				return errTruncated
			}
			continue
		case protowire.BytesType:
		default:
			return fmt.Errorf("field %d has unsupported wire type %d", num, typ)
		}
		n, err := binary.ReadUvarint(r)
		if err != nil {
			return errTruncated
		}
		if n > uint64(r.Remaining()) {
			return errTruncated
		}
		switch num {
		case fdDescriptor:
			b, err := readBytes(n)
			if err != nil {
				return err
			}
			d := new(flight.FlightDescriptor)
			if err := gproto.Unmarshal(b, d); err != nil {
				return fmt.Errorf("flight_descriptor: %w", err)
			}
			fd.FlightDescriptor = d
		case fdDataHeader:
			if fd.DataHeader, err = readBytes(n); err != nil {
				return err
			}
		case fdAppMetadata:
			if fd.AppMetadata, err = readBytes(n); err != nil {
				return err
			}
		case fdDataBody:
			bodyPool.put(fd.DataBody) // a repeated field: the last wins
			fd.DataBody = bodyPool.get(int(n))
			if _, err := io.ReadFull(r, fd.DataBody); err != nil {
				return errTruncated
			}
		default:
			if d, _ := r.Discard(int(n)); uint64(d) != n {
				return errTruncated
			}
		}
	}
	return nil
}

// minPooledBody is the smallest body kept in bodyPool; smaller ones are
// ordinary Go allocations.
const minPooledBody = 64 << 10

// maxKeptBodyBytes bounds the idle bodies bodyPool keeps for reuse; a body
// given back beyond it is freed.
const maxKeptBodyBytes = 128 << 20

// sizedPools recycles record batch bodies of C memory (an arrowio
// Allocator's: malloc'd, 64-byte aligned, known to arrowio) by
// power-of-two capacity, so that a long DoPut or DoExchange stream reuses a
// few buffers instead of allocating (and faulting in) a new one per batch,
// and so that DoExchange hands the columns of a batch to libtorch without
// copying them (arrowio.ArrayToTensor shares C memory it knows of). C
// memory is not garbage collected: every body get returns must come back
// through put (the readers do it when the last Arrow buffer slicing the
// body is released); put frees what it does not keep. Bodies under
// minPooledBody are Go slices, which put ignores.
type sizedPools struct {
	alloc *arrowio.Allocator

	mu   sync.Mutex
	free [48][][]byte
	kept int64
	live map[uintptr]struct{} // bodies handed out by get, by address

	puts atomic.Int64 // buffers given back, for tests
}

var bodyPool = sizedPools{alloc: arrowio.NewAllocator(), live: map[uintptr]struct{}{}}

func poolClass(n int) int { return bits.Len(uint(n - 1)) }

func addr(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// get returns a slice of length n; its contents are arbitrary.
func (p *sizedPools) get(n int) []byte {
	if n < minPooledBody {
		return make([]byte, n)
	}
	c := poolClass(n)
	p.mu.Lock()
	defer p.mu.Unlock()
	var b []byte
	if k := len(p.free[c]); k > 0 {
		b = p.free[c][k-1]
		p.free[c] = p.free[c][:k-1]
		p.kept -= int64(cap(b))
	} else {
		b = p.alloc.Allocate(1 << c)
	}
	p.live[addr(b)] = struct{}{}
	return b[:n]
}

// put gives b, a body that get returned, back for reuse; nothing may use it
// afterwards. Slices get did not return (Go memory, other C memory) are
// left alone.
func (p *sizedPools) put(b []byte) {
	c := cap(b)
	if c < minPooledBody || c&(c-1) != 0 {
		return // not one of ours
	}
	b = b[:c]
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.live[addr(b)]; !ok {
		return
	}
	delete(p.live, addr(b))
	p.puts.Add(1)
	if p.kept+int64(c) > maxKeptBodyBytes {
		p.alloc.Free(b)
		return
	}
	p.kept += int64(c)
	p.free[poolClass(c)] = append(p.free[poolClass(c)], b)
}

// outstanding returns the number of bodies handed out and not given back,
// for tests.
func (p *sizedPools) outstanding() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.live)
}

// poolAllocator frees the bodies of bodyPool back to it; it allocates like
// bodyPool too, but only Free is used (see pooledMessageReader).
type poolAllocator struct{}

func (poolAllocator) Allocate(n int) []byte { return bodyPool.get(n) }

func (poolAllocator) Reallocate(n int, b []byte) []byte {
	if n <= cap(b) {
		return b[:n]
	}
	nb := bodyPool.get(n)
	copy(nb, b)
	bodyPool.put(b)
	return nb
}

func (poolAllocator) Free(b []byte) { bodyPool.put(b) }

// pooledMessageReader reads the IPC messages of a DoPut stream like
// flight.NewRecordReader's, but hands each body back to bodyPool once the
// last Arrow buffer slicing it is released, so batches that are dropped
// after use (as DoPut drops them once written) recycle their memory.
//
// Each message is admitted by its size through gate after its header is
// checked and before Arrow decodes it, and holds its bytes until the next
// message is read (DoPut has written the batch by then) or the reader is
// released; a message the gate refuses is a RESOURCE_EXHAUSTED error.
type pooledMessageReader struct {
	stream   recvStream
	msg      *ipc.Message
	descr    *flight.FlightDescriptor
	meta     []byte // the app_metadata of msg
	refCount int64
	lim      headerLimits
	gate     *limits.Gate
	held     int64 // admitted for msg
	checked  bool  // stream checks and admits messages itself (checkedStream)
}

// recvStream is the receiving side of a DoPut or DoExchange stream.
type recvStream interface {
	Recv() (*flight.FlightData, error)
}

func (d *pooledMessageReader) Message() (*ipc.Message, error) {
	if d.msg != nil {
		d.msg.Release()
		d.msg = nil
	}
	d.gate.Release(d.held)
	d.held = 0
	var fd *flight.FlightData
	for {
		var err error
		if fd, err = d.stream.Recv(); err != nil {
			return nil, err
		}
		if d.checked {
			if fd.FlightDescriptor != nil {
				d.descr = fd.FlightDescriptor
			}
			if len(fd.DataHeader) > 0 {
				break
			}
			bodyPool.put(fd.DataBody)
			continue
		}
		if err := checkFlightData(fd, d.lim); err != nil {
			bodyPool.put(fd.DataBody)
			return nil, err
		}
		if n := flightDataBytes(fd); !d.gate.Acquire(n) {
			bodyPool.put(fd.DataBody)
			return nil, d.gate.Busy(n)
		} else if len(fd.DataHeader) == 0 {
			d.gate.Release(n) // dropped below
		} else {
			d.held = n
		}
		if fd.FlightDescriptor != nil {
			d.descr = fd.FlightDescriptor
		}
		if len(fd.DataHeader) > 0 {
			break
		}
		// A message of only a descriptor or app_metadata carries no
		// IPC message (as Flight's own readers treat it).
		bodyPool.put(fd.DataBody)
	}
	d.meta = fd.AppMetadata
	body := memory.NewBufferWithAllocator(fd.DataBody, poolAllocator{})
	d.msg = ipc.NewMessage(memory.NewBufferBytes(fd.DataHeader), body)
	body.Release() // the message holds it now
	return d.msg, nil
}

func (d *pooledMessageReader) Retain() { d.refCount++ }

func (d *pooledMessageReader) Release() {
	if d.refCount--; d.refCount == 0 {
		if d.msg != nil {
			d.msg.Release()
			d.msg = nil
		}
		d.gate.Release(d.held)
		d.held = 0
	}
}

// putReader reads the record batches of a DoPut stream.
type putReader struct {
	*ipc.Reader
	mr *pooledMessageReader
}

// newPutReader reads a DoPut stream's schema; the batches it returns are
// valid until the next Read.
//
// Every message's IPC header is checked against its body within lim
// (checkFlightData), and the message admitted through gate, before the
// Arrow reader decodes it.
func newPutReader(stream flight.FlightService_DoPutServer, mem memory.Allocator, lim headerLimits, gate *limits.Gate) (*putReader, error) {
	// One reference for the putReader, one for the ipc.Reader.
	mr := &pooledMessageReader{stream: stream, refCount: 2, lim: lim, gate: gate}
	rdr, err := ipc.NewReaderFromMessageReader(mr, ipc.WithAllocator(mem))
	if err != nil {
		mr.Release()
		return nil, err
	}
	return &putReader{Reader: rdr, mr: mr}, nil
}

// newExchangeReader reads a DoExchange stream's schema, like
// newPutReader, from a checkedStream, which checks and admits every
// message itself. Bodies go back to bodyPool when the last Arrow buffer
// slicing them is released, so the batches it returns may be retained past
// the next Read.
func newExchangeReader(stream *checkedStream, mem memory.Allocator) (*putReader, error) {
	mr := &pooledMessageReader{stream: stream, refCount: 2, checked: true}
	rdr, err := ipc.NewReaderFromMessageReader(mr, ipc.WithAllocator(mem))
	if err != nil {
		mr.Release()
		return nil, err
	}
	return &putReader{Reader: rdr, mr: mr}, nil
}

// LatestFlightDescriptor returns the last descriptor the stream carried.
func (p *putReader) LatestFlightDescriptor() *flight.FlightDescriptor { return p.mr.descr }

// LatestAppMetadata returns the app_metadata of the message of the last
// record batch read.
func (p *putReader) LatestAppMetadata() []byte { return p.mr.meta }

// Release releases the reader and its last message.
func (p *putReader) Release() {
	p.Reader.Release()
	p.mr.Release()
}
