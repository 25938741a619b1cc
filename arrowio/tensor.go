package arrowio

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/bitutil"
	"github.com/apache/arrow-go/v18/arrow/memory"

	"github.com/kilnml/kiln/core"
)

// ErrNeedsCopy is returned, with the NoCopy option, for data that cannot
// become a tensor without a copy.
var ErrNeedsCopy = errors.New("arrowio: data is not C memory known to arrowio and NoCopy is set")

// DTypeOf returns the tensor element type of an Arrow value type. Arrow's
// bit-packed boolean and unsigned types wider than 8 bits have no libtorch
// equivalent and are errors.
func DTypeOf(dt arrow.DataType) (core.DType, error) {
	switch dt.ID() {
	case arrow.FLOAT32:
		return core.Float32, nil
	case arrow.FLOAT64:
		return core.Float64, nil
	case arrow.INT64:
		return core.Int64, nil
	case arrow.INT32:
		return core.Int32, nil
	case arrow.INT16:
		return core.Int16, nil
	case arrow.INT8:
		return core.Int8, nil
	case arrow.UINT8:
		return core.Uint8, nil
	case arrow.FLOAT16:
		return core.Float16, nil
	case arrow.BOOL:
		return 0, fmt.Errorf("arrowio: Arrow booleans are bit-packed and cannot be a tensor; cast the column to uint8")
	}
	return 0, fmt.Errorf("arrowio: no tensor type for Arrow type %v", dt)
}

// ArrowTypeOf returns the Arrow value type of a tensor element type.
// Arrow has no bfloat16 nor a byte-wide boolean primitive, so those are
// errors (convert such tensors with To first).
func ArrowTypeOf(d core.DType) (arrow.DataType, error) {
	switch d {
	case core.Float32:
		return arrow.PrimitiveTypes.Float32, nil
	case core.Float64:
		return arrow.PrimitiveTypes.Float64, nil
	case core.Int64:
		return arrow.PrimitiveTypes.Int64, nil
	case core.Int32:
		return arrow.PrimitiveTypes.Int32, nil
	case core.Int16:
		return arrow.PrimitiveTypes.Int16, nil
	case core.Int8:
		return arrow.PrimitiveTypes.Int8, nil
	case core.Uint8:
		return arrow.PrimitiveTypes.Uint8, nil
	case core.Float16:
		return arrow.FixedWidthTypes.Float16, nil
	}
	return nil, fmt.Errorf("arrowio: no Arrow type for tensor type %v; convert the tensor with To first", d)
}

// ConvertOption changes how Arrow data becomes a tensor.
type ConvertOption func(*convertConfig)

type convertConfig struct {
	noCopy   bool
	mem      memory.Allocator
	physical bool
}

// NoCopy makes a conversion that would have to copy fail with ErrNeedsCopy
// instead.
func NoCopy() ConvertOption { return func(c *convertConfig) { c.noCopy = true } }

// CopyAllocator sets the allocator of the C memory that copies go to;
// by default a package-wide Allocator. It must allocate C memory this
// package knows of: an Allocator, possibly wrapped (for example by
// memory.NewCheckedAllocator).
func CopyAllocator(mem memory.Allocator) ConvertOption {
	return func(c *convertConfig) { c.mem = mem }
}

// PhysicalLayout makes a fixed_shape_tensor column become a tensor of its
// physical, row-major shape, ignoring the type's permutation. By default
// the tensor has the logical shape, as a strided view of the same memory.
func PhysicalLayout() ConvertOption { return func(c *convertConfig) { c.physical = true } }

