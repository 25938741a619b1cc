package flightserver

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"github.com/kilnml/kiln/core"
)

// dictColumns follows the dictionaries of a DoPut stream's top-level
// dictionary-encoded columns. An Arrow IPC file holds one dictionary per
// column (the format has no replacement dictionaries, and arrow-go's file
// writer no delta dictionaries either), while a stream may replace a
// column's dictionary between batches. Until one changes, nothing is done;
// from then on (startUnifying) every dictionary is added to a unified one
// per column (arrow-go's array.DictionaryUnifier: values in the order first
// seen, so each earlier position stays valid), and each batch's
// transposition into it is remembered, so that every batch can be written
// again with its indices into the unified dictionary (transpose).
//
// Dictionaries nested in other types are not unified: a change of one is
// refused by the IPC file writer, UNSUPPORTED.
type dictColumns struct {
	cols  []int // the dictionary columns' indices
	names []string
	types []*arrow.DictionaryType
	last  []arrow.ArrayData // per column: the dictionary of the last batch (retained)

	unifying bool
	unifiers []array.DictionaryUnifier
	runs     [][]dictRun // per column, by first batch

	final     *arrow.Schema // set by result
	finalDict []arrow.Array
}

// dictRun is a transposition valid from batch from until the next run's.
type dictRun struct {
	from int64
	m    []int32
}

// newDictColumns returns the follower of schema's dictionary columns, or
// nil when it has none.
func newDictColumns(schema *arrow.Schema) *dictColumns {
	var d dictColumns
	for i, f := range schema.Fields() {
		if dt, ok := f.Type.(*arrow.DictionaryType); ok {
			d.cols = append(d.cols, i)
			d.names = append(d.names, f.Name)
			d.types = append(d.types, dt)
		}
	}
	if len(d.cols) == 0 {
		return nil
	}
	d.last = make([]arrow.ArrayData, len(d.cols))
	return &d
}

// dictOf returns the dictionary of column k of rec.
func (d *dictColumns) dictOf(rec arrow.RecordBatch, k int) arrow.ArrayData {
	return rec.Column(d.cols[k]).Data().Dictionary()
}

// sameDict reports whether dictionaries a and b hold the same values (as
// the IPC writer compares them).
func sameDict(a, b arrow.ArrayData) bool {
	if a == b {
		return true
	}
	if a == nil || b == nil || a.Len() != b.Len() {
		return false
	}
	x, y := array.MakeFromData(a), array.MakeFromData(b)
	defer x.Release()
	defer y.Release()
	return array.ApproxEqual(x, y, array.WithNaNsEqual(true))
}

// changed reports whether a dictionary of rec differs from the last
// batch's.
func (d *dictColumns) changed(rec arrow.RecordBatch) bool {
	for k := range d.cols {
		// An empty column may come without a dictionary.
		if dict := d.dictOf(rec, k); dict != nil && !sameDict(d.last[k], dict) {
			return true
		}
	}
	return false
}

// startUnifying starts unified dictionaries from the last batch's, which
// every batch so far shares.
func (d *dictColumns) startUnifying(mem memory.Allocator) error {
	d.unifying = true
	d.unifiers = make([]array.DictionaryUnifier, len(d.cols))
	d.runs = make([][]dictRun, len(d.cols))
	for k, dt := range d.types {
		u, err := array.NewDictionaryUnifier(mem, dt.ValueType)
		if err != nil {
			return core.Errorf(core.Unsupported, "the dictionary of column %q changed between batches, and dictionaries of %s cannot be unified into the one that an Arrow IPC file holds: %v; send one dictionary (pyarrow: unify_dictionaries)", d.name(k), dt.ValueType, err)
		}
		d.unifiers[k] = u
		if err := d.unify(k, d.last[k], 0); err != nil {
			return err
		}
	}
	return nil
}

// name returns column k's name.
func (d *dictColumns) name(k int) string { return d.names[k] }

