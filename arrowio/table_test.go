package arrowio_test

import (
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/arrowio"
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