func newConfig(opts []ConvertOption) convertConfig {
	c := convertConfig{mem: defaultAllocator}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// ArrayToTensor returns a tensor of arr's values, without copying them
// when it can.
//
// arr may be a fixed_shape_tensor array (the tensor has shape
// [rows, shape...], in the logical layout unless PhysicalLayout is given),
// a FixedSizeList of numbers (shape [rows, size]), or a numeric primitive
// array (shape [rows]). Nulls, in rows or in elements, are errors.
//
// When the values are C memory this package knows of (see IsCMemory) and
// aligned for their type, the tensor points at them, respecting the
// array's offset: it Retains the Arrow values buffer and Releases it when
// libtorch drops the tensor's storage, so arr may be released first. Other
// values, such as those arrow-go's default Go allocator made, are copied
// once into C memory (see CopyAllocator), unless NoCopy is given. The
// tensor must be closed.
func ArrayToTensor(arr arrow.Array, opts ...ConvertOption) (*core.Tensor, error) {
	cfg := newConfig(opts)
	var (
		rowShape []int64
		perm     []int64
		values   arrow.ArrayData
	)
	switch a := arr.(type) {
	case *FixedShapeTensorArray:
		typ := a.TensorType()
		rowShape = typ.Shape()
		if !cfg.physical {
			perm = typ.Permutation()
		}
		values = a.Data().Children()[0]
	case *array.FixedSizeList:
		rowShape = []int64{int64(a.DataType().(*arrow.FixedSizeListType).Len())}
		values = a.Data().Children()[0]
	case array.ExtensionArray:
		return nil, fmt.Errorf("arrowio: %v arrays cannot become tensors", arr.DataType())
	default:
		if _, nested := arr.DataType().(arrow.NestedType); nested {
			return nil, fmt.Errorf("arrowio: %v arrays cannot become tensors", arr.DataType())
		}
		values = arr.Data()
	}
	if n := arr.NullN(); n > 0 && values != arr.Data() {
		return nil, fmt.Errorf("arrowio: %v array has %d null rows; a tensor cannot hold nulls", arr.DataType(), n)
	}
	dt, err := DTypeOf(values.DataType())
	if err != nil {
		return nil, err
	}
	width := int64(1)
	for _, d := range rowShape {
		width *= d
	}
	rows := int64(arr.Len())
	first := int64(arr.Data().Offset()) * width // in values, relative to the values data
	if values == arr.Data() {
		first = 0 // the offset is the values data's own
	}
	shape := append([]int64{rows}, rowShape...)
	strides := logicalStrides(shape, perm)
	if perm != nil {
		shape = append([]int64{rows}, permute(rowShape, perm)...)
	}
	t, err := valuesTensor(values, first, rows*width, dt, shape, strides, cfg)
	if err != nil {
		return nil, fmt.Errorf("arrowio: %v array of %d rows to tensor: %w", arr.DataType(), rows, err)
	}
	return t, nil
}

// logicalStrides returns the strides, in elements, of a row-major tensor
// of physical shape [rows, rowShape...] viewed with the row dimension
// first and the others in the order perm gives; nil when perm is trivial.
func logicalStrides(shape, perm []int64) []int64 {
	if trivialPermutation(perm) {
		return nil
	}
	phys := make([]int64, len(shape))
	s := int64(1)
	for i := len(shape) - 1; i >= 0; i-- {
		phys[i] = s
		s *= shape[i]
	}
	out := []int64{phys[0]}
	for _, p := range perm {
		out = append(out, phys[p+1])
	}
	return out
}

func permute(shape, perm []int64) []int64 {
	out := make([]int64, len(perm))
	for i, p := range perm {
		out[i] = shape[p]
	}
	return out
}

// valuesTensor makes a tensor of count elements of the primitive data
// values, starting count elements after its own offset plus first.
func valuesTensor(values arrow.ArrayData, first, count int64, dt core.DType, shape, strides []int64, cfg convertConfig) (*core.Tensor, error) {
	if count == 0 {
		return core.Zeros(dt, shape...)
	}
	start := int64(values.Offset()) + first
	if values.NullN() > 0 {
		if bm := values.Buffers()[0]; bm != nil && bitutil.CountSetBits(bm.Bytes(), int(start), int(count)) != int(count) {
			return nil, errors.New("values hold nulls; a tensor cannot hold nulls")
		}
	}
	buf := values.Buffers()[1]
	size := int64(dt.Size())
	if buf == nil || int64(buf.Len()) < (start+count)*size {
		return nil, fmt.Errorf("values buffer of %d bytes is too short for %d values from %d", bufLen(buf), count, start)
	}
	b := buf.Bytes()[start*size : (start+count)*size]
	p := unsafe.Pointer(unsafe.SliceData(b))
	if isCMemory(p, len(b)) && uintptr(p)%uintptr(size) == 0 {
		buf.Retain()
		t, err := core.FromBlob(p, dt, shape, strides, buf.Release)
		if err != nil {
			buf.Release()
			return nil, err
		}
		return t, nil
	}
	if cfg.noCopy {
		return nil, ErrNeedsCopy
	}
	c, err := allocC(cfg.mem, len(b))
	if err != nil {
		return nil, err
	}
	copy(c, b)
	return blobTensor(c, cfg.mem, dt, shape, strides)
}

func bufLen(b *memory.Buffer) int {
	if b == nil {
		return 0
	}
	return b.Len()
}

// allocC allocates n bytes with mem and checks that they are C memory.
func allocC(mem memory.Allocator, n int) ([]byte, error) {
	c := mem.Allocate(n)
	if !isCMemory(unsafe.Pointer(unsafe.SliceData(c)), n) {
		mem.Free(c)
		return nil, fmt.Errorf("allocator %T does not allocate C memory known to arrowio (use an arrowio.Allocator)", mem)
	}
	return c, nil
}

// blobTensor makes a tensor owning c, which mem allocated.
func blobTensor(c []byte, mem memory.Allocator, dt core.DType, shape, strides []int64) (*core.Tensor, error) {
	t, err := core.FromBlob(unsafe.Pointer(unsafe.SliceData(c)), dt, shape, strides, func() { mem.Free(c) })
	if err != nil {
		mem.Free(c)
		return nil, err
	}
	return t, nil
}

// columnIndex returns the index of the column named name.
func columnIndex(rec arrow.RecordBatch, name string) (int, error) {
	idx := rec.Schema().FieldIndices(name)
	switch len(idx) {
	case 1:
		return idx[0], nil
	case 0:
		names := make([]string, rec.NumCols())
		for i := range names {
			names[i] = rec.ColumnName(i)
		}
		return 0, fmt.Errorf("arrowio: no column %q (columns: %s)", name, strings.Join(names, ", "))
	}
	return 0, fmt.Errorf("arrowio: %d columns are named %q", len(idx), name)
}

// ColumnToTensor returns a tensor of the column named name, as
// ArrayToTensor does: without copying when the column is C memory.
func ColumnToTensor(rec arrow.RecordBatch, name string, opts ...ConvertOption) (*core.Tensor, error) {
	i, err := columnIndex(rec, name)
	if err != nil {
		return nil, err
	}
	t, err := ArrayToTensor(rec.Column(i), opts...)
	if err != nil {
		return nil, fmt.Errorf("arrowio: column %q: %w", name, err)
	}
	return t, nil
}

// StackColumns returns a [rows, len(names)] tensor whose column j holds
// the numeric column names[j], for models that take a feature matrix.
// The columns must share one type and hold no nulls. Arrow stores each
// column apart, so this always copies, once, into C memory (see
// CopyAllocator); NoCopy makes it fail. A single fixed-width column is
// better passed with ColumnToTensor, which need not copy.
func StackColumns(rec arrow.RecordBatch, names []string, opts ...ConvertOption) (*core.Tensor, error) {
	cfg := newConfig(opts)
	if len(names) == 0 {
		return nil, errors.New("arrowio: stack columns: no column named")
	}
	if cfg.noCopy {
		return nil, fmt.Errorf("arrowio: stack columns %v: %w", names, ErrNeedsCopy)
	}
	cols := make([]arrow.ArrayData, len(names))
	var dt core.DType
	for j, name := range names {
		i, err := columnIndex(rec, name)
		if err != nil {
			return nil, fmt.Errorf("arrowio: stack columns: %w", err)
		}
		col := rec.Column(i)
		d, err := DTypeOf(col.DataType())
		if _, nested := col.DataType().(arrow.NestedType); nested || col.DataType().ID() == arrow.EXTENSION {
			err = fmt.Errorf("%v is not a numeric column", col.DataType())
		}
		if err != nil {
			return nil, fmt.Errorf("arrowio: stack columns: column %q: %w", name, err)
		}
		if j > 0 && d != dt {
			return nil, fmt.Errorf("arrowio: stack columns: column %q is %v, column %q is %v; convert them to one type", name, d, names[0], dt)
		}
		if col.NullN() > 0 {
			return nil, fmt.Errorf("arrowio: stack columns: column %q has %d nulls; a tensor cannot hold nulls", name, col.NullN())
		}
		dt, cols[j] = d, col.Data()
	}
	rows, k, size := int(rec.NumRows()), len(cols), dt.Size()
	shape := []int64{int64(rows), int64(k)}
	if rows == 0 {
		return core.Zeros(dt, shape...)
	}
	c, err := allocC(cfg.mem, rows*k*size)
	if err != nil {
		return nil, fmt.Errorf("arrowio: stack columns: %w", err)
	}
	for j, d := range cols {
		src := d.Buffers()[1].Bytes()[d.Offset()*size : (d.Offset()+rows)*size]
		switch size {
		case 1:
			interleave(c, src, j, k)
		case 2:
			interleave(asSlice[uint16](c), asSlice[uint16](src), j, k)
		case 4:
			interleave(asSlice[uint32](c), asSlice[uint32](src), j, k)
		case 8:
			interleave(asSlice[uint64](c), asSlice[uint64](src), j, k)
		}
	}
	return blobTensor(c, cfg.mem, dt, shape, nil)
}

func asSlice[T any](b []byte) []T {
	var z T
	return unsafe.Slice((*T)(unsafe.Pointer(unsafe.SliceData(b))), len(b)/int(unsafe.Sizeof(z)))
}

// interleave writes src into column j of the row-major matrix dst of k
// columns.
func interleave[T any](dst, src []T, j, k int) {
	for i, v := range src {
		dst[i*k+j] = v
	}
}

// tensorOwner is the allocator of a buffer that views a tensor's memory:
// freeing the buffer closes the tensor handle that keeps the memory alive.
type tensorOwner struct {
	once sync.Once
	t    *core.Tensor
}

func (*tensorOwner) Allocate(int) []byte {
	panic("arrowio: a buffer viewing a tensor cannot allocate")
}

func (*tensorOwner) Reallocate(int, []byte) []byte {
	panic("arrowio: a buffer viewing a tensor cannot grow")
}

func (o *tensorOwner) Free([]byte) { o.once.Do(func() { o.t.Close() }) }

// tensorValues returns an Arrow primitive ArrayData viewing t's elements
// without copying them (t is made contiguous first, which copies only if it
// was not), holding its own handle on t's storage until Arrow releases it.
func tensorValues(t *core.Tensor) (arrow.ArrayData, error) {
	at, err := ArrowTypeOf(t.DType())
	if err != nil {
		return nil, err
	}
	c, err := t.Contiguous()
	if err != nil {
		return nil, err
	}
	b, err := c.Bytes()
	if err != nil {
		c.Close()
		return nil, err
	}
	n := int(c.NumElements())
	var buf *memory.Buffer
	if len(b) == 0 {
		c.Close()
	} else {
		buf = memory.NewBufferWithAllocator(b, &tensorOwner{t: c})
		defer buf.Release()
	}
	return array.NewData(at, n, []*memory.Buffer{nil, buf}, nil, 0, 0), nil
}

// TensorToArray returns an Arrow array of t's rows (its first dimension)
// whose values buffer is t's memory: a primitive array for a 1-D tensor or
// a [rows, 1] one, a fixed_shape_tensor array of shape t.Shape()[1:]
// otherwise. A non-contiguous t is copied once into a contiguous tensor.
// The array holds its own handle on the tensor's storage, closed when
// Arrow releases the array's buffer, so t may be closed at once. The
// caller must Release the array.
func TensorToArray(t *core.Tensor) (arrow.Array, error) {
	shape := t.Shape()
	switch {
	case len(shape) == 0:
		return nil, fmt.Errorf("arrowio: %v to array: a scalar has no rows", t)
	case len(shape) == 1 || (len(shape) == 2 && shape[1] == 1):
		vals, err := tensorValues(t)
		if err != nil {
			return nil, fmt.Errorf("arrowio: %v to array: %w", t, err)
		}
		defer vals.Release()
		return array.MakeFromData(vals), nil
	}
	a, err := TensorToFixedShapeArray(t)
	if err != nil {
		return nil, err
	}
	return a, nil
}

// TensorToFixedShapeArray returns a fixed_shape_tensor array of t's rows
// (its first dimension), with shape t.Shape()[1:] and the given dim names
// or permutation, whose values buffer is t's memory, as TensorToArray
// does.
func TensorToFixedShapeArray(t *core.Tensor, opts ...TypeOption) (*FixedShapeTensorArray, error) {
	shape := t.Shape()
	if len(shape) == 0 {
		return nil, fmt.Errorf("arrowio: %v to array: a scalar has no rows", t)
	}
	at, err := ArrowTypeOf(t.DType())
	if err != nil {
		return nil, fmt.Errorf("arrowio: %v to array: %w", t, err)
	}
	typ, err := NewFixedShapeTensorType(at, slices.Clone(shape[1:]), opts...)
	if err != nil {
		return nil, fmt.Errorf("arrowio: %v to array: %w", t, err)
	}
	vals, err := tensorValues(t)
	if err != nil {
		return nil, fmt.Errorf("arrowio: %v to array: %w", t, err)
	}
	defer vals.Release()
	data := array.NewData(typ, int(shape[0]), []*memory.Buffer{nil}, []arrow.ArrayData{vals}, 0, 0)
	defer data.Release()
	return array.NewExtensionData(data).(*FixedShapeTensorArray), nil
}
