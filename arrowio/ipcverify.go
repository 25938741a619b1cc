package arrowio

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"io"
	"slices"

	"github.com/kilnml/kiln/core"
)

// arrow-go reads IPC metadata (flatbuffers) without verifying them, and
// sizes some slices by vector lengths the metadata declares: a schema
// whose field claims 2^32 children makes it allocate hundreds of GiB, which
// kills the process. verifyIPCFile and verifyIPCStream walk the metadata
// of a file before arrow-go does and refuse any vector that does not fit
// in its buffer, any table outside it, nesting beyond maxIPCDepth and more
// tables than the buffer can hold.

// maxIPCDepth bounds the nesting of fields (arrow-go's own limit is 64).
const maxIPCDepth = 64

// fb is one flatbuffer being verified.
type fb struct {
	buf    []byte
	budget int // tables still allowed
}

var errFB = core.Errorf(core.InvalidArgument, "malformed Arrow IPC metadata")

func (b *fb) in(pos, n int64) bool {
	return pos >= 0 && n >= 0 && pos <= int64(len(b.buf)) && n <= int64(len(b.buf))-pos
}

func (b *fb) u32(pos int64) (int64, bool) {
	if !b.in(pos, 4) {
		return 0, false
	}
	return int64(binary.LittleEndian.Uint32(b.buf[pos:])), true
}

func (b *fb) u16(pos int64) (int64, bool) {
	if !b.in(pos, 2) {
		return 0, false
	}
	return int64(binary.LittleEndian.Uint16(b.buf[pos:])), true
}

// table checks the table at pos and its vtable, and returns its vtable.
func (b *fb) table(pos int64) (int64, error) {
	if b.budget--; b.budget < 0 {
		return 0, fmt.Errorf("%w: more tables than its %d bytes can hold", errFB, len(b.buf))
	}
	so, ok := b.u32(pos)
	if !ok {
		return 0, fmt.Errorf("%w: table at %d outside the buffer", errFB, pos)
	}
	vt := pos - int64(int32(uint32(so)))
	size, ok := b.u16(vt)
	if !ok || size < 4 || size%2 != 0 || !b.in(vt, size) {
		return 0, fmt.Errorf("%w: bad vtable at %d", errFB, vt)
	}
	tsize, _ := b.u16(vt + 2)
	if !b.in(pos, tsize) {
		return 0, fmt.Errorf("%w: table at %d overruns the buffer", errFB, pos)
	}
	return vt, nil
}

// field returns the position of field i of the table at t (vtable vt), or
// 0 when absent.
func (b *fb) field(t, vt int64, i int) (int64, error) {
	size, _ := b.u16(vt)
	at := vt + 4 + 2*int64(i)
	if at+2 > vt+size {
		return 0, nil
	}
	off, _ := b.u16(at)
	if off == 0 {
		return 0, nil
	}
	if !b.in(t+off, 1) {
		return 0, fmt.Errorf("%w: field outside the buffer", errFB)
	}
	return t + off, nil
}

// indirect follows the offset stored at pos.
func (b *fb) indirect(pos int64) (int64, error) {
	off, ok := b.u32(pos)
	if !ok {
		return 0, fmt.Errorf("%w: offset at %d outside the buffer", errFB, pos)
	}
	return pos + off, nil
}

// vector checks the vector (of elements of size elem) that field i of the
// table refers to, and returns the position of its first element and its
// length (0, 0 when absent).
func (b *fb) vector(t, vt int64, i int, elem int64) (int64, int64, error) {
	p, err := b.field(t, vt, i)
	if err != nil || p == 0 {
		return 0, 0, err
	}
	v, err := b.indirect(p)
	if err != nil {
		return 0, 0, err
	}
	n, ok := b.u32(v)
	if !ok || !b.in(v+4, n*elem) {
		return 0, 0, fmt.Errorf("%w: a vector declares %d elements, more than its buffer holds", errFB, n)
	}
	return v + 4, n, nil
}

// subtable returns the table field i refers to (0 when absent) and its
// vtable.
func (b *fb) subtable(t, vt int64, i int) (int64, int64, error) {
	p, err := b.field(t, vt, i)
	if err != nil || p == 0 {
		return 0, 0, err
	}
	s, err := b.indirect(p)
	if err != nil {
		return 0, 0, err
	}
	svt, err := b.table(s)
	return s, svt, err
}

