package arrowio_test

import (
	"context"
	"errors"
	"io"
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
	"github.com/kilnml/kiln/core"
)

// trainingBatches returns batches of sizes rows with columns a (float64 =
// r), b (int32 = -r), t (fixed_shape_tensor [2] float32 = [r/2, r+1]),
// s (string, unused), label (int64 = r%3), t0 and t1 (float32, t's two
// values apart: Parquet has no fixed-size lists), rows numbered across
// batches.
func trainingBatches(t *testing.T, sizes ...int) []arrow.RecordBatch {
	t.Helper()
	mem := memory.NewGoAllocator()
	tt, err := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float32, []int64{2})
	require.NoError(t, err)
	schema := arrow.NewSchema([]arrow.Field{
		{Name: "a", Type: arrow.PrimitiveTypes.Float64},
		{Name: "b", Type: arrow.PrimitiveTypes.Int32},
		{Name: "t", Type: tt},
		{Name: "s", Type: arrow.BinaryTypes.String},
		{Name: "label", Type: arrow.PrimitiveTypes.Int64},
		{Name: "t0", Type: arrow.PrimitiveTypes.Float32},
		{Name: "t1", Type: arrow.PrimitiveTypes.Float32},
	}, nil)
	var out []arrow.RecordBatch
	r := 0
	for _, n := range sizes {
		ab, bb, vb := array.NewFloat64Builder(mem), array.NewInt32Builder(mem), array.NewFloat32Builder(mem)
		sb, lb := array.NewStringBuilder(mem), array.NewInt64Builder(mem)
		t0, t1 := array.NewFloat32Builder(mem), array.NewFloat32Builder(mem)
		for i := 0; i < n; i++ {
			ab.Append(float64(r))
			bb.Append(int32(-r))
			vb.AppendValues([]float32{float32(r) / 2, float32(r + 1)}, nil)
			sb.Append("x")
			lb.Append(int64(r % 3))
			t0.Append(float32(r) / 2)
			t1.Append(float32(r + 1))
			r++
		}
		vals := vb.NewArray()
		ta, err := arrowio.NewFixedShapeTensorArray(tt, vals)
		require.NoError(t, err)
		vals.Release()
		out = append(out, array.NewRecordBatch(schema, []arrow.Array{ab.NewArray(), bb.NewArray(), ta, sb.NewArray(), lb.NewArray(), t0.NewArray(), t1.NewArray()}, int64(n)))
	}
	return out
}

// drain reads every batch and checks the rows against the generator.
func drain(t *testing.T, d *arrowio.Dataset, total, batch int, withTargets bool) {
	t.Helper()
	row := 0
	for {
		b, err := d.Next(context.Background())
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		require.Equal(t, min(batch, total-row), b.Rows, "batches are BatchSize rows but the last")
		require.Equal(t, []int64{int64(b.Rows), 4}, b.Features.Shape())
		require.Equal(t, core.Float32, b.Features.DType())
		f, err := b.Features.Bytes()
		require.NoError(t, err)
		fv := unsafeFloats(f)
		for i := 0; i < b.Rows; i++ {
			r := float32(row + i)
			require.Equal(t, []float32{r, -r, r / 2, r + 1}, fv[4*i:4*i+4], "row %d", row+i)
		}
		if withTargets {
			require.Equal(t, []int64{int64(b.Rows), 1}, b.Targets.Shape())
			require.Equal(t, core.Int64, b.Targets.DType())
			tb, err := b.Targets.Bytes()
			require.NoError(t, err)
			for i := 0; i < b.Rows; i++ {
				require.EqualValues(t, (row+i)%3, int64(tb[8*i]))
			}
		} else {
			require.Nil(t, b.Targets)
		}
		row += b.Rows
		b.Close()
	}
	require.Equal(t, total, row)
	_, err := d.Next(context.Background())
	require.ErrorIs(t, err, io.EOF)
}

func unsafeFloats(b []byte) []float32 {
	out := make([]float32, len(b)/4)
	for i := range out {
		u := uint32(b[4*i]) | uint32(b[4*i+1])<<8 | uint32(b[4*i+2])<<16 | uint32(b[4*i+3])<<24
		out[i] = math.Float32frombits(u)
	}
	return out
}

