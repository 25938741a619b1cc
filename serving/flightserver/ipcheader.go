package flightserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/serving/limits"
)

// checkFlightData checks a received FlightData's IPC header against its
// body (checkIPCHeader); a message without a header passes. The error is
// an INVALID_ARGUMENT status (a *headerError: errors.As finds the
// *nodeError of a record batch's field node in it).
func checkFlightData(fd *flight.FlightData, lim headerLimits) error {
	if len(fd.DataHeader) == 0 {
		return nil
	}
	if err := checkIPCHeader(fd.DataHeader, fd.DataBody, lim); err != nil {
		return &headerError{err: err}
	}
	return nil
}

// headerError is an IPC header refused by checkFlightData: an
// INVALID_ARGUMENT status that unwraps to the reason.
type headerError struct{ err error }

func (e *headerError) Error() string { return "FlightData: " + e.err.Error() }
func (e *headerError) Unwrap() error { return e.err }

// GRPCStatus makes the error an INVALID_ARGUMENT status.
func (e *headerError) GRPCStatus() *status.Status {
	return status.New(codes.InvalidArgument, e.Error())
}

// nodeError is a record batch's field node that contradicts itself or the
// limits; node is its index in the batch's pre-order list of field nodes
// (see nodeColumn).
type nodeError struct {
	node int
	msg  string
}

func (e *nodeError) Error() string { return fmt.Sprintf("field node %d: %s", e.node, e.msg) }

// withColumn prefixes err's message with the column its *nodeError names,
// if it has one that names a column of schema.
func withColumn(schema *arrow.Schema, err error) error {
	var ne *nodeError
	if schema == nil || !errors.As(err, &ne) {
		return err
	}
	col := nodeColumn(schema, ne.node)
	if col == "" {
		return err
	}
	return fmt.Errorf("column %q: %w", col, err)
}

// nodeColumn names the column, and the child within it, that field node
// node of a record batch of schema describes: the nodes are the fields'
// arrays in pre-order (Arrow's IPC format), a dictionary-encoded array
// being one node (its dictionary is sent apart). It returns "" when the
// schema has fewer nodes.
func nodeColumn(schema *arrow.Schema, node int) string {
	n := 0
	found := ""
	var walk func(dt arrow.DataType, path string) bool
	walk = func(dt arrow.DataType, path string) bool {
		if n == node {
			found = path
			return true
		}
		n++
		if ext, ok := dt.(arrow.ExtensionType); ok {
			dt = ext.StorageType()
		}
		if _, ok := dt.(*arrow.DictionaryType); ok {
			return false
		}
		if nested, ok := dt.(arrow.NestedType); ok {
			for _, f := range nested.Fields() {
				if walk(f.Type, path+"."+f.Name) {
					return true
				}
			}
		}
		return false
	}
	for _, f := range schema.Fields() {
		if walk(f.Type, f.Name) {
			return found
		}
	}
	return ""
}

// checkedStream is a DoExchange stream whose Recv checks every FlightData
// (checkFlightData) and admits its bytes through the gate before the Arrow
// reader reading it sees it. The bytes admitted since the last take are
// held until the caller releases what take returns.
type checkedStream struct {
	flight.FlightService_DoExchangeServer
	lim  headerLimits
	gate *limits.Gate
	held int64 // admitted and not yet taken; Recv and take run on one goroutine
}

// Recv receives, checks and admits the next FlightData; a message the gate
// refuses is a RESOURCE_EXHAUSTED error.
func (c *checkedStream) Recv() (*flight.FlightData, error) {
	fd, err := c.FlightService_DoExchangeServer.Recv()
	if err != nil {
		return nil, err
	}
	if err := checkFlightData(fd, c.lim); err != nil {
		bodyPool.put(fd.DataBody)
		return nil, err
	}
	n := flightDataBytes(fd)
	if !c.gate.Acquire(n) {
		bodyPool.put(fd.DataBody)
		return nil, c.gate.Busy(n)
	}
	c.held += n
	return fd, nil
}

// take returns the bytes admitted since the last take; the caller
// releases them from the gate when their batch's work is done.
func (c *checkedStream) take() int64 {
	n := c.held
	c.held = 0
	return n
}

// flightDataBytes is what a FlightData counts in the bytes in flight: its
// IPC header, body and app metadata.
func flightDataBytes(fd *flight.FlightData) int64 {
	return int64(len(fd.DataHeader) + len(fd.DataBody) + len(fd.AppMetadata))
}

