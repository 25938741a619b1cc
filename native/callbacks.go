package native

import "C"

import (
	"log/slog"
	"runtime/cgo"
	"unsafe"
)

// kilnGoRelease is the release callback of tensors made by TensorFromBlob.
// libtorch calls it, possibly on one of its own threads, when the storage
// dies. A panic here would abort the process, so it is recovered and logged.
//
//export kilnGoRelease
func kilnGoRelease(ctx unsafe.Pointer) {
	h := cgo.Handle(uintptr(ctx))
	defer func() {
		if r := recover(); r != nil {
			slog.Error("kiln: tensor release callback panicked", "panic", r)
		}
	}()
	fn := h.Value().(func())
	h.Delete()
	fn()
}