func TestDatasetSources(t *testing.T) {
	recs := trainingBatches(t, 7, 0, 30, 5, 1)
	schema := recs[0].Schema()
	dir := t.TempDir()
	opts := arrowio.DatasetOptions{Features: []string{"a", "b", "t"}, Targets: []string{"label"}, TargetDType: core.Int64, BatchSize: 8}

	// IPC file.
	ipcFile := filepath.Join(dir, "d.arrow")
	f, err := os.Create(ipcFile)
	require.NoError(t, err)
	fw, err := ipc.NewFileWriter(f, ipc.WithSchema(schema))
	require.NoError(t, err)
	for _, r := range recs {
		require.NoError(t, fw.Write(r))
	}
	require.NoError(t, fw.Close())
	require.NoError(t, f.Close())
	// IPC stream.
	streamFile := filepath.Join(dir, "d.arrows")
	f, err = os.Create(streamFile)
	require.NoError(t, err)
	sw := ipc.NewWriter(f, ipc.WithSchema(schema))
	for _, r := range recs {
		require.NoError(t, sw.Write(r))
	}
	require.NoError(t, sw.Close())
	require.NoError(t, f.Close())
	// Parquet, one row group per batch, without the tensor column.
	pqFile := filepath.Join(dir, "d.parquet")
	f, err = os.Create(pqFile)
	require.NoError(t, err)
	keep := []int{0, 1, 3, 4, 5, 6}
	pqSchema := arrow.NewSchema(func() []arrow.Field {
		var fs []arrow.Field
		for _, i := range keep {
			fs = append(fs, schema.Field(i))
		}
		return fs
	}(), nil)
	pw, err := pqarrow.NewFileWriter(pqSchema, f, nil, pqarrow.NewArrowWriterProperties(pqarrow.WithStoreSchema()))
	require.NoError(t, err)
	for _, r := range recs {
		var cols []arrow.Array
		for _, i := range keep {
			cols = append(cols, r.Column(i))
		}
		require.NoError(t, pw.Write(array.NewRecordBatch(pqSchema, cols, r.NumRows())))
	}
	require.NoError(t, pw.Close())

	for _, path := range []string{ipcFile, streamFile, pqFile} {
		t.Run(filepath.Ext(path), func(t *testing.T) {
			opts := opts
			if path == pqFile {
				opts.Features = []string{"a", "b", "t0", "t1"}
			}
			d, err := arrowio.OpenDataset(path, opts)
			require.NoError(t, err)
			require.Equal(t, 4, d.NumFeatures())
			require.Equal(t, 1, d.NumTargets())
			drain(t, d, 43, 8, true)
			require.NoError(t, d.Close())
		})
	}
	t.Run("parquet projection", func(t *testing.T) {
		d, err := arrowio.OpenDataset(pqFile, arrowio.DatasetOptions{Features: []string{"a", "b", "t0", "t1"}, BatchSize: 100})
		require.NoError(t, err)
		defer d.Close()
		require.Equal(t, []string{"a", "b", "t0", "t1"}, fieldNames(d.Schema()), "only the selected columns are read")
		drain(t, d, 43, 100, false)
	})
	t.Run("table", func(t *testing.T) {
		tbl := array.NewTableFromRecords(schema, recs)
		defer tbl.Release()
		tr := array.NewTableReader(tbl, 6)
		d, err := arrowio.NewDataset(tr, arrowio.DatasetOptions{Features: []string{"a", "b", "t"}, BatchSize: 5})
		tr.Release()
		require.NoError(t, err)
		drain(t, d, 43, 5, false)
		require.NoError(t, d.Close())
	})
}

func fieldNames(s *arrow.Schema) []string {
	var out []string
	for _, f := range s.Fields() {
		out = append(out, f.Name)
	}
	return out
}

func TestDatasetErrors(t *testing.T) {
	recs := trainingBatches(t, 3)
	tr, err := array.NewRecordReader(recs[0].Schema(), recs)
	require.NoError(t, err)
	defer tr.Release()
	for _, c := range []struct {
		opts arrowio.DatasetOptions
		msg  string
	}{
		{arrowio.DatasetOptions{}, "no feature columns"},
		{arrowio.DatasetOptions{Features: []string{"nope"}}, `column "nope"`},
		{arrowio.DatasetOptions{Features: []string{"s"}}, "not numeric"},
		{arrowio.DatasetOptions{Features: []string{"a"}, Targets: []string{"label"}, TargetDType: core.Float16}, "target type"},
	} {
		_, err := arrowio.NewDataset(tr, c.opts)
		require.ErrorContains(t, err, c.msg)
	}
	_, err = arrowio.OpenDataset(filepath.Join(t.TempDir(), "missing.arrow"), arrowio.DatasetOptions{Features: []string{"a"}})
	require.Error(t, err)
	junk := filepath.Join(t.TempDir(), "junk")
	require.NoError(t, os.WriteFile(junk, []byte("definitely not arrow data"), 0o644))
	_, err = arrowio.OpenDataset(junk, arrowio.DatasetOptions{Features: []string{"a"}})
	require.ErrorContains(t, err, "not an Arrow IPC file")

	// Nulls are refused when the batch reaches them.
	b := array.NewFloat64Builder(memory.DefaultAllocator)
	b.AppendValues([]float64{1, 2, 3}, []bool{true, true, false})
	col := b.NewArray()
	schema := arrow.NewSchema([]arrow.Field{{Name: "a", Type: arrow.PrimitiveTypes.Float64, Nullable: true}}, nil)
	rec := array.NewRecordBatch(schema, []arrow.Array{col}, 3)
	rr, err := array.NewRecordReader(schema, []arrow.RecordBatch{rec})
	require.NoError(t, err)
	d, err := arrowio.NewDataset(rr, arrowio.DatasetOptions{Features: []string{"a"}, BatchSize: 2})
	require.NoError(t, err)
	defer d.Close()
	first, err := d.Next(context.Background())
	require.NoError(t, err)
	first.Close()
	_, err = d.Next(context.Background())
	require.ErrorContains(t, err, "null at row 2")
}
