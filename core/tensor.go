package core

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/kilnml/kiln/native"
)

// ErrClosed is returned when a closed Tensor or Module is used; its code
// is FailedPrecondition.
var ErrClosed error = &Error{Code: FailedPrecondition, Message: "kiln: use of closed handle"}

// Tensor is an n-dimensional array held by libtorch in C memory.
//
// A Tensor is safe for concurrent use; Close waits for calls in flight.
// Its element type and shape never change.
type Tensor struct {
	mu      sync.RWMutex
	h       native.Tensor
	dtype   DType
	shape   []int64
	cleanup runtime.Cleanup
}

// wrap takes ownership of h.
func wrap(h native.Tensor) (*Tensor, error) {
	dt, err := h.DType()
	if err != nil {
		h.Free()
		return nil, fmt.Errorf("kiln: tensor: %w", err)
	}
	t := &Tensor{h: h, dtype: DType(dt), shape: h.Shape()}
	t.cleanup = runtime.AddCleanup(t, func(h native.Tensor) { h.Free() }, h)
	return t, nil
}

// LiveTensors returns the number of native tensor handles alive now in
// the process: every *Tensor not yet closed (nor released by its cleanup),
// plus handles that other native calls (training, optimization) hold for
// the duration of a call. Each is one libtorch tensor reference owned by
// Kiln; tensors that share storage count once each. A process at rest
// returns to the same count, so a count that grows with traffic is a leak.
// The count lives in C++ (kiln_tensor_live_count) and costs one atomic
// load.
func LiveTensors() int64 { return native.LiveTensors() }

func numElements(shape []int64) (int64, error) {
	n := int64(1)
	for i, d := range shape {
		if d < 0 {
			return 0, Errorf(InvalidArgument, "dimension %d is negative (%d)", i, d)
		}
		if d != 0 && n > (1<<62)/d {
			return 0, Errorf(InvalidArgument, "shape %v overflows", shape)
		}
		n *= d
	}
	return n, nil
}

// NewTensor copies data into a new tensor of the given shape, which must
// hold exactly len(data) elements. With no shape, the tensor is 1-D.
func NewTensor[T Element](data []T, shape ...int64) (*Tensor, error) {
	if shape == nil {
		shape = []int64{int64(len(data))}
	}
	n, err := numElements(shape)
	if err != nil {
		return nil, fmt.Errorf("kiln: new tensor: %w", err)
	}
	if n != int64(len(data)) {
		return nil, Errorf(InvalidArgument, "kiln: new tensor: shape %v holds %d elements, data has %d", shape, n, len(data))
	}
	var p unsafe.Pointer
	if len(data) > 0 {
		p = unsafe.Pointer(&data[0])
	}
	var z T
	h, err := native.TensorFromCopy(p, uintptr(len(data))*unsafe.Sizeof(z), native.DType(DTypeOf[T]()), shape)
	if err != nil {
		return nil, fmt.Errorf("kiln: new tensor: %w", err)
	}
	return wrap(h)
}

// Scalar makes a 0-dimensional tensor holding v.
func Scalar[T Element](v T) (*Tensor, error) {
	return NewTensor([]T{v}, []int64{}...)
}

// Zeros makes a zero-filled tensor.
func Zeros(dt DType, shape ...int64) (*Tensor, error) {
	if !dt.Valid() {
		return nil, Errorf(InvalidArgument, "kiln: zeros: unknown dtype %v", dt)
	}
	h, err := native.TensorZeros(native.DType(dt), shape)
	if err != nil {
		return nil, fmt.Errorf("kiln: zeros %v %v: %w", dt, shape, err)
	}
	return wrap(h)
}

// FromBlob wraps memory at data without copying it. data must be C memory
// (for example from C.malloc or Arrow's mallocator), never the Go heap,
// and must stay valid until release runs. strides, in elements, may be nil
// for a row-major layout. release, if not nil, runs exactly once when
// libtorch no longer uses the memory (after Close and after every tensor
// derived from it without copying is gone), possibly on another thread. On
// error release does not run and the caller still owns data.
func FromBlob(data unsafe.Pointer, dt DType, shape, strides []int64, release func()) (*Tensor, error) {
	if !dt.Valid() {
		return nil, Errorf(InvalidArgument, "kiln: from blob: unknown dtype %v", dt)
	}
	h, err := native.TensorFromBlob(data, native.DType(dt), shape, strides, release)
	if err != nil {
		return nil, fmt.Errorf("kiln: from blob %v %v: %w", dt, shape, err)
	}
	return wrap(h)
}

// DType returns the element type.
func (t *Tensor) DType() DType { return t.dtype }

// Shape returns a copy of the sizes of each dimension.
func (t *Tensor) Shape() []int64 { return append([]int64(nil), t.shape...) }

// Dim returns the number of dimensions.
func (t *Tensor) Dim() int { return len(t.shape) }

// NumElements returns the number of elements.
func (t *Tensor) NumElements() int64 {
	n, _ := numElements(t.shape)
	return n
}

