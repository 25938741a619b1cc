package arrowio

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet"
	"github.com/apache/arrow-go/v18/parquet/file"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"

	"github.com/kilnml/kiln/core"
)

// source is what the file readers need of a file: *os.File and
// *bytes.Reader are sources.
type source interface {
	io.Reader
	io.ReaderAt
	io.Seeker
}

// maxExpansion bounds what a file's buffers may expand to: no single
// buffer a reader allocates (a decompressed IPC buffer or Parquet page,
// an array) may be larger than maxExpansion times the file's size, or
// minAllocLimit, whichever is larger. Metadata that declares more is
// refused before anything that size is allocated.
const (
	maxExpansion  = 1024
	minAllocLimit = 64 << 20
)

// allocLimit is the largest single allocation allowed while reading a file
// of size bytes.
func allocLimit(size int64) int {
	if size > (1<<62)/maxExpansion {
		return 1 << 62
	}
	return int(max(minAllocLimit, size*maxExpansion))
}

// cappedAllocator refuses any single allocation larger than limit bytes by
// panicking with a RESOURCE_EXHAUSTED error: arrow-go's IPC readers turn a
// panic into an error, and readNext recovers it for the others.
type cappedAllocator struct {
	memory.Allocator
	limit int
}

func (a cappedAllocator) check(n int) {
	if n > a.limit || n < 0 {
		panic(core.Errorf(core.ResourceExhausted, "the file declares a buffer of %d bytes, more than %d (%d times the file's size) may be allocated for it", n, a.limit, maxExpansion))
	}
}

// Allocate allocates n bytes unless n is over the limit.
func (a cappedAllocator) Allocate(n int) []byte {
	a.check(n)
	return a.Allocator.Allocate(n)
}

// Reallocate grows b to n bytes unless n is over the limit.
func (a cappedAllocator) Reallocate(n int, b []byte) []byte {
	a.check(n)
	return a.Allocator.Reallocate(n, b)
}

// openSource opens f, of size bytes, as an Arrow IPC file, IPC stream or
// Parquet file (recognized by their magic bytes) and returns its record
// batches, which the caller releases, and a function that closes the file
// reader once they are released (f itself is not closed). Parquet is
// read batch rows at a time (0: 64Ki), projected on columns when columns
// is not empty. mem allocates the arrays; no single allocation may exceed
// allocLimit(size), and IPC messages may not be larger than the file. A
// panic in arrow-go's readers (they panic on some malformed metadata) is an
// INVALID_ARGUMENT error.
func openSource(f source, size int64, columns []string, batch int64, mem memory.Allocator) (rr array.RecordReader, closeSrc func(), err error) {
	defer func() {
		if p := recover(); p != nil {
			rr, closeSrc, err = nil, nil, recovered("opening", p)
		}
	}()
	magic := make([]byte, 6)
	n, _ := io.ReadFull(f, magic)
	magic = magic[:n]
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, nil, err
	}
	mem = cappedAllocator{Allocator: mem, limit: allocLimit(size)}
	bound := max(size, 1)
	ipcOpts := []ipc.Option{ipc.WithAllocator(mem), ipc.WithBodySizeLimit(bound), ipc.WithMetadataSizeLimit(bound)}
	switch {
	case bytes.Equal(magic, []byte("ARROW1")):
		if err := verifyIPCFile(f, size); err != nil {
			return nil, nil, fmt.Errorf("reading Arrow IPC file: %w", err)
		}
		fr, err := ipc.NewFileReader(f, ipcOpts...)
		if err != nil {
			return nil, nil, core.Errorf(core.InvalidArgument, "reading Arrow IPC file: %v", err)
		}
		return &fileRecordReader{fr: fr}, func() { fr.Close() }, nil
	case bytes.HasPrefix(magic, []byte("PAR1")):
		if batch <= 0 {
			batch = 64 * 1024
		}
		pf, err := openParquet(f, size, mem)
		if err != nil {
			return nil, nil, err
		}
		fr, err := pqarrow.NewFileReader(pf, pqarrow.ArrowReadProperties{BatchSize: batch}, mem)
		if err != nil {
			pf.Close()
			return nil, nil, core.Errorf(core.InvalidArgument, "reading Parquet file: %v", err)
		}
		var leaves []int
		if len(columns) > 0 {
			if leaves, err = parquetLeaves(fr, columns); err != nil {
				pf.Close()
				return nil, nil, core.Errorf(core.InvalidArgument, "%v; the file has columns %v", err, parquetNames(fr))
			}
		}
		rr, err := getRecordReader(fr, leaves)
		if err != nil {
			pf.Close()
			return nil, nil, core.Errorf(core.InvalidArgument, "reading Parquet columns: %v", err)
		}
		return rr, func() { pf.Close() }, nil
	default:
		if err := verifyIPCStream(f, size); err != nil {
			return nil, nil, fmt.Errorf("not an Arrow IPC file, IPC stream or Parquet file: %w", err)
		}
		sr, err := ipc.NewReader(f, ipcOpts...)
		if err != nil {
			return nil, nil, core.Errorf(core.InvalidArgument, "not an Arrow IPC file, IPC stream or Parquet file: %v", err)
		}
		return sr, func() {}, nil
	}
}

