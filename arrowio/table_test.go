package arrowio_test

import (
	"bytes"
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core"
)

// tableBatch has a float64 column with a null, an int32, a bool, a string
// column with a null and a dictionary-encoded string column.
func tableBatch(t *testing.T) arrow.RecordBatch {
	t.Helper()
	mem := memory.NewGoAllocator()
	dictType := &arrow.DictionaryType{IndexType: arrow.PrimitiveTypes.Int8, ValueType: arrow.BinaryTypes.String}
	schema := arrow.NewSchema([]arrow.Field{
		{Name: "f", Type: arrow.PrimitiveTypes.Float64, Nullable: true},
		{Name: "i", Type: arrow.PrimitiveTypes.Int32},
		{Name: "b", Type: arrow.FixedWidthTypes.Boolean},
		{Name: "s", Type: arrow.BinaryTypes.String, Nullable: true},
		{Name: "d", Type: dictType},
	}, nil)
	bld := array.NewRecordBuilder(mem, schema)
	defer bld.Release()
	bld.Field(0).(*array.Float64Builder).AppendValues([]float64{1.5, 0, 3}, []bool{true, false, true})
	bld.Field(1).(*array.Int32Builder).AppendValues([]int32{7, -2, 9}, nil)
	bld.Field(2).(*array.BooleanBuilder).AppendValues([]bool{true, false, true}, nil)
	bld.Field(3).(*array.StringBuilder).AppendValues([]string{"x", "", "y"}, []bool{true, false, true})
	db := bld.Field(4).(*array.BinaryDictionaryBuilder)
	for _, v := range []string{"cat", "dog", "cat"} {
		require.NoError(t, db.AppendString(v))
	}
	return bld.NewRecordBatch()
}

func TestReadTable(t *testing.T) {
	rec := tableBatch(t)
	defer rec.Release()
	dir := t.TempDir()
	ipcPath := filepath.Join(dir, "t.arrow")
	f, err := os.Create(ipcPath)
	require.NoError(t, err)
	w, err := ipc.NewFileWriter(f, ipc.WithSchema(rec.Schema()))
	require.NoError(t, err)
	require.NoError(t, w.Write(rec))
	require.NoError(t, w.Write(rec))
	require.NoError(t, w.Close())
	require.NoError(t, f.Close())
	pqPath := filepath.Join(dir, "t.parquet")
	f, err = os.Create(pqPath)
	require.NoError(t, err)
	pw, err := pqarrow.NewFileWriter(rec.Schema(), f, nil, pqarrow.NewArrowWriterProperties(pqarrow.WithStoreSchema()))
	require.NoError(t, err)
	require.NoError(t, pw.Write(rec))
	require.NoError(t, pw.Write(rec))
	require.NoError(t, pw.Close())

	for _, path := range []string{ipcPath, pqPath} {
		t.Run(filepath.Ext(path), func(t *testing.T) {
			tb, err := arrowio.ReadTable(path, nil)
			require.NoError(t, err)
			require.Equal(t, []string{"f", "i", "b", "s", "d"}, tb.Names())
			require.Equal(t, 6, tb.Rows())
			require.Len(t, tb.Fingerprint, 64)
			c := tb.Columns
			require.False(t, c[0].Categorical)
			require.Equal(t, 1.5, c[0].Num[3])
			require.True(t, math.IsNaN(c[0].Num[4]))
			require.Equal(t, []float64{7, -2, 9, 7, -2, 9}, c[1].Num)
			require.Equal(t, []float64{1, 0, 1, 1, 0, 1}, c[2].Num)
			require.True(t, c[3].Categorical)
			require.Equal(t, []string{"x", "", "y", "x", "", "y"}, c[3].Str)
			require.True(t, c[4].Categorical)
			require.Equal(t, []string{"cat", "dog", "cat", "cat", "dog", "cat"}, c[4].Str)

			sel, err := arrowio.ReadTable(path, []string{"d", "i"})
			require.NoError(t, err)
			require.Equal(t, []string{"d", "i"}, sel.Names())
			require.Equal(t, tb.Fingerprint, sel.Fingerprint, "the fingerprint is the file's")

			_, err = arrowio.ReadTable(path, []string{"nope"})
			require.ErrorContains(t, err, `"nope"`)
		})
	}
	tr := array.NewTableReader(array.NewTableFromRecords(rec.Schema(), []arrow.RecordBatch{rec}), 2)
	defer tr.Release()
	tb, err := arrowio.TableFromRecords(tr, []string{"s", "f"})
	require.NoError(t, err)
	require.Equal(t, 3, tb.Rows())
	require.Len(t, tb.Fingerprint, 64)
}

