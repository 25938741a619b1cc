package arrowio

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet"
	"github.com/apache/arrow-go/v18/parquet/compress"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"

	"github.com/kilnml/kiln/core"
)

// seedBatch is a small training table: a float64 feature with a null, an
// int32 feature, a fixed-size list of two float32 (a 2-wide feature), a
// string, a dictionary of strings and a boolean, over n rows.
func seedBatch(tb testing.TB, n int) arrow.RecordBatch {
	tb.Helper()
	mem := memory.NewGoAllocator()
	schema := arrow.NewSchema([]arrow.Field{
		{Name: "x", Type: arrow.PrimitiveTypes.Float64, Nullable: true},
		{Name: "i", Type: arrow.PrimitiveTypes.Int32},
		{Name: "v", Type: arrow.FixedSizeListOf(2, arrow.PrimitiveTypes.Float32)},
		{Name: "s", Type: arrow.BinaryTypes.String, Nullable: true},
		{Name: "d", Type: &arrow.DictionaryType{IndexType: arrow.PrimitiveTypes.Int8, ValueType: arrow.BinaryTypes.String}},
		{Name: "y", Type: arrow.FixedWidthTypes.Boolean},
	}, nil)
	b := array.NewRecordBuilder(mem, schema)
	defer b.Release()
	for r := range n {
		b.Field(0).(*array.Float64Builder).AppendValues([]float64{float64(r) / 2}, []bool{r%3 != 1})
		b.Field(1).(*array.Int32Builder).Append(int32(-r))
		lb := b.Field(2).(*array.FixedSizeListBuilder)
		lb.Append(true)
		lb.ValueBuilder().(*array.Float32Builder).AppendValues([]float32{float32(r), float32(r + 1)}, nil)
		b.Field(3).(*array.StringBuilder).AppendValues([]string{"ab"[r%2:]}, []bool{r%4 != 2})
		if err := b.Field(4).(*array.BinaryDictionaryBuilder).AppendString([]string{"cat", "dog"}[r%2]); err != nil {
			tb.Fatal(err)
		}
		b.Field(5).(*array.BooleanBuilder).Append(r%2 == 0)
	}
	return b.NewRecordBatch()
}

// seedFiles returns the seed batch written as an IPC file, IPC streams
// (plain and with LZ4 and ZSTD body compression) and Parquet files
// (uncompressed and Snappy).
func seedFiles(tb testing.TB) [][]byte {
	tb.Helper()
	rec := seedBatch(tb, 5)
	defer rec.Release()
	var out [][]byte
	var buf bytes.Buffer
	fw, err := ipc.NewFileWriter(&buf, ipc.WithSchema(rec.Schema()))
	if err != nil {
		tb.Fatal(err)
	}
	if err := fw.Write(rec); err != nil {
		tb.Fatal(err)
	}
	if err := fw.Write(rec); err != nil {
		tb.Fatal(err)
	}
	if err := fw.Close(); err != nil {
		tb.Fatal(err)
	}
	out = append(out, bytes.Clone(buf.Bytes()))
	for _, opt := range []ipc.Option{ipc.WithSchema(rec.Schema()), ipc.WithLZ4(), ipc.WithZstd()} {
		buf.Reset()
		sw := ipc.NewWriter(&buf, ipc.WithSchema(rec.Schema()), opt)
		if err := sw.Write(rec); err != nil {
			tb.Fatal(err)
		}
		if err := sw.Close(); err != nil {
			tb.Fatal(err)
		}
		out = append(out, bytes.Clone(buf.Bytes()))
	}
	tbl := array.NewTableFromRecords(rec.Schema(), []arrow.RecordBatch{rec})
	defer tbl.Release()
	for _, c := range []compress.Compression{compress.Codecs.Uncompressed, compress.Codecs.Snappy} {
		buf.Reset()
		props := parquet.NewWriterProperties(parquet.WithCompression(c), parquet.WithMaxRowGroupLength(3))
		if err := pqarrow.WriteTable(tbl, &buf, 3, props, pqarrow.DefaultWriterProps()); err != nil {
			tb.Fatal(err)
		}
		out = append(out, bytes.Clone(buf.Bytes()))
	}
	return out
}

func checkReadError(t *testing.T, err error) {
	t.Helper()
	if c := core.CodeOf(err); c != core.InvalidArgument && c != core.ResourceExhausted {
		t.Fatalf("error with code %v: %v", c, err)
	}
}

// FuzzReadTable reads bytes as an Arrow IPC file, IPC stream or Parquet
// file into a training table, as ReadTable does, seeded with such files
// (compressed and not). It must not panic, hang or allocate beyond what
// the bytes can hold; errors are INVALID_ARGUMENT or RESOURCE_EXHAUSTED;
// an accepted table has columns of equal length.
func FuzzReadTable(f *testing.F) {
	for _, b := range seedFiles(f) {
		f.Add(b)
	}
	f.Add([]byte("ARROW1"))
	f.Add([]byte("PAR1\x00\x00PAR1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		tb, err := readTable(bytes.NewReader(b), int64(len(b)), []string{"x", "i", "s", "d", "y"})
		if err != nil {
			checkReadError(t, err)
			return
		}
		for _, c := range tb.Columns {
			if c.Len() != tb.Rows() {
				t.Fatalf("column %q has %d rows, the table %d", c.Name, c.Len(), tb.Rows())
			}
		}
	})
}

// FuzzDataset streams bytes as a Dataset of features x, i, v and target
// i, as OpenDataset does, seeded like FuzzReadTable. It must not panic;
// errors are INVALID_ARGUMENT or RESOURCE_EXHAUSTED (or a null value);
// every batch has at most BatchSize rows of 4 features.
func FuzzDataset(f *testing.F) {
	for _, b := range seedFiles(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := openDataset(bytes.NewReader(b), int64(len(b)), DatasetOptions{
			Features: []string{"i", "v"}, Targets: []string{"i"}, TargetDType: core.Int64, BatchSize: 4})
		if err != nil {
			checkReadError(t, err)
			return
		}
		defer d.Close()
		for range 1000 {
			batch, err := d.Next(context.Background())
			if errors.Is(err, io.EOF) {
				return
			}
			if err != nil {
				checkReadError(t, err)
				return
			}
			if batch.Rows < 1 || batch.Rows > 4 || d.NumFeatures() != 3 {
				t.Fatalf("batch of %d rows, %d features", batch.Rows, d.NumFeatures())
			}
			batch.Close()
		}
	})
}
