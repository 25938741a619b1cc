// Package optimize is the cgo binding for Kiln's optimization C ABI
// (kiln_optimize.h): named tensors of a module, quantized engines and int8
// packed Linear weights. Like package native it only converts errors and
// handles; core/optimize builds on it.
package optimize

/*
#cgo CXXFLAGS: -std=c++17 -O2 -Wall -I/usr/include/torch/csrc/api/include
#cgo LDFLAGS: -ltorch -ltorch_cpu -lc10 -lstdc++
#include <stdlib.h>
#include "kiln_optimize.h"
*/
import "C"

import (
	"strings"
	"sync"
	"unsafe"

	"github.com/kilnml/kiln/native"
)

// takeErr converts a kiln_error into a *native.Error and frees it.
func takeErr(e C.kiln_error) error { return native.TakeError(unsafe.Pointer(e)) }

func mod(m native.Module) *C.kiln_module { return (*C.kiln_module)(m.Ptr()) }
func ten(t native.Tensor) *C.kiln_tensor { return (*C.kiln_tensor)(t.Ptr()) }

func takeString(f func(**C.char) C.kiln_error) (string, error) {
	var s *C.char
	if err := takeErr(f(&s)); err != nil {
		return "", err
	}
	defer C.kiln_string_free(s)
	return C.GoString(s), nil
}

// QEngines returns the quantized engines the linked libtorch supports
// (e.g. qnnpack, onednn; fbgemm on pip's x86 builds).
func QEngines() ([]string, error) {
	s, err := takeString(func(p **C.char) C.kiln_error { return C.kiln_opt_qengines(p) })
	if err != nil || s == "" {
		return nil, err
	}
	return strings.Split(s, ","), nil
}

// QEngine returns the process's current quantized engine.
func QEngine() (string, error) {
	return takeString(func(p **C.char) C.kiln_error { return C.kiln_opt_qengine(p) })
}

// SetQEngine selects the process-wide quantized engine.
func SetQEngine(engine string) error {
	cs := C.CString(engine)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_opt_set_qengine(cs))
}

// engineMu serializes WithQEngine's switches of the process-wide engine.
var engineMu sync.Mutex

// WithQEngine runs f with the process-wide quantized engine set to engine
// and restores the previous one afterwards. Loading a module whose int8
// weights were packed for an engine must happen under it: libtorch
// re-packs the weights on load for the current engine, while the packed
// weights, once loaded, run with the engine they were packed for.
func WithQEngine(engine string, f func() error) error {
	engineMu.Lock()
	defer engineMu.Unlock()
	prev, err := QEngine()
	if err != nil {
		return err
	}
	if prev != engine {
		if err := SetQEngine(engine); err != nil {
			return err
		}
		defer SetQEngine(prev)
	}
	return f()
}

// Get returns a copy of m's tensor attribute name; the caller owns it.
func Get(m native.Module, name string) (native.Tensor, error) {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	var out *C.kiln_tensor
	if err := takeErr(C.kiln_opt_get(mod(m), cs, &out)); err != nil {
		return native.Tensor{}, err
	}
	return native.TensorFromPtr(unsafe.Pointer(out)), nil
}

// Set copies v into m's tensor attribute name, which must have v's shape.
func Set(m native.Module, name string, v native.Tensor) error {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_opt_set(mod(m), cs, ten(v)))
}

// AddLinearInt8 quantizes weight to per-tensor symmetric qint8, packs it
// with bias (the zero Tensor: none) for the current quantized engine and
// registers the packed parameters as m's attribute name. It returns the
// weight scale.
func AddLinearInt8(m native.Module, name string, weight, bias native.Tensor) (float64, error) {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	var scale C.double
	err := takeErr(C.kiln_opt_add_linear_int8(mod(m), cs, ten(weight), ten(bias), &scale))
	return float64(scale), err
}

// AddPackedInt8 quantizes a linear, conv1d or conv2d weight (kind) to
// symmetric qint8, per output channel or per tensor, packs it with bias
// (the zero Tensor: none) and the conv's stride and padding for the
// current quantized engine, and registers the packed parameters as m's
// attribute name. It returns the weight's element count.
func AddPackedInt8(m native.Module, name, kind string, weight, bias native.Tensor, perChannel bool, stride, padding int64) (int64, error) {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	ck := C.CString(kind)
	defer C.free(unsafe.Pointer(ck))
	pc := C.int(0)
	if perChannel {
		pc = 1
	}
	var n C.int64_t
	err := takeErr(C.kiln_opt_add_packed_int8(mod(m), cs, ck, ten(weight), ten(bias), pc, C.int64_t(stride), C.int64_t(padding), &n))
	return int64(n), err
}

// Define compiles TorchScript methods into m's class with the quantized
// operators in scope as `quantized`.
func Define(m native.Module, src string) error {
	cs := C.CString(src)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_opt_define(mod(m), cs))
}