// The checks below read an Arrow IPC Message flatbuffer (Message.fbs,
// Schema.fbs) with bounds checks of their own, before arrow-go's ipc
// reader sees it: that reader trusts the vector lengths and buffer
// offsets a message declares, and allocates from them (a Schema claiming
// 0x7fffffff fields made it allocate about 176 GiB).

// headerLimits bound an IPC message header.
type headerLimits struct {
	// maxLength bounds a record batch's length and each field node's
	// length and null count.
	maxLength int64
	// maxFields bounds the fields of a schema, children included, and the
	// field nodes and buffers of a record batch.
	maxFields int
	// maxUncompressed bounds the uncompressed size of each compressed
	// buffer (LZ4/ZSTD body compression), in bytes.
	maxUncompressed int64
}

// defaultMaxFields bounds the fields of a schema (all levels) and the
// nodes and buffers of a record batch.
const defaultMaxFields = 1 << 16

// maxFieldDepth bounds the nesting of a schema's fields.
const maxFieldDepth = 64

// Message header union types (MessageHeader in Message.fbs).
const (
	hdrNone            = 0
	hdrSchema          = 1
	hdrDictionaryBatch = 2
	hdrRecordBatch     = 3
)

// fbuf is a flatbuffer with bounds-checked reads; every failed read is an
// error naming what was read.
type fbuf []byte

func (b fbuf) u32(pos int) (uint32, error) {
	if pos < 0 || pos > len(b)-4 {
		return 0, fmt.Errorf("offset %d outside the %d-byte header", pos, len(b))
	}
	return binary.LittleEndian.Uint32(b[pos:]), nil
}

func (b fbuf) u16(pos int) (uint16, error) {
	if pos < 0 || pos > len(b)-2 {
		return 0, fmt.Errorf("offset %d outside the %d-byte header", pos, len(b))
	}
	return binary.LittleEndian.Uint16(b[pos:]), nil
}

func (b fbuf) i64(pos int) (int64, error) {
	if pos < 0 || pos > len(b)-8 {
		return 0, fmt.Errorf("offset %d outside the %d-byte header", pos, len(b))
	}
	return int64(binary.LittleEndian.Uint64(b[pos:])), nil
}

// table is a flatbuffer table: its position and its vtable's.
type table struct {
	b      fbuf
	pos    int
	vt     int
	vtSize int
}

// root returns the buffer's root table.
func (b fbuf) root() (table, error) {
	off, err := b.u32(0)
	if err != nil {
		return table{}, err
	}
	return b.tableAt(int(off))
}

func (b fbuf) tableAt(pos int) (table, error) {
	if pos < 0 || pos >= len(b) {
		return table{}, fmt.Errorf("table offset %d outside the %d-byte header", pos, len(b))
	}
	so, err := b.u32(pos)
	if err != nil {
		return table{}, err
	}
	vt := pos - int(int32(so))
	size, err := b.u16(vt)
	if err != nil {
		return table{}, fmt.Errorf("vtable: %w", err)
	}
	if size < 4 || int(size)%2 != 0 || vt+int(size) > len(b) {
		return table{}, fmt.Errorf("vtable of %d bytes at %d does not fit the %d-byte header", size, vt, len(b))
	}
	return table{b: b, pos: pos, vt: vt, vtSize: int(size)}, nil
}

// field returns the position of field i, or 0 when absent.
func (t table) field(i int) (int, error) {
	e := 4 + 2*i
	if e+2 > t.vtSize {
		return 0, nil
	}
	off, err := t.b.u16(t.vt + e)
	if err != nil || off == 0 {
		return 0, err
	}
	return t.pos + int(off), nil
}

func (t table) int64Field(i int) (int64, error) {
	p, err := t.field(i)
	if err != nil || p == 0 {
		return 0, err
	}
	return t.b.i64(p)
}

func (t table) byteField(i int) (byte, error) {
	p, err := t.field(i)
	if err != nil || p == 0 {
		return 0, err
	}
	if p >= len(t.b) {
		return 0, fmt.Errorf("offset %d outside the %d-byte header", p, len(t.b))
	}
	return t.b[p], nil
}

// ref follows the offset stored in field i (a table, vector or string);
// 0 when absent.
func (t table) ref(i int) (int, error) {
	p, err := t.field(i)
	if err != nil || p == 0 {
		return 0, err
	}
	off, err := t.b.u32(p)
	if err != nil {
		return 0, err
	}
	target := p + int(off)
	if target >= len(t.b) {
		return 0, fmt.Errorf("field %d points to %d, outside the %d-byte header", i, target, len(t.b))
	}
	return target, nil
}

