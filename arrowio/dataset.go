package arrowio

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"

	"github.com/kilnml/kiln/core"
)

// DefaultDatasetBatchSize is the number of rows per batch of a Dataset
// unless DatasetOptions.BatchSize says otherwise.
const DefaultDatasetBatchSize = 1024

// DatasetOptions select a Dataset's columns and batching.
type DatasetOptions struct {
	// Features are the columns whose values, in this order, make each
	// row's feature vector (required): numeric columns contribute one
	// feature each, FixedSizeList and fixed_shape_tensor columns of numbers
	// as many as they hold per row (row-major, the physical layout).
	Features []string
	// Targets are the columns of each row's targets, like Features; none
	// gives batches without targets.
	Targets []string
	// TargetDType is the element type of the targets: core.Float32
	// (default) or core.Int64 (class indices).
	TargetDType core.DType
	// BatchSize is the number of rows per batch (default
	// DefaultDatasetBatchSize); the last batch may have fewer.
	BatchSize int
	// Allocator allocates the tensors' C memory (default a package-wide
	// Allocator).
	Allocator *Allocator
}

// Batch is one batch of a Dataset. Its tensors own their C memory; Close
// them (or the Batch) when done.
type Batch struct {
	// Features is a [Rows, NumFeatures] float32 tensor.
	Features *core.Tensor
	// Targets is a [Rows, NumTargets] tensor of TargetDType, or nil without
	// target columns.
	Targets *core.Tensor
	// Rows is the number of rows.
	Rows int
}

// Close closes the batch's tensors.
func (b *Batch) Close() {
	if b.Features != nil {
		b.Features.Close()
	}
	if b.Targets != nil {
		b.Targets.Close()
	}
}

// Dataset streams the rows of Arrow data (an IPC file or stream, a Parquet
// file, or any record reader) as batches of float32 feature tensors and
// target tensors, reading only the selected columns and holding at most one
// input record batch and one output batch in memory, so that data larger
// than memory can be trained on. A Dataset is not safe for concurrent use.
type Dataset struct {
	src      array.RecordReader
	closers  []func() error
	features []colSel
	targets  []colSel
	nfeat    int
	ntarg    int
	tdt      core.DType
	batch    int
	mem      memory.Allocator

	cur  arrow.RecordBatch // the record being consumed, retained
	row  int64             // next row of cur
	done bool
}

// colSel is a selected column and its width.
type colSel struct {
	name  string
	idx   int
	width int
}

// OpenDataset opens the Arrow IPC file, IPC stream or Parquet file at path
// (recognized by their magic bytes) as a Dataset. Parquet files are read
// column-projected, BatchSize rows at a time. The Dataset must be closed.
func OpenDataset(path string, opts DatasetOptions) (*Dataset, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("arrowio: dataset: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("arrowio: dataset %s: %w", path, err)
	}
	d, err := openDataset(f, st.Size(), opts)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("arrowio: dataset %s: %w", path, err)
	}
	d.closers = append(d.closers, func() error {
		// The Parquet reader closes f itself.
		if err := f.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
			return err
		}
		return nil
	})
	return d, nil
}

// openDataset opens f, of size bytes, as OpenDataset does; closing the
// Dataset does not close f.
func openDataset(f source, size int64, opts DatasetOptions) (*Dataset, error) {
	batch := int64(opts.BatchSize)
	if batch <= 0 {
		batch = DefaultDatasetBatchSize
	}
	cols := append(append([]string(nil), opts.Features...), opts.Targets...)
	rr, closeSrc, err := openSource(f, size, cols, batch, optsAllocator(opts))
	if err != nil {
		return nil, err
	}
	d, err := newDataset(rr, opts)
	if err != nil {
		rr.Release()
		closeSrc()
		return nil, core.Errorf(core.InvalidArgument, "columns: %v", err)
	}
	// Close releases rr (d.src), then closes the file reader.
	d.closers = append(d.closers, func() error { closeSrc(); return nil })
	return d, nil
}

func optsAllocator(opts DatasetOptions) memory.Allocator {
	if opts.Allocator != nil {
		return opts.Allocator
	}
	return memory.DefaultAllocator
}