// unify adds dictionary dict of column k, used from batch from on.
func (d *dictColumns) unify(k int, dict arrow.ArrayData, from int64) error {
	m := []int32{}
	if dict != nil {
		a := array.MakeFromData(dict)
		buf, err := d.unifiers[k].UnifyAndTranspose(a)
		a.Release()
		if err != nil {
			return core.Errorf(core.Unsupported, "unifying the dictionaries of column %q: %v", d.name(k), err)
		}
		m = append(m, arrow.Int32Traits.CastFromBytes(buf.Bytes())[:dict.Len()]...)
		buf.Release()
	}
	d.runs[k] = append(d.runs[k], dictRun{from: from, m: m})
	return nil
}

// observe notes the dictionaries of rec, batch number batch of the
// stream, after it was validated.
func (d *dictColumns) observe(rec arrow.RecordBatch, batch int64) error {
	for k := range d.cols {
		dict := d.dictOf(rec, k)
		if dict == nil || d.last[k] == dict {
			continue
		}
		if d.unifying && !sameDict(d.last[k], dict) {
			if err := d.unify(k, dict, batch); err != nil {
				return err
			}
		}
		dict.Retain()
		if d.last[k] != nil {
			d.last[k].Release()
		}
		d.last[k] = dict
	}
	return nil
}

// result ends the unification: the schema of the stored file, whose
// dictionary columns keep their index type unless the unified dictionary
// outgrows it (then the smallest signed type that holds it), and the
// unified dictionaries.
func (d *dictColumns) result(schema *arrow.Schema) error {
	fields := schema.Fields()
	d.finalDict = make([]arrow.Array, len(d.cols))
	for k, dt := range d.types {
		u := d.unifiers[k]
		dict, err := u.GetResultWithIndexType(dt.IndexType)
		out := *dt
		if err != nil {
			var typ arrow.DataType
			if typ, dict, err = u.GetResult(); err != nil {
				return core.Errorf(core.Unsupported, "unifying the dictionaries of column %q: %v", fields[d.cols[k]].Name, err)
			}
			out.IndexType = typ.(*arrow.DictionaryType).IndexType
		}
		d.finalDict[k] = dict
		fields[d.cols[k]].Type = &out
	}
	md := schema.Metadata()
	d.final = arrow.NewSchema(fields, &md)
	return nil
}

// schema returns the schema of the stored file: schema, unless the
// dictionaries were unified.
func (d *dictColumns) schema(schema *arrow.Schema) *arrow.Schema {
	if d == nil || d.final == nil {
		return schema
	}
	return d.final
}

// transpose returns rec, batch number batch, with its dictionary columns'
// indices into the unified dictionaries (result).
func (d *dictColumns) transpose(mem memory.Allocator, rec arrow.RecordBatch, batch int64) (arrow.RecordBatch, error) {
	cols := make([]arrow.Array, rec.NumCols())
	copy(cols, rec.Columns())
	var made []arrow.Array
	defer func() {
		for _, a := range made {
			a.Release()
		}
	}()
	for k, c := range d.cols {
		runs := d.runs[k]
		r := sort.Search(len(runs), func(i int) bool { return runs[i].from > batch }) - 1
		if r < 0 {
			return nil, fmt.Errorf("batch %d precedes the dictionaries of column %q", batch, d.name(k))
		}
		a, err := transposeIndices(mem, rec.Column(c).(*array.Dictionary), runs[r].m,
			d.final.Field(c).Type.(*arrow.DictionaryType), d.finalDict[k])
		if err != nil {
			return nil, fmt.Errorf("column %q: %w", d.final.Field(c).Name, err)
		}
		made = append(made, a)
		cols[c] = a
	}
	return array.NewRecordBatch(d.final, cols, rec.NumRows()), nil
}