// openParquet opens a Parquet file whose page buffers mem allocates; a
// panic in the reader is an INVALID_ARGUMENT error.
func openParquet(f source, size int64, mem memory.Allocator) (pf *file.Reader, err error) {
	defer func() {
		if p := recover(); p != nil {
			pf, err = nil, recovered("reading Parquet file", p)
		}
	}()
	pf, err = file.NewParquetReader(f, file.WithReadProps(parquet.NewReaderProperties(mem)))
	if err != nil {
		return nil, core.Errorf(core.InvalidArgument, "reading Parquet file: %v", err)
	}
	if err := checkParquetChunks(pf, size); err != nil {
		pf.Close()
		return nil, err
	}
	return pf, nil
}

// checkParquetChunks refuses a Parquet file whose column chunks lie outside
// it or add up to more bytes than it has: chunks that overlap would be
// read (and their rows kept) once per reference, so a small file could
// declare any number of rows.
func checkParquetChunks(pf *file.Reader, size int64) error {
	md := pf.MetaData()
	var total int64
	for i := range md.NumRowGroups() {
		rg := md.RowGroup(i)
		for j := range rg.NumColumns() {
			cc, err := rg.ColumnChunk(j)
			if err != nil {
				return core.Errorf(core.InvalidArgument, "reading Parquet file: row group %d column %d: %v", i, j, err)
			}
			start := cc.DataPageOffset()
			if cc.HasDictionaryPage() && cc.DictionaryPageOffset() > 0 && cc.DictionaryPageOffset() < start {
				start = cc.DictionaryPageOffset()
			}
			n := cc.TotalCompressedSize()
			if start < 0 || n < 0 || start > size || n > size-start || n > size-total {
				return core.Errorf(core.InvalidArgument, "reading Parquet file: row group %d column %d: its %d bytes at %d do not fit in the file's %d bytes with the other chunks", i, j, n, start, size)
			}
			total += n
		}
	}
	return nil
}

func getRecordReader(fr *pqarrow.FileReader, leaves []int) (rr pqarrow.RecordReader, err error) {
	defer func() {
		if p := recover(); p != nil {
			rr, err = nil, recovered("reading Parquet columns", p)
		}
	}()
	return fr.GetRecordReader(context.Background(), leaves, nil)
}

// recovered is the error for a panic p recovered while reading a file: its
// own code when it is a coded error (the allocation cap), else
// INVALID_ARGUMENT (the readers panic on malformed input).
func recovered(what string, p any) error {
	if err, ok := p.(error); ok {
		if c := core.CodeOf(err); c != core.Unknown {
			return fmt.Errorf("%s: %w", what, err)
		}
		return core.Errorf(core.InvalidArgument, "%s: malformed data: %v", what, err)
	}
	return core.Errorf(core.InvalidArgument, "%s: malformed data: %v", what, p)
}

// readNext advances rdr to its next record batch and checks it with
// array.ValidateFull, so that buffers, offsets and dictionary indices that
// do not hold what the batch declares are refused before any value is
// read. It returns the batch, or nil at the end (the reader's error, if
// any, is returned then); a panic in the reader is an error.
func readNext(rdr array.RecordReader) (rec arrow.RecordBatch, err error) {
	defer func() {
		if p := recover(); p != nil {
			rec, err = nil, recovered("reading", p)
		}
	}()
	if !rdr.Next() {
		if err := rdr.Err(); err != nil && !errors.Is(err, io.EOF) {
			if core.CodeOf(err) == core.Unknown {
				return nil, core.Errorf(core.InvalidArgument, "reading: %v", err)
			}
			return nil, fmt.Errorf("reading: %w", err)
		}
		return nil, nil
	}
	rec = rdr.RecordBatch()
	if err := validateBatch(rec); err != nil {
		return nil, err
	}
	return rec, nil
}

// validateBatch checks that rec's columns have its row count and hold
// what their types declare.
func validateBatch(rec arrow.RecordBatch) error {
	n := rec.NumRows()
	for i, col := range rec.Columns() {
		name := rec.Schema().Field(i).Name
		if int64(col.Len()) != n {
			return core.Errorf(core.InvalidArgument, "column %q has %d rows, its batch %d", name, col.Len(), n)
		}
		if err := array.ValidateFull(col); err != nil {
			return core.Errorf(core.InvalidArgument, "column %q: malformed data: %v", name, err)
		}
	}
	return nil
}

// invalid gives err, when it carries no code, INVALID_ARGUMENT: what the
// readers refuse is the file's fault.
func invalid(err error) error {
	if err == nil || core.CodeOf(err) != core.Unknown {
		return err
	}
	return &codedError{code: core.InvalidArgument, err: err}
}

// codedError is err with a code, keeping err in the chain.
type codedError struct {
	code core.Code
	err  error
}

func (e *codedError) Error() string        { return e.err.Error() }
func (e *codedError) Unwrap() error        { return e.err }
func (e *codedError) ErrorCode() core.Code { return e.code }