// tables calls fn on each table of the vector of tables in field i.
func (b *fb) tables(t, vt int64, i int, fn func(t, vt int64) error) error {
	v, n, err := b.vector(t, vt, i, 4)
	if err != nil {
		return err
	}
	for j := range n {
		e, err := b.indirect(v + 4*j)
		if err != nil {
			return err
		}
		evt, err := b.table(e)
		if err != nil {
			return err
		}
		if err := fn(e, evt); err != nil {
			return err
		}
	}
	return nil
}

// keyValues checks a custom_metadata vector (field i).
func (b *fb) keyValues(t, vt int64, i int) error {
	return b.tables(t, vt, i, func(kv, kvt int64) error {
		for f := range 2 {
			if _, _, err := b.vector(kv, kvt, f, 1); err != nil {
				return err
			}
		}
		return nil
	})
}

// schema checks a Schema table: fields, custom_metadata, features.
func (b *fb) schema(t, vt int64) error {
	if err := b.tables(t, vt, 1, func(f, fvt int64) error { return b.field_(f, fvt, 0) }); err != nil {
		return err
	}
	if err := b.keyValues(t, vt, 2); err != nil {
		return err
	}
	_, _, err := b.vector(t, vt, 3, 8)
	return err
}

// field_ checks a Field table: name, type (a Union's typeIds), dictionary,
// children (recursively), custom_metadata.
func (b *fb) field_(t, vt int64, depth int) error {
	if depth > maxIPCDepth {
		return fmt.Errorf("%w: fields nested deeper than %d", errFB, maxIPCDepth)
	}
	if _, _, err := b.vector(t, vt, 0, 1); err != nil {
		return err
	}
	typ, tvt, err := b.subtable(t, vt, 3)
	if err != nil {
		return err
	}
	if typ != 0 {
		if p, _ := b.field(t, vt, 2); p != 0 && b.in(p, 1) && b.buf[p] == 14 { // Type.Union
			if _, _, err := b.vector(typ, tvt, 1, 4); err != nil {
				return err
			}
		}
	}
	if d, dvt, err := b.subtable(t, vt, 4); err != nil {
		return err
	} else if d != 0 {
		if _, _, err := b.subtable(d, dvt, 1); err != nil {
			return err
		}
	}
	if err := b.tables(t, vt, 5, func(c, cvt int64) error { return b.field_(c, cvt, depth+1) }); err != nil {
		return err
	}
	return b.keyValues(t, vt, 6)
}

// recordBatch checks a RecordBatch table: nodes, buffers, compression,
// variadic buffer counts.
func (b *fb) recordBatch(t, vt int64) error {
	for _, v := range []struct {
		i    int
		elem int64
	}{{1, 16}, {2, 16}, {4, 8}} {
		if _, _, err := b.vector(t, vt, v.i, v.elem); err != nil {
			return err
		}
	}
	_, _, err := b.subtable(t, vt, 3)
	return err
}

func newFB(buf []byte) *fb { return &fb{buf: buf, budget: len(buf)/8 + 16} }

// verifyMessage checks an IPC Message flatbuffer and returns its body
// length.
func verifyMessage(buf []byte) (int64, error) {
	b := newFB(buf)
	root, err := b.indirect(0)
	if err != nil {
		return 0, err
	}
	vt, err := b.table(root)
	if err != nil {
		return 0, err
	}
	h, hvt, err := b.subtable(root, vt, 2)
	if err != nil {
		return 0, err
	}
	if h != 0 {
		kind := byte(0)
		if p, _ := b.field(root, vt, 1); p != 0 {
			kind = buf[p]
		}
		switch kind {
		case 1: // Schema
			err = b.schema(h, hvt)
		case 2: // DictionaryBatch: its data is a RecordBatch
			var d, dvt int64
			if d, dvt, err = b.subtable(h, hvt, 1); err == nil && d != 0 {
				err = b.recordBatch(d, dvt)
			}
		case 3: // RecordBatch
			err = b.recordBatch(h, hvt)
		}
		if err != nil {
			return 0, err
		}
	}
	if err := b.keyValues(root, vt, 4); err != nil {
		return 0, err
	}
	body := int64(0)
	if p, _ := b.field(root, vt, 3); p != 0 {
		if !b.in(p, 8) {
			return 0, fmt.Errorf("%w: body length outside the buffer", errFB)
		}
		body = int64(binary.LittleEndian.Uint64(buf[p:]))
	}
	return body, nil
}