func (t table) subtable(i int) (table, bool, error) {
	p, err := t.ref(i)
	if err != nil || p == 0 {
		return table{}, false, err
	}
	st, err := t.b.tableAt(p)
	return st, err == nil, err
}

// vector returns the element count and first element's position of the
// vector in field i, checking that count elements of elemSize bytes fit
// the buffer: a declared count can never exceed the bytes received.
func (t table) vector(i, elemSize int) (n, start int, err error) {
	p, err := t.ref(i)
	if err != nil || p == 0 {
		return 0, 0, err
	}
	c, err := t.b.u32(p)
	if err != nil {
		return 0, 0, err
	}
	start = p + 4
	if uint64(c)*uint64(elemSize) > uint64(len(t.b)-start) {
		return 0, 0, fmt.Errorf("field %d declares %d elements of %d bytes, the %d-byte header holds at most %d", i, c, elemSize, len(t.b), (len(t.b)-start)/elemSize)
	}
	return int(c), start, nil
}

// checkIPCHeader validates the IPC Message flatbuffer of a FlightData's
// data_header against the body received with it: vector lengths within
// the header, a schema's fields (all levels) within lim.maxFields and
// maxFieldDepth, a record batch's length and node lengths within
// lim.maxLength, and every buffer (offset, length) and the message's
// bodyLength within the body.
func checkIPCHeader(header, body []byte, lim headerLimits) error {
	bodyLen := len(body)
	if lim.maxFields <= 0 {
		lim.maxFields = defaultMaxFields
	}
	if lim.maxLength <= 0 {
		lim.maxLength = math.MaxInt32
	}
	if lim.maxUncompressed <= 0 {
		lim.maxUncompressed = math.MaxInt32
	}
	b := fbuf(header)
	msg, err := b.root()
	if err != nil {
		return fmt.Errorf("IPC message: %w", err)
	}
	if bl, err := msg.int64Field(3); err != nil {
		return fmt.Errorf("IPC message bodyLength: %w", err)
	} else if bl < 0 || bl > int64(bodyLen) {
		return fmt.Errorf("IPC message declares a %d-byte body, %d bytes came", bl, bodyLen)
	}
	if err := checkKeyValues(msg, 4); err != nil {
		return fmt.Errorf("IPC message custom_metadata: %w", err)
	}
	kind, err := msg.byteField(1)
	if err != nil {
		return fmt.Errorf("IPC message header type: %w", err)
	}
	hdr, ok, err := msg.subtable(2)
	if err != nil {
		return fmt.Errorf("IPC message header: %w", err)
	}
	if !ok {
		if kind != hdrNone {
			return fmt.Errorf("IPC message of type %d has no header", kind)
		}
		return nil
	}
	switch kind {
	case hdrSchema:
		fields := 0
		if err := checkFields(hdr, 1, 0, &fields, lim); err != nil {
			return fmt.Errorf("IPC schema: %w", err)
		}
		if err := checkKeyValues(hdr, 2); err != nil {
			return fmt.Errorf("IPC schema custom_metadata: %w", err)
		}
		if _, _, err := hdr.vector(3, 8); err != nil {
			return fmt.Errorf("IPC schema features: %w", err)
		}
	case hdrRecordBatch:
		if err := checkRecordBatch(hdr, body, lim); err != nil {
			return fmt.Errorf("IPC record batch: %w", err)
		}
	case hdrDictionaryBatch:
		data, ok, err := hdr.subtable(1)
		if err != nil {
			return fmt.Errorf("IPC dictionary batch: %w", err)
		}
		if ok {
			if err := checkRecordBatch(data, body, lim); err != nil {
				// %v: a dictionary's field nodes are not the schema's.
				return fmt.Errorf("IPC dictionary batch: %v", err)
			}
		}
	default:
		return fmt.Errorf("unsupported IPC message type %d (want a schema, record batch or dictionary batch)", kind)
	}
	return nil
}