// NumBytes returns the size of the elements in bytes.
func (t *Tensor) NumBytes() int64 { return t.NumElements() * int64(t.dtype.Size()) }

// String describes the tensor, e.g. "Tensor(float32, [2 3])".
func (t *Tensor) String() string {
	if t == nil {
		return "Tensor(nil)"
	}
	return fmt.Sprintf("Tensor(%v, %v)", t.dtype, t.shape)
}

// use runs f with the handle while holding a read lock.
func (t *Tensor) use(f func(h native.Tensor) error) error {
	if t == nil {
		return Errorf(InvalidArgument, "kiln: nil tensor")
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	if !t.h.Valid() {
		return ErrClosed
	}
	return f(t.h)
}

// Strides returns the stride of each dimension, in elements.
func (t *Tensor) Strides() ([]int64, error) {
	var s []int64
	err := t.use(func(h native.Tensor) error { s = h.Strides(); return nil })
	return s, err
}

// IsContiguous reports whether the elements are row-major without gaps.
func (t *Tensor) IsContiguous() bool {
	ok := false
	_ = t.use(func(h native.Tensor) error { ok = h.IsContiguous(); return nil })
	return ok
}

// DataPtr returns the address of the first element. The tensor must be
// contiguous. The address stays valid until the tensor is closed.
func (t *Tensor) DataPtr() (unsafe.Pointer, error) {
	var p unsafe.Pointer
	err := t.use(func(h native.Tensor) (err error) {
		p, err = h.DataPtr()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("kiln: data pointer of %v: %w", t, err)
	}
	return p, nil
}

// Contiguous returns a contiguous tensor with the same values: a new handle
// on the same memory when t already is contiguous, a copy otherwise. The
// result must be closed separately.
func (t *Tensor) Contiguous() (*Tensor, error) {
	var out native.Tensor
	if err := t.use(func(h native.Tensor) (err error) { out, err = h.Contiguous(); return err }); err != nil {
		return nil, fmt.Errorf("kiln: contiguous %v: %w", t, err)
	}
	return wrap(out)
}

// To converts the elements to dt, in a new tensor.
func (t *Tensor) To(dt DType) (*Tensor, error) {
	if !dt.Valid() {
		return nil, Errorf(InvalidArgument, "kiln: convert %v: unknown dtype %v", t, dt)
	}
	var out native.Tensor
	if err := t.use(func(h native.Tensor) (err error) { out, err = h.ToDType(native.DType(dt)); return err }); err != nil {
		return nil, fmt.Errorf("kiln: convert %v to %v: %w", t, dt, err)
	}
	return wrap(out)
}

// Data returns the elements of a contiguous tensor as a slice that views
// the tensor's C memory without copying. The slice is valid only until the
// tensor is closed; writes through it change the tensor. T must match the
// tensor's dtype.
func Data[T Element](t *Tensor) ([]T, error) {
	if want := DTypeOf[T](); t != nil && t.dtype != want {
		return nil, Errorf(InvalidArgument, "kiln: data of %v as %v: dtype mismatch", t, want)
	}
	p, err := t.DataPtr()
	if err != nil {
		return nil, err
	}
	n := t.NumElements()
	if n == 0 {
		return []T{}, nil
	}
	return unsafe.Slice((*T)(p), n), nil
}

// CopyData returns a copy of the elements in a Go slice; the tensor may be
// non-contiguous.
func CopyData[T Element](t *Tensor) ([]T, error) {
	c, err := t.Contiguous()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	v, err := Data[T](c)
	if err != nil {
		return nil, err
	}
	return append([]T(nil), v...), nil
}

// Bytes returns the raw elements of a contiguous tensor without copying;
// valid until the tensor is closed.
func (t *Tensor) Bytes() ([]byte, error) {
	p, err := t.DataPtr()
	if err != nil {
		return nil, err
	}
	n := t.NumBytes()
	if n == 0 {
		return []byte{}, nil
	}
	return unsafe.Slice((*byte)(p), n), nil
}

// Handle returns the native handle for packages that cross into C
// themselves. It stays owned by t.
func (t *Tensor) Handle() native.Tensor {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.h
}

// Close releases the tensor's handle; memory is freed once no other tensor
// shares it. Closing twice is a no-op.
func (t *Tensor) Close() error {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.h.Valid() {
		t.cleanup.Stop()
		t.h.Free()
		t.h = native.Tensor{}
	}
	return nil
}

// CloseAll closes every tensor in ts.
func CloseAll(ts []*Tensor) {
	for _, t := range ts {
		t.Close()
	}
}

// AdoptTensor wraps a native tensor handle made elsewhere (for example by
// native/trainer); the Tensor takes ownership of h. On error h has been
// freed.
func AdoptTensor(h native.Tensor) (*Tensor, error) {
	if !h.Valid() {
		return nil, Errorf(InvalidArgument, "kiln: adopt tensor: invalid handle")
	}
	return wrap(h)
}

// Use runs f with the native handle while holding the tensor open, so
// that Close waits for f: for packages that cross into C themselves.
func (t *Tensor) Use(f func(h native.Tensor) error) error { return t.use(f) }