// parquetLeaves returns the leaf column indices of the named top-level
// fields.
func parquetLeaves(fr *pqarrow.FileReader, names []string) ([]int, error) {
	var leaves []int
	var walk func(f *pqarrow.SchemaField)
	walk = func(f *pqarrow.SchemaField) {
		if f.IsLeaf() {
			leaves = append(leaves, f.ColIndex)
		}
		for i := range f.Children {
			walk(&f.Children[i])
		}
	}
	seen := map[string]bool{}
	for _, n := range names {
		if seen[n] {
			continue
		}
		seen[n] = true
		found := false
		for i := range fr.Manifest.Fields {
			if fr.Manifest.Fields[i].Field.Name == n {
				walk(&fr.Manifest.Fields[i])
				found = true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("no column %q", n)
		}
	}
	return leaves, nil
}

// NewDataset makes a Dataset of the record batches of rdr (for example an
// in-memory table through array.NewTableReader). The Dataset retains rdr
// and releases it on Close.
func NewDataset(rdr array.RecordReader, opts DatasetOptions) (*Dataset, error) {
	rdr.Retain()
	d, err := newDataset(rdr, opts)
	if err != nil {
		rdr.Release()
		return nil, fmt.Errorf("arrowio: dataset: %w", err)
	}
	return d, nil
}

func newDataset(rdr array.RecordReader, opts DatasetOptions) (*Dataset, error) {
	if len(opts.Features) == 0 {
		return nil, errors.New("no feature columns selected")
	}
	d := &Dataset{src: rdr, batch: opts.BatchSize, tdt: opts.TargetDType, mem: defaultAllocator}
	if opts.Allocator != nil {
		d.mem = opts.Allocator
	}
	if d.batch <= 0 {
		d.batch = DefaultDatasetBatchSize
	}
	if d.tdt == 0 {
		d.tdt = core.Float32
	}
	if d.tdt != core.Float32 && d.tdt != core.Int64 {
		return nil, fmt.Errorf("target type %v: want float32 or int64", d.tdt)
	}
	var err error
	if d.features, d.nfeat, err = selectColumns(rdr.Schema(), opts.Features); err != nil {
		return nil, err
	}
	if d.targets, d.ntarg, err = selectColumns(rdr.Schema(), opts.Targets); err != nil {
		return nil, err
	}
	return d, nil
}

func selectColumns(schema *arrow.Schema, names []string) ([]colSel, int, error) {
	var sels []colSel
	total := 0
	for _, n := range names {
		idx := schema.FieldIndices(n)
		if len(idx) != 1 {
			return nil, 0, fmt.Errorf("column %q: the schema has it %d times", n, len(idx))
		}
		w, err := columnWidth(schema.Field(idx[0]).Type)
		if err != nil {
			return nil, 0, fmt.Errorf("column %q: %w", n, err)
		}
		sels = append(sels, colSel{name: n, idx: idx[0], width: w})
		total += w
	}
	return sels, total, nil
}

// columnWidth returns the number of values per row of a numeric column.
func columnWidth(dt arrow.DataType) (int, error) {
	if ext, ok := dt.(arrow.ExtensionType); ok {
		dt = ext.StorageType()
	}
	w := 1
	if l, ok := dt.(*arrow.FixedSizeListType); ok {
		w, dt = int(l.Len()), l.Elem()
	}
	if !arrow.IsInteger(dt.ID()) && !arrow.IsFloating(dt.ID()) {
		return 0, fmt.Errorf("type %s is not numeric (nor a fixed-size list or tensor of numbers)", dt)
	}
	return w, nil
}

// Schema returns the schema of the data read (for Parquet, of the selected
// columns only).
func (d *Dataset) Schema() *arrow.Schema { return d.src.Schema() }

// NumFeatures returns the width of the feature tensors.
func (d *Dataset) NumFeatures() int { return d.nfeat }

// NumTargets returns the width of the target tensors (0 without targets).
func (d *Dataset) NumTargets() int { return d.ntarg }

// Next returns the next batch of up to BatchSize rows, spanning input record
// batches as needed, or io.EOF after the last. Null values are errors; so
// is a malformed record batch (INVALID_ARGUMENT: each is checked with
// array.ValidateFull before its values are read). The batch's memory grows
// with the rows actually read, never with a count the data declares.
func (d *Dataset) Next(ctx context.Context) (*Batch, error) {
	if d.done {
		return nil, io.EOF
	}
	var feat, targ []byte
	capRows, rows := 0, 0
	free := func() {
		if feat != nil {
			d.mem.Free(feat)
		}
		if targ != nil {
			d.mem.Free(targ)
		}
	}
	// grow makes room for need rows: at least doubling, at most d.batch.
	grow := func(need int) error {
		if need <= capRows {
			return nil
		}
		c := min(d.batch, max(need, 2*capRows))
		nf, err := d.regrow(feat, rows*d.nfeat*4, c*d.nfeat*4)
		if err != nil {
			return err
		}
		feat = nf
		if d.ntarg > 0 {
			nt, err := d.regrow(targ, rows*d.ntarg*d.tdt.Size(), c*d.ntarg*d.tdt.Size())
			if err != nil {
				return err
			}
			targ = nt
		}
		capRows = c
		return nil
	}
	for rows < d.batch {
		if err := ctx.Err(); err != nil {
			free()
			return nil, err
		}
		if d.cur == nil || d.row >= d.cur.NumRows() {
			if d.cur != nil {
				d.cur.Release()
				d.cur = nil
			}
			rec, err := readNext(d.src)
			if err != nil {
				free()
				return nil, fmt.Errorf("arrowio: dataset: %w", err)
			}
			if rec == nil {
				d.done = true
				break
			}
			d.cur = rec
			d.cur.Retain()
			d.row = 0
			continue
		}
		n := min(int64(d.batch-rows), d.cur.NumRows()-d.row)
		if err := grow(rows + int(n)); err != nil {
			free()
			return nil, fmt.Errorf("arrowio: dataset: %w", err)
		}
		if err := fill(asSlice[float32](feat), d.nfeat, rows, d.cur, d.row, int(n), d.features); err != nil {
			free()
			return nil, fmt.Errorf("arrowio: dataset: %w", err)
		}
		if d.ntarg > 0 {
			var err error
			if d.tdt == core.Int64 {
				err = fill(asSlice[int64](targ), d.ntarg, rows, d.cur, d.row, int(n), d.targets)
			} else {
				err = fill(asSlice[float32](targ), d.ntarg, rows, d.cur, d.row, int(n), d.targets)
			}
			if err != nil {
				free()
				return nil, fmt.Errorf("arrowio: dataset: %w", err)
			}
		}
		rows += int(n)
		d.row += n
	}
	if rows == 0 {
		free()
		return nil, io.EOF
	}
	b := &Batch{Rows: rows}
	var err error
	// The tensors view the first rows of their buffers and free them whole.
	if b.Features, err = blobTensor(feat, d.mem, core.Float32, []int64{int64(rows), int64(d.nfeat)}, nil); err != nil {
		if targ != nil {
			d.mem.Free(targ)
		}
		return nil, fmt.Errorf("arrowio: dataset: %w", err)
	}
	if targ != nil {
		if b.Targets, err = blobTensor(targ, d.mem, d.tdt, []int64{int64(rows), int64(d.ntarg)}, nil); err != nil {
			b.Features.Close()
			return nil, fmt.Errorf("arrowio: dataset: %w", err)
		}
	}
	return b, nil
}

// regrow returns a C buffer of n bytes (at least 1) holding the first
// keep bytes of old, which it frees (old may be nil).
func (d *Dataset) regrow(old []byte, keep, n int) ([]byte, error) {
	c, err := allocC(d.mem, max(n, 1))
	if err != nil {
		return nil, err
	}
	if old != nil {
		copy(c, old[:keep])
		d.mem.Free(old)
	}
	return c, nil
}

// fill converts rows [from, from+n) of rec's selected columns into dst, a
// row-major matrix of width k, starting at row at.
func fill[T float32 | int64](dst []T, k, at int, rec arrow.RecordBatch, from int64, n int, cols []colSel) error {
	off := 0
	for _, c := range cols {
		col := rec.Column(c.idx)
		if col.NullN() > 0 {
			for r := from; r < from+int64(n); r++ {
				if col.IsNull(int(r)) {
					return core.Errorf(core.InvalidArgument, "column %q has a null at row %d of its batch", c.name, r)
				}
			}
		}
		vals := col
		first := int(from) * c.width
		if ext, ok := vals.(array.ExtensionArray); ok {
			vals = ext.Storage()
		}
		if l, ok := vals.(*array.FixedSizeList); ok {
			if l.ListValues().NullN() > 0 {
				return core.Errorf(core.InvalidArgument, "column %q has null elements", c.name)
			}
			first += l.Offset() * c.width
			vals = l.ListValues()
		}
		if err := convert(dst, k, at, off, vals, first, n, c.width); err != nil {
			return core.Errorf(core.InvalidArgument, "column %q: %v", c.name, err)
		}
		off += c.width
	}
	return nil
}

// convert copies n rows of w values of vals, starting at value first, into
// columns off..off+w of dst's rows at...
func convert[T float32 | int64](dst []T, k, at, off int, vals arrow.Array, first, n, w int) error {
	put := func(get func(i int) T) {
		for r := 0; r < n; r++ {
			row := dst[(at+r)*k+off : (at+r)*k+off+w]
			base := first + r*w
			for j := range row {
				row[j] = get(base + j)
			}
		}
	}
	switch a := vals.(type) {
	case *array.Float32:
		v := a.Float32Values()
		put(func(i int) T { return T(v[i]) })
	case *array.Float64:
		v := a.Float64Values()
		put(func(i int) T { return T(v[i]) })
	case *array.Float16:
		v := a.Values()
		put(func(i int) T { return T(v[i].Float32()) })
	case *array.Int8:
		v := a.Int8Values()
		put(func(i int) T { return T(v[i]) })
	case *array.Int16:
		v := a.Int16Values()
		put(func(i int) T { return T(v[i]) })
	case *array.Int32:
		v := a.Int32Values()
		put(func(i int) T { return T(v[i]) })
	case *array.Int64:
		v := a.Int64Values()
		put(func(i int) T { return T(v[i]) })
	case *array.Uint8:
		v := a.Uint8Values()
		put(func(i int) T { return T(v[i]) })
	case *array.Uint16:
		v := a.Uint16Values()
		put(func(i int) T { return T(v[i]) })
	case *array.Uint32:
		v := a.Uint32Values()
		put(func(i int) T { return T(v[i]) })
	case *array.Uint64:
		v := a.Uint64Values()
		put(func(i int) T { return T(v[i]) })
	default:
		return fmt.Errorf("type %s is not numeric", vals.DataType())
	}
	return nil
}

// Close releases the data source and any record held.
func (d *Dataset) Close() error {
	if d.cur != nil {
		d.cur.Release()
		d.cur = nil
	}
	d.src.Release()
	var errs []error
	for _, c := range d.closers {
		if err := c(); err != nil {
			errs = append(errs, err)
		}
	}
	d.closers = nil
	return errors.Join(errs...)
}

// fileRecordReader reads an IPC file's record batches in order, as an
// array.RecordReader.
type fileRecordReader struct {
	fr  *ipc.FileReader
	i   int
	rec arrow.RecordBatch
	err error
}

func (r *fileRecordReader) Retain()                        {}
func (r *fileRecordReader) Release()                       { r.release() }
func (r *fileRecordReader) Schema() *arrow.Schema          { return r.fr.Schema() }
func (r *fileRecordReader) RecordBatch() arrow.RecordBatch { return r.rec }
func (r *fileRecordReader) Record() arrow.Record           { return r.rec }
func (r *fileRecordReader) Err() error                     { return r.err }

func (r *fileRecordReader) release() {
	if r.rec != nil {
		r.rec.Release()
		r.rec = nil
	}
}

func (r *fileRecordReader) Next() bool {
	r.release()
	if r.err != nil || r.i >= r.fr.NumRecords() {
		return false
	}
	rec, err := r.fr.RecordBatch(r.i)
	if err != nil {
		r.err = fmt.Errorf("batch %d: %w", r.i, err)
		return false
	}
	rec.Retain()
	r.rec = rec
	r.i++
	return true
}