// checkKeyValues checks a [KeyValue] vector: its tables and strings lie
// within the buffer.
func checkKeyValues(t table, i int) error {
	n, start, err := t.vector(i, 4)
	if err != nil {
		return err
	}
	for k := range n {
		off, err := t.b.u32(start + 4*k)
		if err != nil {
			return err
		}
		kv, err := t.b.tableAt(start + 4*k + int(off))
		if err != nil {
			return fmt.Errorf("entry %d: %w", k, err)
		}
		for f := range 2 {
			if _, _, err := kv.vector(f, 1); err != nil {
				return fmt.Errorf("entry %d: %w", k, err)
			}
		}
	}
	return nil
}

// checkFields checks the [Field] vector in field i of t and, recursively,
// the fields' children, counting every field into *count.
func checkFields(t table, i, depth int, count *int, lim headerLimits) error {
	if depth > maxFieldDepth {
		return fmt.Errorf("fields nest deeper than %d levels", maxFieldDepth)
	}
	n, start, err := t.vector(i, 4)
	if err != nil {
		return fmt.Errorf("fields: %w", err)
	}
	if *count += n; *count > lim.maxFields {
		return fmt.Errorf("more than %d fields", lim.maxFields)
	}
	for k := range n {
		off, err := t.b.u32(start + 4*k)
		if err != nil {
			return err
		}
		f, err := t.b.tableAt(start + 4*k + int(off))
		if err != nil {
			return fmt.Errorf("field %d: %w", k, err)
		}
		if _, _, err := f.vector(0, 1); err != nil { // name
			return fmt.Errorf("field %d name: %w", k, err)
		}
		if _, _, err := f.subtable(3); err != nil { // type
			return fmt.Errorf("field %d type: %w", k, err)
		}
		if _, _, err := f.subtable(4); err != nil { // dictionary
			return fmt.Errorf("field %d dictionary: %w", k, err)
		}
		if err := checkFields(f, 5, depth+1, count, lim); err != nil {
			return fmt.Errorf("field %d: %w", k, err)
		}
		if err := checkKeyValues(f, 6); err != nil {
			return fmt.Errorf("field %d custom_metadata: %w", k, err)
		}
	}
	return nil
}

// checkRecordBatch checks a RecordBatch table against the body: length
// and node lengths within lim.maxLength, every buffer within the body,
// and compressed buffers' declared uncompressed lengths (their first 8
// bytes) within lim.maxUncompressed.
func checkRecordBatch(rb table, body []byte, lim headerLimits) error {
	bodyLen := len(body)
	length, err := rb.int64Field(0)
	if err != nil {
		return fmt.Errorf("length: %w", err)
	}
	if length < 0 || length > lim.maxLength {
		return fmt.Errorf("length %d is not within 0..%d", length, lim.maxLength)
	}
	nodes, ns, err := rb.vector(1, 16)
	if err != nil {
		return fmt.Errorf("nodes: %w", err)
	}
	if nodes > lim.maxFields {
		return fmt.Errorf("%d field nodes, more than %d", nodes, lim.maxFields)
	}
	for k := range nodes {
		l, _ := rb.b.i64(ns + 16*k)
		nulls, _ := rb.b.i64(ns + 16*k + 8)
		if l < 0 || l > lim.maxLength || nulls < 0 || nulls > l {
			return &nodeError{node: k, msg: fmt.Sprintf("length %d, null count %d (want 0 ≤ nulls ≤ length ≤ %d)", l, nulls, lim.maxLength)}
		}
	}
	bufs, bs, err := rb.vector(2, 16)
	if err != nil {
		return fmt.Errorf("buffers: %w", err)
	}
	if bufs > 3*lim.maxFields {
		return fmt.Errorf("%d buffers, more than %d", bufs, 3*lim.maxFields)
	}
	_, compressed, err := rb.subtable(3)
	if err != nil {
		return fmt.Errorf("compression: %w", err)
	}
	for k := range bufs {
		off, _ := rb.b.i64(bs + 16*k)
		l, _ := rb.b.i64(bs + 16*k + 8)
		if off < 0 || l < 0 || off > int64(bodyLen) || l > int64(bodyLen)-off {
			return fmt.Errorf("buffer %d (offset %d, length %d) is outside the %d-byte body", k, off, l, bodyLen)
		}
		if compressed && l >= 8 {
			u := int64(binary.LittleEndian.Uint64(body[off:]))
			if u < -1 || u > lim.maxUncompressed {
				return fmt.Errorf("compressed buffer %d declares %d uncompressed bytes (limit %d)", k, u, lim.maxUncompressed)
			}
		}
	}
	if _, _, err := rb.vector(4, 8); err != nil {
		return fmt.Errorf("variadicBufferCounts: %w", err)
	}
	return nil
}
