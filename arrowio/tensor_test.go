package arrowio

import (
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/testkit"
)

// cmem returns a checked C allocator that fails the test if anything it
// allocated is still live when the test ends.
func cmem(t *testing.T) *memory.CheckedAllocator {
	mem := memory.NewCheckedAllocator(NewAllocator())
	t.Cleanup(func() { mem.AssertSize(t, 0) })
	return mem
}

func float32s(mem memory.Allocator, n int) *array.Float32 {
	b := array.NewFloat32Builder(mem)
	defer b.Release()
	for i := range n {
		b.Append(float32(i))
	}
	return b.NewFloat32Array()
}

// valuesAddr is the address of element i of a primitive array's values
// buffer, counting from the array's offset.
func valuesAddr(a arrow.ArrayData, i int) uintptr {
	size := a.DataType().(arrow.FixedWidthDataType).BitWidth() / 8
	return uintptr(unsafe.Pointer(&a.Buffers()[1].Bytes()[(a.Offset()+i)*size]))
}

func dataPtr(t *testing.T, x *core.Tensor) uintptr {
	t.Helper()
	p, err := x.DataPtr()
	if err != nil {
		t.Fatal(err)
	}
	return uintptr(p)
}

func TestPrimitiveToTensorZeroCopy(t *testing.T) {
	for _, releaseArrayFirst := range []bool{true, false} {
		mem := cmem(t)
		all := float32s(mem, 10)
		arr := array.NewSlice(all, 2, 7).(*array.Float32)
		all.Release()
		x, err := ArrayToTensor(arr, NoCopy())
		if err != nil {
			t.Fatal(err)
		}
		if got, want := dataPtr(t, x), valuesAddr(arr.Data(), 0); got != want {
			t.Errorf("tensor at %#x, Arrow values at %#x", got, want)
		}
		if !equalInts(x.Shape(), []int64{5}) || x.DType() != core.Float32 {
			t.Errorf("tensor %v, want float32 [5]", x)
		}
		if releaseArrayFirst {
			arr.Release()
		}
		got, err := core.CopyData[float32](x)
		if err != nil {
			t.Fatal(err)
		}
		if want := []float32{2, 3, 4, 5, 6}; !equalFloats(got, want) {
			t.Errorf("values %v, want %v", got, want)
		}
		if mem.CurrentAlloc() == 0 {
			t.Error("the Arrow buffer was freed while the tensor uses it")
		}
		x.Close()
		if !releaseArrayFirst {
			arr.Release()
		}
	}
}

func TestFixedShapeToTensor(t *testing.T) {
	mem := cmem(t)
	// 4 rows of physical [3, 2] tensors, viewed logically as [2, 3].
	typ := mustType(t, arrow.PrimitiveTypes.Float32, []int64{3, 2}, Permutation(1, 0))
	vals := float32s(mem, 24)
	defer vals.Release()
	full, err := NewFixedShapeTensorArray(typ, vals)
	if err != nil {
		t.Fatal(err)
	}
	arr := array.NewSlice(full, 1, 4)
	full.Release()
	defer arr.Release()

	x, err := ArrayToTensor(arr, NoCopy())
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	if !equalInts(x.Shape(), []int64{3, 2, 3}) {
		t.Fatalf("logical shape %v, want [3 2 3]", x.Shape())
	}
	if s, _ := x.Strides(); !equalInts(s, []int64{6, 1, 2}) {
		t.Errorf("strides %v, want [6 1 2]", s)
	}
	got, err := core.CopyData[float32](x)
	if err != nil {
		t.Fatal(err)
	}
	for r := range 3 {
		for i := range 2 {
			for j := range 3 {
				// logical [i][j] is physical [j][i]
				if want := float32(6*(r+1) + 2*j + i); got[r*6+i*3+j] != want {
					t.Fatalf("x[%d][%d][%d] = %v, want %v", r, i, j, got[r*6+i*3+j], want)
				}
			}
		}
	}

	// The strided view shares the Arrow memory: a write into the Arrow
	// buffer shows in it.
	vals.Float32Values()[6+1] = -1 // row 1, physical [0][1] = logical [1][0]
	if got, _ := core.CopyData[float32](x); got[3] != -1 {
		t.Errorf("x[0][1][0] = %v after writing -1 into the Arrow buffer", got[3])
	}

	phys, err := ArrayToTensor(arr, NoCopy(), PhysicalLayout())
	if err != nil {
		t.Fatal(err)
	}
	defer phys.Close()
	if !equalInts(phys.Shape(), []int64{3, 3, 2}) || !phys.IsContiguous() {
		t.Errorf("physical tensor %v contiguous=%v, want contiguous [3 3 2]", phys, phys.IsContiguous())
	}
	if got, want := dataPtr(t, phys), valuesAddr(vals.Data(), 6); got != want {
		t.Errorf("tensor at %#x, row 1 of the Arrow values at %#x", got, want)
	}
}