// Malformed IPC metadata found by FuzzReadTable: a footer whose field name
// lies outside the buffer (arrow-go panicked) and a field that declares
// about 2^32 children (arrow-go allocated ~38 GiB and the process died).
// Both are INVALID_ARGUMENT errors now.
func TestReadTableRefusesMalformedMetadata(t *testing.T) {
	for _, name := range []string{"ipc-footer-out-of-range", "ipc-field-children-2e32"} {
		b, err := os.ReadFile(filepath.Join("testdata", "fuzz", "FuzzReadTable", name))
		require.NoError(t, err)
		// The corpus file format: a header line, then []byte("...").
		lines := strings.SplitN(string(b), "\n", 2)
		s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(lines[1]), "[]byte("), ")"))
		require.NoError(t, err)
		p := filepath.Join(t.TempDir(), "f.arrow")
		require.NoError(t, os.WriteFile(p, []byte(s), 0o644))
		_, err = arrowio.ReadTable(p, nil)
		require.Error(t, err, name)
		assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%s: %v", name, err)
	}
}

// A compressed IPC buffer that declares 1 TiB uncompressed is refused
// before it is allocated (RESOURCE_EXHAUSTED), as is a stream message body
// larger than the file.
func TestReadTableRefusesDeclaredSizes(t *testing.T) {
	rec := tableBatch(t)
	defer rec.Release()
	var buf bytes.Buffer
	w := ipc.NewWriter(&buf, ipc.WithSchema(rec.Schema()), ipc.WithLZ4())
	require.NoError(t, w.Write(rec))
	require.NoError(t, w.Close())
	b := buf.Bytes()
	// The int32 column "i" (3 values, 12 bytes) is an LZ4 frame after its
	// uncompressed length.
	at := bytes.Index(b, []byte("\x0c\x00\x00\x00\x00\x00\x00\x00\x04\x22\x4d\x18"))
	require.GreaterOrEqual(t, at, 0)
	dir := t.TempDir()
	good := filepath.Join(dir, "good.arrows")
	require.NoError(t, os.WriteFile(good, b, 0o644))
	_, err := arrowio.ReadTable(good, nil)
	require.NoError(t, err)

	huge := bytes.Clone(b)
	binary.LittleEndian.PutUint64(huge[at:], 1<<40)
	p := filepath.Join(dir, "huge.arrows")
	require.NoError(t, os.WriteFile(p, huge, 0o644))
	_, err = arrowio.ReadTable(p, nil)
	require.Error(t, err)
	assert.Equal(t, core.ResourceExhausted, core.CodeOf(err), "%v", err)

	cut := filepath.Join(dir, "cut.arrows")
	require.NoError(t, os.WriteFile(cut, b[:len(b)-40], 0o644))
	_, err = arrowio.ReadTable(cut, nil)
	require.Error(t, err)
	assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%v", err)
}

// An IPC file whose footer lists the same record batch twice is refused:
// each reference would be read, so a small file could declare any number
// of rows.
func TestReadTableRefusesOverlappingBlocks(t *testing.T) {
	rec := tableBatch(t)
	defer rec.Release()
	var buf bytes.Buffer
	w, err := ipc.NewFileWriter(&buf, ipc.WithSchema(rec.Schema()))
	require.NoError(t, err)
	require.NoError(t, w.Write(rec))
	require.NoError(t, w.Write(rec))
	require.NoError(t, w.Close())
	b := buf.Bytes()
	dir := t.TempDir()
	good := filepath.Join(dir, "good.arrow")
	require.NoError(t, os.WriteFile(good, b, 0o644))
	tb, err := arrowio.ReadTable(good, nil)
	require.NoError(t, err)
	require.Equal(t, 6, tb.Rows())

	// The footer's two record batch Blocks (offset, metadata length, body
	// length; 24 bytes each) differ only in their offsets: point the second
	// at the first.
	flen := int(binary.LittleEndian.Uint32(b[len(b)-10:]))
	footer := b[len(b)-10-flen : len(b)-10]
	at := -1
	for p := 0; p+48 <= len(footer); p += 8 {
		o1, o2 := binary.LittleEndian.Uint64(footer[p:]), binary.LittleEndian.Uint64(footer[p+24:])
		if o1 > 0 && o2 > o1 && o2 < uint64(len(b)) && bytes.Equal(footer[p+8:p+24], footer[p+32:p+48]) {
			at = p
			break
		}
	}
	require.GreaterOrEqual(t, at, 0, "the footer's blocks")
	copy(footer[at+24:at+32], footer[at:at+8])
	dup := filepath.Join(dir, "dup.arrow")
	require.NoError(t, os.WriteFile(dup, b, 0o644))
	_, err = arrowio.ReadTable(dup, nil)
	require.Error(t, err)
	assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%v", err)
	assert.ErrorContains(t, err, "overlap")
}
