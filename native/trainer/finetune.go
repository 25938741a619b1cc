package trainer

/*
#include <stdlib.h>
#include "kiln_train.h"
*/
import "C"

import (
	"unsafe"

	"github.com/kilnml/kiln/native"
)

// ParamGroup mirrors kiln_param_group: the parameters whose names start
// with Prefix train at learning rate LR.
type ParamGroup struct {
	Prefix string
	LR     float64
}

// FineTune says which parameters of a module train, and how fast (see
// kiln_trainer_new_finetune).
type FineTune struct {
	// Freeze holds name prefixes of parameters that stay fixed.
	Freeze []string
	// Groups are per-prefix learning rates; the first match wins.
	Groups []ParamGroup
	// FreezeBN keeps the submodules under Freeze in eval mode in training.
	FreezeBN bool
}

// NewFineTuneTrainer makes a trainer over the parameters of any
// TorchScript module m that f leaves trainable, and returns it with the
// number of trainable parameter elements. Frozen parameters get
// requires_grad false. It holds its own reference to m's object.
func NewFineTuneTrainer(m native.Module, o Options, f FineTune) (Trainer, int64, error) {
	co := o.c()
	// C strings and the group array live in C memory for the call.
	var cfreeze **C.char
	if n := len(f.Freeze); n > 0 {
		cfreeze = (**C.char)(C.calloc(C.size_t(n), C.size_t(unsafe.Sizeof((*C.char)(nil)))))
		defer C.free(unsafe.Pointer(cfreeze))
		arr := unsafe.Slice(cfreeze, n)
		for i, p := range f.Freeze {
			arr[i] = C.CString(p)
		}
		defer func() {
			for _, s := range arr {
				C.free(unsafe.Pointer(s))
			}
		}()
	}
	var cgroups *C.kiln_param_group
	if n := len(f.Groups); n > 0 {
		cgroups = (*C.kiln_param_group)(C.calloc(C.size_t(n), C.size_t(unsafe.Sizeof(C.kiln_param_group{}))))
		defer C.free(unsafe.Pointer(cgroups))
		arr := unsafe.Slice(cgroups, n)
		for i, g := range f.Groups {
			arr[i].prefix = C.CString(g.Prefix)
			arr[i].lr = C.double(g.LR)
		}
		defer func() {
			for _, g := range arr {
				C.free(unsafe.Pointer(g.prefix))
			}
		}()
	}
	var out *C.kiln_trainer
	var trainable C.int64_t
	err := takeErr(C.kiln_trainer_new_finetune(mod(m), &co, cfreeze, C.int(len(f.Freeze)),
		cgroups, C.int(len(f.Groups)), cbool(f.FreezeBN), &trainable, &out))
	if err != nil {
		return Trainer{}, 0, err
	}
	return Trainer{out}, int64(trainable), nil
}