func TestFixedSizeListToTensor(t *testing.T) {
	mem := cmem(t)
	vals := float32s(mem, 12)
	defer vals.Release()
	typ := mustType(t, arrow.PrimitiveTypes.Float32, []int64{4})
	ext, err := NewFixedShapeTensorArray(typ, vals)
	if err != nil {
		t.Fatal(err)
	}
	defer ext.Release()
	x, err := ArrayToTensor(ext.Storage(), NoCopy())
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	if !equalInts(x.Shape(), []int64{3, 4}) || dataPtr(t, x) != valuesAddr(vals.Data(), 0) {
		t.Errorf("tensor %v at %#x, want [3 4] at %#x", x, dataPtr(t, x), valuesAddr(vals.Data(), 0))
	}
}

func TestGoMemoryIsCopiedOnce(t *testing.T) {
	gomem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	defer gomem.AssertSize(t, 0)
	arr := float32s(gomem, 6)
	defer arr.Release()

	if _, err := ArrayToTensor(arr, NoCopy()); !errors.Is(err, ErrNeedsCopy) {
		t.Errorf("NoCopy on Go memory: %v, want ErrNeedsCopy", err)
	}
	copies := cmem(t)
	x, err := ArrayToTensor(arr, CopyAllocator(copies))
	if err != nil {
		t.Fatal(err)
	}
	if dataPtr(t, x) == valuesAddr(arr.Data(), 0) {
		t.Error("the tensor points into the Go heap")
	}
	if copies.CurrentAlloc() != 24 {
		t.Errorf("copy allocated %d bytes, want 24", copies.CurrentAlloc())
	}
	got, _ := core.CopyData[float32](x)
	if !equalFloats(got, []float32{0, 1, 2, 3, 4, 5}) {
		t.Errorf("copied values %v", got)
	}
	x.Close()
	if copies.CurrentAlloc() != 0 {
		t.Errorf("closing the tensor left %d bytes of its copy", copies.CurrentAlloc())
	}
	if _, err := ArrayToTensor(arr, CopyAllocator(memory.NewGoAllocator())); err == nil || !strings.Contains(err.Error(), "does not allocate C memory") {
		t.Errorf("copy into Go memory: %v", err)
	}
}

