package trainer

// #include <stdint.h>
import "C"

import (
	"log/slog"
	"runtime/cgo"
	"unsafe"
)

// kilnGoProgress is the progress callback of Trainer.Epoch. A panic in the
// Go callback must not unwind through C++: it is recovered, logged, and
// stops the epoch.
//
//export kilnGoProgress
func kilnGoProgress(ctx unsafe.Pointer, step, nsteps C.int64_t, lossSum C.double, seen C.int64_t) (ret C.int) {
	defer func() {
		if r := recover(); r != nil {
			slog.Error("kiln: training progress callback panicked", "panic", r)
			ret = 1
		}
	}()
	fn := cgo.Handle(uintptr(ctx)).Value().(Progress)
	if fn(int64(step), int64(nsteps), float64(lossSum), int64(seen)) {
		return 0
	}
	return 1
}
