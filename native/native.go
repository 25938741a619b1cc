// Package native is Kiln's thin cgo binding over the flat C ABI in kiln.h,
// which wraps libtorch. It converts C errors into Go errors and C handles
// into small Go values; ownership, validation and convenience live in the
// core package, which is what applications use.
//
// The C++ sources in this directory are compiled by cgo. By default they
// build against Debian's libtorch (libtorch-dev); set CGO_CXXFLAGS and
// CGO_LDFLAGS (scripts/env.sh does it from LIBTORCH) to use another one,
// such as the libtorch shipped inside a pip torch package.
package native

/*
#cgo CXXFLAGS: -O2 -Wall -I/usr/include/torch/csrc/api/include
#cgo LDFLAGS: -ltorch -ltorch_cpu -lc10 -lstdc++ -ldl
#include <stdlib.h>
#include "kiln.h"

void kilnGoRelease(void* ctx);

// Wraps a buffer whose release callback is a Go function identified by a
// cgo.Handle: the handle travels as an integer, never as a Go pointer.
static kiln_error kiln_go_from_blob(void* data, kiln_dtype dtype,
                                    const int64_t* shape, int ndim,
                                    const int64_t* strides, uintptr_t handle,
                                    kiln_tensor** out) {
  return kiln_tensor_from_blob(data, dtype, shape, ndim, strides,
                               handle ? kilnGoRelease : NULL,
                               (void*)handle, out);
}

// An address received from another runtime, as a pointer (see AddrPointer).
static void* kiln_go_addr(uintptr_t a) { return (void*)a; }
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// DType mirrors kiln_dtype.
type DType int32

// Element types, with the values of kiln_dtype.
const (
	Float32  DType = C.KILN_FLOAT32
	Float64  DType = C.KILN_FLOAT64
	Int64    DType = C.KILN_INT64
	Int32    DType = C.KILN_INT32
	Int8     DType = C.KILN_INT8
	Uint8    DType = C.KILN_UINT8
	Bool     DType = C.KILN_BOOL
	Float16  DType = C.KILN_FLOAT16
	BFloat16 DType = C.KILN_BFLOAT16
	Int16    DType = C.KILN_INT16
)

// takeErr converts a kiln_error into an *Error (nil for NULL) and frees it.
func takeErr(e C.kiln_error) error {
	if e == nil {
		return nil
	}
	err := &Error{Code: Code(C.kiln_error_code(e)), Message: C.GoString(C.kiln_error_message(e))}
	C.kiln_error_free(e)
	return err
}

// TakeError converts a kiln_error returned by a package extending the C
// ABI (passed as unsafe.Pointer(err)) into an *Error, nil for NULL, and
// frees it.
func TakeError(e unsafe.Pointer) error { return takeErr(C.kiln_error(e)) }

func takeString(s *C.char) string {
	if s == nil {
		return ""
	}
	v := C.GoString(s)
	C.kiln_string_free(s)
	return v
}

// shapePtr returns a pointer to the first dimension, or nil for a scalar.
// Go memory passed for the duration of a call only, as cgo allows.
func shapePtr(s []int64) *C.int64_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.int64_t)(unsafe.Pointer(&s[0]))
}

// TorchVersion is the libtorch version Kiln was compiled against.
func TorchVersion() string { return C.GoString(C.kiln_torch_version()) }

// SetNumThreads sets libtorch's intra-op thread count.
func SetNumThreads(n int) error { return takeErr(C.kiln_set_num_threads(C.int(n))) }

// NumThreads returns libtorch's intra-op thread count.
func NumThreads() int { return int(C.kiln_get_num_threads()) }

// SetNumInteropThreads sets libtorch's inter-op thread count; libtorch
// allows it once, before any inter-op work.
func SetNumInteropThreads(n int) error {
	return takeErr(C.kiln_set_num_interop_threads(C.int(n)))
}

// NumInteropThreads returns libtorch's inter-op thread count.
func NumInteropThreads() int { return int(C.kiln_get_num_interop_threads()) }

// ManualSeed seeds libtorch's default CPU generator.
func ManualSeed(seed uint64) { C.kiln_manual_seed(C.uint64_t(seed)) }

// Noop crosses into C and back doing nothing else; it measures cgo's cost.
func Noop(x int) int { return int(C.kiln_noop(C.int(x))) }

// Tensor is a raw handle to a libtorch tensor. The zero value is no tensor.
// Whoever holds it must call Free exactly once.
type Tensor struct{ p *C.kiln_tensor }

// Valid reports whether t refers to a tensor.
func (t Tensor) Valid() bool { return t.p != nil }

// Free releases the handle. The storage lives on while other tensors view it.
func (t Tensor) Free() { C.kiln_tensor_free(t.p) }

// LiveTensors returns the number of tensor handles alive now: made by any
// native call (this package's, trainer's, optimize's) and not yet freed
// with Free (kiln_tensor_live_count).
func LiveTensors() int64 { return int64(C.kiln_tensor_live_count()) }

// TensorFromBlob wraps C memory at data without copying. release, if not
// nil, runs exactly once, on an arbitrary thread, when libtorch drops the
// last reference to the storage; on error it never runs. data must not
// point into the Go heap.
func TensorFromBlob(data unsafe.Pointer, dt DType, shape, strides []int64, release func()) (Tensor, error) {
	if strides != nil && len(strides) != len(shape) {
		return Tensor{}, Errorf(InvalidArgument, "%d strides for %d dimensions", len(strides), len(shape))
	}
	var h cgo.Handle
	if release != nil {
		h = cgo.NewHandle(release)
	}
	var out *C.kiln_tensor
	err := takeErr(C.kiln_go_from_blob(data, C.kiln_dtype(dt), shapePtr(shape), C.int(len(shape)),
		shapePtr(strides), C.uintptr_t(h), &out))
	if err != nil {
		if h != 0 {
			h.Delete()
		}
		return Tensor{}, err
	}
	return Tensor{out}, nil
}

// TensorFromCopy makes a tensor owning a copy of nbytes at data, which may be
// Go memory (it is only read during the call).
func TensorFromCopy(data unsafe.Pointer, nbytes uintptr, dt DType, shape []int64) (Tensor, error) {
	var out *C.kiln_tensor
	err := takeErr(C.kiln_tensor_from_copy(data, C.size_t(nbytes), C.kiln_dtype(dt),
		shapePtr(shape), C.int(len(shape)), &out))
	return Tensor{out}, err
}

// TensorZeros makes a zero-filled tensor.
func TensorZeros(dt DType, shape []int64) (Tensor, error) {
	var out *C.kiln_tensor
	err := takeErr(C.kiln_tensor_zeros(C.kiln_dtype(dt), shapePtr(shape), C.int(len(shape)), &out))
	return Tensor{out}, err
}

// DType returns the element type.
func (t Tensor) DType() (DType, error) {
	var d C.kiln_dtype
	if err := takeErr(C.kiln_tensor_dtype(t.p, &d)); err != nil {
		return 0, err
	}
	return DType(d), nil
}

// Shape returns the sizes of every dimension.
func (t Tensor) Shape() []int64 {
	var buf [8]int64
	n := int(C.kiln_tensor_shape(t.p, shapePtr(buf[:]), C.int(len(buf))))
	if n <= len(buf) {
		return append([]int64(nil), buf[:max(n, 0)]...)
	}
	s := make([]int64, n)
	C.kiln_tensor_shape(t.p, shapePtr(s), C.int(n))
	return s
}

// Strides returns the stride of every dimension, in elements.
func (t Tensor) Strides() []int64 {
	var buf [8]int64
	n := int(C.kiln_tensor_strides(t.p, shapePtr(buf[:]), C.int(len(buf))))
	if n <= len(buf) {
		return append([]int64(nil), buf[:max(n, 0)]...)
	}
	s := make([]int64, n)
	C.kiln_tensor_strides(t.p, shapePtr(s), C.int(n))
	return s
}

// Numel returns the number of elements.
func (t Tensor) Numel() int64 { return int64(C.kiln_tensor_numel(t.p)) }

// IsContiguous reports whether the elements are laid out row-major without gaps.
func (t Tensor) IsContiguous() bool { return C.kiln_tensor_is_contiguous(t.p) != 0 }

// DataPtr returns the address of the first element of a contiguous CPU tensor.
func (t Tensor) DataPtr() (unsafe.Pointer, error) {
	var p unsafe.Pointer
	err := takeErr(C.kiln_tensor_data_ptr(t.p, &p))
	return p, err
}

// Contiguous returns a contiguous tensor with the same values (a new handle
// sharing storage when t already is contiguous).
func (t Tensor) Contiguous() (Tensor, error) {
	var out *C.kiln_tensor
	err := takeErr(C.kiln_tensor_contiguous(t.p, &out))
	return Tensor{out}, err
}

// ToDType converts the elements to dt in a new contiguous tensor.
func (t Tensor) ToDType(dt DType) (Tensor, error) {
	var out *C.kiln_tensor
	err := takeErr(C.kiln_tensor_to_dtype(t.p, C.kiln_dtype(dt), &out))
	return Tensor{out}, err
}

// Module is a raw handle to a TorchScript module. Whoever holds it must call
// Free exactly once.
type Module struct{ p *C.kiln_module }

// Valid reports whether m refers to a module.
func (m Module) Valid() bool { return m.p != nil }

// Free releases the module.
func (m Module) Free() { C.kiln_module_free(m.p) }

// LoadModule loads a TorchScript archive in eval mode.
func LoadModule(path string) (Module, error) {
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	var out *C.kiln_module
	err := takeErr(C.kiln_module_load(cs, &out))
	return Module{out}, err
}

// LoadModuleBytes loads a TorchScript archive held in memory.
func LoadModuleBytes(b []byte) (Module, error) {
	var out *C.kiln_module
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	err := takeErr(C.kiln_module_load_bytes(p, C.size_t(len(b)), &out))
	return Module{out}, err
}

// Save writes the module as a TorchScript archive.
func (m Module) Save(path string) error {
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_module_save(m.p, cs))
}

// SetTrain switches between training and eval mode.
func (m Module) SetTrain(train bool) error {
	t := 0
	if train {
		t = 1
	}
	return takeErr(C.kiln_module_set_train(m.p, C.int(t)))
}

// OptimizeForInference replaces a CPU module by its frozen,
// inference-optimized form (kiln_module_optimize_for_inference); on error
// the module is unchanged.
func (m Module) OptimizeForInference() error {
	return takeErr(C.kiln_module_optimize_for_inference(m.p))
}

// Forward runs the module under inference mode. Each returned tensor is a
// new handle the caller must Free.
func (m Module) Forward(inputs []Tensor) ([]Tensor, error) {
	// A Go array of C pointers: it holds no Go pointers, so cgo may read it.
	var stack [8]*C.kiln_tensor
	ins := stack[:0]
	if len(inputs) > len(stack) {
		ins = make([]*C.kiln_tensor, 0, len(inputs))
	}
	for _, t := range inputs {
		ins = append(ins, t.p)
	}
	var inPtr **C.kiln_tensor
	if len(ins) > 0 {
		inPtr = &ins[0]
	}
	var outs **C.kiln_tensor
	var n C.int
	if err := takeErr(C.kiln_module_forward(m.p, inPtr, C.int(len(ins)), &outs, &n)); err != nil {
		return nil, err
	}
	arr := unsafe.Slice(outs, int(n))
	res := make([]Tensor, int(n))
	for i, p := range arr {
		res[i] = Tensor{p}
	}
	C.kiln_tensor_array_free(outs)
	return res, nil
}

// Results of ForwardInto (kiln.h's KILN_FORWARD_INTO_*).
const (
	ForwardIntoDone     = int(C.KILN_FORWARD_INTO_DONE)
	ForwardIntoMismatch = int(C.KILN_FORWARD_INTO_MISMATCH)
	ForwardIntoAliased  = int(C.KILN_FORWARD_INTO_ALIASED)
)

// ForwardIntoMaxDims bounds the rank of a tensor in ForwardInto's
// descriptor.
const ForwardIntoMaxDims = int(C.KILN_FORWARD_INTO_MAX_DIMS)

// ForwardInto runs kiln_module_forward_into: forward on inputs that borrow
// the memory at the addresses in (C memory, or Go memory the caller keeps
// alive and pinned), each output copied to the address in out when desc's
// expectations hold. It returns ForwardIntoDone, ForwardIntoMismatch or
// ForwardIntoAliased.
func (m Module) ForwardInto(desc []int64, in, out []uintptr) (int, error) {
	var inPtr, outPtr *C.uintptr_t
	if len(in) > 0 {
		inPtr = (*C.uintptr_t)(unsafe.Pointer(&in[0]))
	}
	if len(out) > 0 {
		outPtr = (*C.uintptr_t)(unsafe.Pointer(&out[0]))
	}
	var descPtr *C.int64_t
	if len(desc) > 0 {
		descPtr = (*C.int64_t)(unsafe.Pointer(&desc[0]))
	}
	var status C.int
	err := takeErr(C.kiln_module_forward_into(m.p, descPtr, C.int(len(desc)), C.int(len(in)), inPtr,
		C.int(len(out)), outPtr, &status))
	return int(status), err
}

// Schema returns the forward method's TorchScript schema.
func (m Module) Schema() (string, error) {
	var s *C.char
	if err := takeErr(C.kiln_module_schema(m.p, &s)); err != nil {
		return "", err
	}
	return takeString(s), nil
}

// Arg is one argument of forward, as TorchScript declares it.
type Arg struct {
	Name string
	Type string
}

// Inputs returns forward's arguments, self excluded.
func (m Module) Inputs() ([]Arg, error) {
	var n C.int
	if err := takeErr(C.kiln_module_num_inputs(m.p, &n)); err != nil {
		return nil, err
	}
	args := make([]Arg, int(n))
	for i := range args {
		var name, typ *C.char
		if err := takeErr(C.kiln_module_input(m.p, C.int(i), &name, &typ)); err != nil {
			return nil, err
		}
		args[i] = Arg{Name: takeString(name), Type: takeString(typ)}
	}
	return args, nil
}

// OutputType returns forward's declared return type, e.g. "Tensor".
func (m Module) OutputType() (string, error) {
	var s *C.char
	if err := takeErr(C.kiln_module_output_type(m.p, &s)); err != nil {
		return "", err
	}
	return takeString(s), nil
}

// ParamStats returns the number of parameters and their size in bytes.
func (m Module) ParamStats() (count, bytes int64, err error) {
	var c, b C.int64_t
	err = takeErr(C.kiln_module_param_stats(m.p, &c, &b))
	return int64(c), int64(b), err
}

// Malloc allocates n bytes of C memory, outside the Go heap, for buffers
// that libtorch may keep (see TensorFromBlob). Release it with FreeC.
func Malloc(n uintptr) unsafe.Pointer {
	if n == 0 {
		n = 1
	}
	return C.malloc(C.size_t(n))
}

// FreeC releases memory from Malloc.
func FreeC(p unsafe.Pointer) { C.free(p) }

// Ptr returns the C handle (a kiln_tensor*), for cgo packages that extend
// the C ABI, such as native/trainer. It stays owned by t.
func (t Tensor) Ptr() unsafe.Pointer { return unsafe.Pointer(t.p) }

// TensorFromPtr adopts a kiln_tensor* made by a package extending the C
// ABI; the result owns it.
func TensorFromPtr(p unsafe.Pointer) Tensor { return Tensor{(*C.kiln_tensor)(p)} }

// Ptr returns the C handle (a kiln_module*), for cgo packages that extend
// the C ABI. It stays owned by m.
func (m Module) Ptr() unsafe.Pointer { return unsafe.Pointer(m.p) }

// ModuleFromPtr adopts a kiln_module* made by a package extending the C
// ABI; the result owns it.
func ModuleFromPtr(p unsafe.Pointer) Module { return Module{(*C.kiln_module)(p)} }

// AddrPointer turns the address of memory owned outside Go (a numpy array's
// data, an Arrow C Data Interface buffer) received as an integer from
// another runtime into a pointer. The caller vouches that the address is
// valid C memory.
func AddrPointer(addr uintptr) unsafe.Pointer { return C.kiln_go_addr(C.uintptr_t(addr)) }