func TestToTensorRejects(t *testing.T) {
	mem := cmem(t)
	fb := array.NewFloat32Builder(mem)
	fb.AppendValues([]float32{1, 2, 3, 4}, []bool{true, true, false, true})
	withNull := fb.NewArray()
	fb.Release()
	defer withNull.Release()
	if _, err := ArrayToTensor(withNull); err == nil || !strings.Contains(err.Error(), "nulls") {
		t.Errorf("null element: %v", err)
	}
	// The null lies outside this slice.
	tail := array.NewSlice(withNull, 3, 4)
	defer tail.Release()
	if x, err := ArrayToTensor(tail, NoCopy()); err != nil {
		t.Errorf("slice without the null: %v", err)
	} else {
		x.Close()
	}
	// A tensor of [2] per row whose second row holds the null element.
	typ := mustType(t, arrow.PrimitiveTypes.Float32, []int64{2})
	ext, err := NewFixedShapeTensorArray(typ, withNull)
	if err != nil {
		t.Fatal(err)
	}
	defer ext.Release()
	if _, err := ArrayToTensor(ext); err == nil || !strings.Contains(err.Error(), "nulls") {
		t.Errorf("tensor with a null element: %v", err)
	}
	lb := array.NewFixedSizeListBuilder(mem, 2, arrow.PrimitiveTypes.Float32)
	lb.Append(true)
	lb.ValueBuilder().(*array.Float32Builder).AppendValues([]float32{1, 2}, nil)
	lb.AppendNull()
	nullRow := lb.NewArray()
	lb.Release()
	defer nullRow.Release()
	if _, err := ArrayToTensor(nullRow); err == nil || !strings.Contains(err.Error(), "1 null rows") {
		t.Errorf("null row: %v", err)
	}
	bb := array.NewBooleanBuilder(mem)
	bb.Append(true)
	bools := bb.NewArray()
	bb.Release()
	defer bools.Release()
	if _, err := ArrayToTensor(bools); err == nil || !strings.Contains(err.Error(), "bit-packed") {
		t.Errorf("booleans: %v", err)
	}
	sb := array.NewStringBuilder(mem)
	sb.Append("x")
	strs := sb.NewArray()
	sb.Release()
	defer strs.Release()
	if _, err := ArrayToTensor(strs); err == nil || !strings.Contains(err.Error(), "no tensor type") {
		t.Errorf("strings: %v", err)
	}
}

func TestEmptyArrayToTensor(t *testing.T) {
	mem := cmem(t)
	arr := float32s(mem, 0)
	defer arr.Release()
	x, err := ArrayToTensor(arr)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	if !equalInts(x.Shape(), []int64{0}) {
		t.Errorf("shape %v, want [0]", x.Shape())
	}
}

func testRecord(mem memory.Allocator) arrow.RecordBatch {
	schema := arrow.NewSchema([]arrow.Field{
		{Name: "a", Type: arrow.PrimitiveTypes.Float64},
		{Name: "b", Type: arrow.PrimitiveTypes.Float64},
		{Name: "n", Type: arrow.PrimitiveTypes.Int64},
	}, nil)
	b := array.NewRecordBuilder(mem, schema)
	defer b.Release()
	b.Field(0).(*array.Float64Builder).AppendValues([]float64{1, 2, 3}, nil)
	b.Field(1).(*array.Float64Builder).AppendValues([]float64{10, 20, 30}, nil)
	b.Field(2).(*array.Int64Builder).AppendValues([]int64{7, 8, 9}, nil)
	return b.NewRecordBatch()
}

func TestStackColumns(t *testing.T) {
	gomem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	defer gomem.AssertSize(t, 0)
	rec := testRecord(gomem)
	defer rec.Release()
	copies := cmem(t)
	x, err := StackColumns(rec, []string{"b", "a"}, CopyAllocator(copies))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := core.CopyData[float64](x)
	x.Close()
	if want := []float64{10, 1, 20, 2, 30, 3}; !equalFloats(got, want) || !equalInts(x.Shape(), []int64{3, 2}) {
		t.Errorf("stacked %v %v, want [3 2] %v", x.Shape(), got, want)
	}
	// A slice of the record keeps its offset.
	sl := rec.NewSlice(1, 3)
	defer sl.Release()
	y, err := StackColumns(sl, []string{"a", "b"})
	if err != nil {
		t.Fatal(err)
	}
	got, _ = core.CopyData[float64](y)
	y.Close()
	if want := []float64{2, 20, 3, 30}; !equalFloats(got, want) {
		t.Errorf("stacked slice %v, want %v", got, want)
	}
	for _, c := range []struct {
		names []string
		opts  []ConvertOption
		msg   string
	}{
		{[]string{"a", "n"}, nil, `column "n" is int64, column "a" is float64`},
		{[]string{"a", "zz"}, nil, `no column "zz" (columns: a, b, n)`},
		{nil, nil, "no column named"},
		{[]string{"a"}, []ConvertOption{NoCopy()}, "NoCopy"},
	} {
		if _, err := StackColumns(rec, c.names, c.opts...); err == nil || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%v: error %v, want one with %q", c.names, err, c.msg)
		}
	}
	n, err := ColumnToTensor(rec, "n")
	if err != nil {
		t.Fatal(err)
	}
	ids, _ := core.CopyData[int64](n)
	n.Close()
	if !equalInts(ids, []int64{7, 8, 9}) {
		t.Errorf("column n = %v", ids)
	}
	if _, err := ColumnToTensor(rec, "missing"); err == nil || !strings.Contains(err.Error(), `no column "missing"`) {
		t.Errorf("missing column: %v", err)
	}
}