// readMeta reads the message metadata at off of r (size bytes): the
// optional continuation marker, the length, the flatbuffer. It returns the
// flatbuffer and the offset just past it, or a nil buffer at the
// end-of-stream marker or the end of the data.
func readMeta(r io.ReaderAt, off, size int64) ([]byte, int64, error) {
	var hdr [4]byte
	if off+4 > size {
		return nil, off, nil
	}
	if _, err := r.ReadAt(hdr[:], off); err != nil {
		return nil, 0, err
	}
	off += 4
	n := int64(binary.LittleEndian.Uint32(hdr[:]))
	if n == 0xFFFFFFFF {
		if off+4 > size {
			return nil, off, nil
		}
		if _, err := r.ReadAt(hdr[:], off); err != nil {
			return nil, 0, err
		}
		off += 4
		n = int64(binary.LittleEndian.Uint32(hdr[:]))
	}
	if n == 0 {
		return nil, off, nil
	}
	if n > size-off {
		return nil, 0, fmt.Errorf("%w: message metadata of %d bytes in %d left", errFB, n, size-off)
	}
	buf := make([]byte, n)
	if _, err := r.ReadAt(buf, off); err != nil {
		return nil, 0, err
	}
	return buf, off + n, nil
}

// verifyIPCStream checks the metadata of every message of the IPC stream
// r of size bytes.
func verifyIPCStream(r io.ReaderAt, size int64) error {
	for off := int64(0); off < size; {
		meta, next, err := readMeta(r, off, size)
		if err != nil || meta == nil {
			return err
		}
		body, err := verifyMessage(meta)
		if err != nil {
			return err
		}
		if body < 0 || body > size-next {
			return nil // arrow-go refuses the body itself
		}
		off = next + body
	}
	return nil
}

// verifyIPCFile checks the footer of the IPC file r of size bytes and the
// metadata of every message its blocks point to.
func verifyIPCFile(r io.ReaderAt, size int64) error {
	const tail = 10 // int32 footer length + "ARROW1"
	if size < tail+8 {
		return nil // arrow-go refuses it
	}
	var n [4]byte
	if _, err := r.ReadAt(n[:], size-tail); err != nil {
		return err
	}
	flen := int64(binary.LittleEndian.Uint32(n[:]))
	if flen <= 0 || flen > size-tail-8 {
		return nil // arrow-go refuses it
	}
	buf := make([]byte, flen)
	if _, err := r.ReadAt(buf, size-tail-flen); err != nil {
		return err
	}
	b := newFB(buf)
	root, err := b.indirect(0)
	if err != nil {
		return err
	}
	vt, err := b.table(root)
	if err != nil {
		return err
	}
	if s, svt, err := b.subtable(root, vt, 1); err != nil {
		return err
	} else if s != 0 {
		if err := b.schema(s, svt); err != nil {
			return err
		}
	}
	if err := b.keyValues(root, vt, 4); err != nil {
		return err
	}
	// Blocks must not overlap: each would be read (and its rows kept) once
	// per reference, so a small file could declare any number of rows.
	type span struct{ start, end int64 }
	var spans []span
	for _, i := range []int{2, 3} { // dictionaries, recordBatches: Block structs
		v, cnt, err := b.vector(root, vt, i, 24)
		if err != nil {
			return err
		}
		for j := range cnt {
			blk := buf[v+24*j:]
			off := int64(binary.LittleEndian.Uint64(blk))
			mlen := int64(int32(binary.LittleEndian.Uint32(blk[8:])))
			body := int64(binary.LittleEndian.Uint64(blk[16:]))
			if off < 0 || off >= size || mlen < 0 || body < 0 || mlen > size-off || body > size-off-mlen {
				return fmt.Errorf("%w: block %d at %d (%d + %d bytes) outside the file's %d bytes", errFB, j, off, mlen, body, size)
			}
			spans = append(spans, span{off, off + mlen + body})
			meta, _, err := readMeta(r, off, size)
			if err != nil {
				return err
			}
			if meta != nil {
				if _, err := verifyMessage(meta); err != nil {
					return err
				}
			}
		}
	}
	slices.SortFunc(spans, func(a, b span) int { return cmp.Compare(a.start, b.start) })
	for i := 1; i < len(spans); i++ {
		if spans[i].start < spans[i-1].end {
			return fmt.Errorf("%w: blocks at %d and %d overlap", errFB, spans[i-1].start, spans[i].start)
		}
	}
	return nil
}