// transposeIndices returns col with index i replaced by m[i], of type
// out, over dict. Null slots become 0, whatever they held.
func transposeIndices(mem memory.Allocator, col *array.Dictionary, m []int32, out *arrow.DictionaryType, dict arrow.Array) (arrow.Array, error) {
	d := col.Data()
	off, n := d.Offset(), d.Len()
	width := out.IndexType.(arrow.FixedWidthDataType).BitWidth() / 8
	buf := memory.NewResizableBuffer(mem)
	defer buf.Release()
	buf.Resize((off + n) * width)
	b := buf.Bytes()
	for i := 0; i < n; i++ {
		v := uint64(0)
		if col.IsValid(i) {
			x := col.GetValueIndex(i)
			if x < 0 || x >= len(m) {
				return nil, fmt.Errorf("row %d: index %d outside a dictionary of %d values", i, x, len(m))
			}
			v = uint64(m[x])
		}
		at := (off + i) * width
		switch width {
		case 1:
			b[at] = byte(v)
		case 2:
			binary.LittleEndian.PutUint16(b[at:], uint16(v))
		case 4:
			binary.LittleEndian.PutUint32(b[at:], uint32(v))
		default:
			binary.LittleEndian.PutUint64(b[at:], v)
		}
	}
	var bitmap *memory.Buffer
	if d.NullN() > 0 {
		bitmap = d.Buffers()[0]
	}
	data := array.NewDataWithDictionary(out, n, []*memory.Buffer{bitmap, buf}, d.NullN(), off, dict.Data().(*array.Data))
	defer data.Release()
	return array.MakeFromData(data), nil
}

// release releases the dictionaries and unifiers held; nil does nothing.
func (d *dictColumns) release() {
	if d == nil {
		return
	}
	for _, l := range d.last {
		if l != nil {
			l.Release()
		}
	}
	for _, u := range d.unifiers {
		if u != nil {
			u.Release()
		}
	}
	for _, a := range d.finalDict {
		if a != nil {
			a.Release()
		}
	}
}

// unifyParts writes the dataset of a stream whose dictionaries changed: the
// batches of first (an IPC file) and then of rest (an IPC stream), with
// their dictionary columns transposed into the unified dictionaries, into
// a new file part, finished; schema is the stream's.
func (s *store) unifyParts(ctx context.Context, name string, schema *arrow.Schema, first, rest *part, dc *dictColumns) (*part, error) {
	if err := dc.result(schema); err != nil {
		return nil, fmt.Errorf("dataset %q: %w", name, err)
	}
	out, err := s.newPart(name, dc.final, true, nil)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			out.discard()
		}
	}()
	batch := int64(0)
	write := func(rec arrow.RecordBatch) error {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("stream ended before commit: %w", err)
		}
		t, err := dc.transpose(s.mem, rec, batch)
		if err != nil {
			return fmt.Errorf("batch %d: %w", batch, err)
		}
		defer t.Release()
		if err := out.write(t); err != nil {
			return fmt.Errorf("writing batch %d: %w", batch, err)
		}
		batch++
		return nil
	}
	// The file part.
	f, err := os.Open(first.path)
	if err != nil {
		return nil, fmt.Errorf("dataset %q: %w", name, err)
	}
	defer f.Close()
	fr, err := ipc.NewFileReader(f, ipc.WithAllocator(s.mem))
	if err != nil {
		return nil, fmt.Errorf("dataset %q: reading back: %w", name, err)
	}
	defer fr.Close()
	for i := 0; i < fr.NumRecords(); i++ {
		rec, err := fr.RecordBatch(i)
		if err != nil {
			return nil, fmt.Errorf("dataset %q: reading back batch %d: %w", name, i, err)
		}
		if err := write(rec); err != nil {
			return nil, fmt.Errorf("dataset %q: %w", name, err)
		}
	}
	// The stream part.
	g, err := os.Open(rest.path)
	if err != nil {
		return nil, fmt.Errorf("dataset %q: %w", name, err)
	}
	defer g.Close()
	sr, err := ipc.NewReader(g, ipc.WithAllocator(s.mem))
	if err != nil {
		return nil, fmt.Errorf("dataset %q: reading back: %w", name, err)
	}
	defer sr.Release()
	for {
		rec, err := sr.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("dataset %q: reading back batch %d: %w", name, batch, err)
		}
		if err := write(rec); err != nil {
			return nil, fmt.Errorf("dataset %q: %w", name, err)
		}
	}
	if err := out.finish(); err != nil {
		return nil, fmt.Errorf("dataset %q: %w", name, err)
	}
	ok = true
	return out, nil
}