// blob makes a tensor over C memory whose release increments *released.
func blob(t *testing.T, vals []float32, shape, strides []int64, released *atomic.Int32) *core.Tensor {
	t.Helper()
	mem := NewAllocator()
	b := mem.Allocate(len(vals) * 4)
	copy(asSlice[float32](b), vals)
	x, err := core.FromBlob(unsafe.Pointer(&b[0]), core.Float32, shape, strides, func() {
		mem.Free(b)
		released.Add(1)
	})
	if err != nil {
		t.Fatal(err)
	}
	return x
}

func TestTensorToArrayZeroCopy(t *testing.T) {
	cases := []struct {
		shape   []int64
		kind    string
		rowType []int64
	}{
		{[]int64{6}, "primitive", nil},
		{[]int64{6, 1}, "primitive", nil},
		{[]int64{2, 3}, "tensor", []int64{3}},
		{[]int64{1, 2, 3}, "tensor", []int64{2, 3}},
	}
	for _, c := range cases {
		var released atomic.Int32
		x := blob(t, []float32{0, 1, 2, 3, 4, 5}, c.shape, nil, &released)
		addr := dataPtr(t, x)
		arr, err := TensorToArray(x)
		if err != nil {
			t.Fatal(err)
		}
		x.Close() // the array keeps the memory alive
		if released.Load() != 0 {
			t.Fatalf("%v: memory released while the array uses it", c.shape)
		}
		var vals arrow.Array = arr
		if ext, ok := arr.(*FixedShapeTensorArray); ok {
			if c.kind != "tensor" || !equalInts(ext.TensorType().Shape(), c.rowType) {
				t.Errorf("%v: got %v", c.shape, arr.DataType())
			}
			vals = ext.ListStorage().ListValues()
		} else if c.kind != "primitive" {
			t.Errorf("%v: got %v, want a fixed_shape_tensor", c.shape, arr.DataType())
		}
		if arr.Len() != int(c.shape[0]) {
			t.Errorf("%v: %d rows", c.shape, arr.Len())
		}
		if got := valuesAddr(vals.Data(), 0); got != addr {
			t.Errorf("%v: Arrow values at %#x, tensor at %#x", c.shape, got, addr)
		}
		if got := vals.(*array.Float32).Float32Values(); !equalFloats(got, []float32{0, 1, 2, 3, 4, 5}) {
			t.Errorf("%v: values %v", c.shape, got)
		}
		arr.Release()
		if released.Load() != 1 {
			t.Errorf("%v: releasing the array released the memory %d times, want once", c.shape, released.Load())
		}
	}
}

