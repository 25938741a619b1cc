// Command ipccheck reads an Arrow IPC stream on stdin and writes it back on
// stdout after passing every batch through Kiln's Arrow code: the C Data
// Interface (export, then import), and for each arrow.fixed_shape_tensor
// column, a libtorch tensor made without copying and an Arrow array made
// back from that tensor without copying. Python tests use it to check that
// pyarrow and arrowio agree on the extension type and its data.
//
// Usage: ipccheck < in.arrows > out.arrows
//
// It exits with status 1 and a message on stderr if any step fails.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/cdata"
	"github.com/apache/arrow-go/v18/arrow/ipc"

	"github.com/kilnml/kiln/arrowio"
)

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "ipccheck:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	mem := arrowio.NewAllocator()
	r, err := ipc.NewReader(in, ipc.WithAllocator(mem))
	if err != nil {
		return fmt.Errorf("reading the stream: %w", err)
	}
	defer r.Release()
	var w *ipc.Writer
	for r.Next() {
		rec, err := passThrough(r.RecordBatch())
		if err != nil {
			return err
		}
		if w == nil {
			w = ipc.NewWriter(out, ipc.WithSchema(rec.Schema()), ipc.WithAllocator(mem))
		}
		err = w.Write(rec)
		rec.Release()
		if err != nil {
			return fmt.Errorf("writing: %w", err)
		}
	}
	if err := r.Err(); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("reading the stream: %w", err)
	}
	if w == nil { // no batch: still answer with the schema
		w = ipc.NewWriter(out, ipc.WithSchema(r.Schema()), ipc.WithAllocator(mem))
	}
	return w.Close()
}

// passThrough returns a new batch with rec's data after the C Data
// Interface and, for tensor columns, libtorch.
func passThrough(rec arrow.RecordBatch) (arrow.RecordBatch, error) {
	// The structs live in C memory, as a foreign caller's would.
	structs := arrowio.NewAllocator()
	ca := structs.Allocate(int(unsafe.Sizeof(cdata.CArrowArray{})))
	cs := structs.Allocate(int(unsafe.Sizeof(cdata.CArrowSchema{})))
	defer structs.Free(ca)
	defer structs.Free(cs)
	pa, ps := uintptr(unsafe.Pointer(&ca[0])), uintptr(unsafe.Pointer(&cs[0]))
	if err := arrowio.ExportRecordBatch(rec, pa, ps); err != nil {
		return nil, err
	}
	imported, err := arrowio.ImportRecordBatch(pa, ps)
	if err != nil {
		return nil, err
	}
	defer imported.Release()
	cols := make([]arrow.Array, imported.NumCols())
	defer func() {
		for _, c := range cols {
			if c != nil {
				c.Release()
			}
		}
	}()
	for i, col := range imported.Columns() {
		ext, ok := col.(*arrowio.FixedShapeTensorArray)
		if !ok {
			col.Retain()
			cols[i] = col
			continue
		}
		name := imported.ColumnName(i)
		t, err := arrowio.ArrayToTensor(ext, arrowio.NoCopy(), arrowio.PhysicalLayout())
		if err != nil {
			return nil, fmt.Errorf("column %q to tensor: %w", name, err)
		}
		typ := ext.TensorType()
		var opts []arrowio.TypeOption
		if n := typ.DimNames(); n != nil {
			opts = append(opts, arrowio.DimNames(n...))
		}
		if p := typ.Permutation(); p != nil {
			opts = append(opts, arrowio.Permutation(p...))
		}
		back, err := arrowio.TensorToFixedShapeArray(t, opts...)
		t.Close()
		if err != nil {
			return nil, fmt.Errorf("column %q back from its tensor: %w", name, err)
		}
		cols[i] = back
	}
	return array.NewRecordBatch(imported.Schema(), cols, imported.NumRows()), nil
}