func TestTensorToArrayCopiesNonContiguous(t *testing.T) {
	var released atomic.Int32
	// A [3, 2] transposed view of a row-major [2, 3].
	x := blob(t, []float32{0, 1, 2, 3, 4, 5}, []int64{3, 2}, []int64{1, 3}, &released)
	arr, err := TensorToFixedShapeArray(x, DimNames("pair"))
	if err != nil {
		t.Fatal(err)
	}
	x.Close()
	if released.Load() != 1 {
		t.Error("the array kept the non-contiguous original alive")
	}
	if got := arr.TensorType().DimNames(); !equalStrings(got, []string{"pair"}) {
		t.Errorf("dim names %v", got)
	}
	got := arr.ListStorage().ListValues().(*array.Float32).Float32Values()
	if want := []float32{0, 3, 1, 4, 2, 5}; !equalFloats(got, want) {
		t.Errorf("values %v, want %v", got, want)
	}
	arr.Release()
}

func TestTensorToArrayRejects(t *testing.T) {
	s, _ := core.Scalar[float32](1)
	defer s.Close()
	if _, err := TensorToArray(s); err == nil || !strings.Contains(err.Error(), "scalar") {
		t.Errorf("scalar: %v", err)
	}
	bf, _ := core.Zeros(core.BFloat16, 2, 2)
	defer bf.Close()
	if _, err := TensorToArray(bf); err == nil || !strings.Contains(err.Error(), "bfloat16") {
		t.Errorf("bfloat16: %v", err)
	}
}

// Arrow memory goes through libtorch and back without a copy: the model
// writes into the Arrow input buffer in place and returns a view of it, and
// its other output becomes an Arrow array over libtorch's memory.
func TestZeroCopyThroughModel(t *testing.T) {
	model := filepath.Join(testkit.Fixture(t, "inplace"), "inplace.pt")
	m, err := core.LoadModule(model)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	mem := cmem(t)
	vals := float32s(mem, 12)
	defer vals.Release()
	in, err := NewFixedShapeTensorArray(mustType(t, arrow.PrimitiveTypes.Float32, []int64{2, 3}), vals)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Release()
	x, err := ArrayToTensor(in, NoCopy())
	if err != nil {
		t.Fatal(err)
	}
	outs, err := m.Forward(x)
	x.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer core.CloseAll(outs)
	inAddr := valuesAddr(vals.Data(), 0)
	if got := dataPtr(t, outs[0]); got != inAddr {
		t.Errorf("libtorch worked at %#x, the Arrow input buffer is at %#x", got, inAddr)
	}
	if got := vals.Float32Values(); got[0] != 1 || got[11] != 12 {
		t.Errorf("libtorch's in-place write is not in the Arrow buffer: %v", got)
	}

	y, err := TensorToArray(outs[1])
	if err != nil {
		t.Fatal(err)
	}
	defer y.Release()
	yv := y.(*FixedShapeTensorArray).ListStorage().ListValues()
	if got, want := valuesAddr(yv.Data(), 0), dataPtr(t, outs[1]); got != want {
		t.Errorf("Arrow output buffer at %#x, libtorch's output at %#x", got, want)
	}
	if got := yv.(*array.Float32).Float32Values(); got[0] != 2 || got[11] != 24 {
		t.Errorf("output values %v", got)
	}
}

func TestIsCMemory(t *testing.T) {
	a := NewAllocator()
	b := a.Allocate(100)
	c := a.Allocate(10)
	p := unsafe.Pointer(&b[0])
	if !IsCMemory(p, 100) || !IsCMemory(unsafe.Add(p, 50), 50) || !IsCMemory(unsafe.Pointer(&c[3]), 7) {
		t.Error("allocated memory not recognized")
	}
	if IsCMemory(unsafe.Add(p, 50), 51) {
		t.Error("a range past the allocation's end is recognized")
	}
	goBuf := make([]byte, 64)
	if IsCMemory(unsafe.Pointer(&goBuf[0]), 1) {
		t.Error("Go memory is recognized as C memory")
	}
	a.Free(b)
	if IsCMemory(p, 1) {
		t.Error("freed memory is still recognized")
	}
	a.Free(c)
	if a.AllocatedBytes() != 0 {
		t.Errorf("%d bytes still allocated", a.AllocatedBytes())
	}
}

func equalFloats[T float32 | float64](a, b []T) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
