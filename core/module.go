package core

import (
	"fmt"
	"os"
	"runtime"
	"sync"

	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/native/optimize"
)

// Arg describes one argument of a module's forward method.
type Arg struct {
	// Name is the argument's name in the TorchScript source, e.g. "x".
	Name string
	// Type is its TorchScript type, e.g. "Tensor".
	Type string
}

// Module is a TorchScript module loaded on the CPU, in eval mode.
// Forward is safe for concurrent use; Close waits for calls in flight.
type Module struct {
	mu      sync.RWMutex
	h       native.Module
	name    string
	inputs  []Arg
	output  string
	schema  string
	params  int64
	pbytes  int64
	cleanup runtime.Cleanup
	// qnnpack: the module was loaded for the qnnpack engine; its int8
	// forwards run one at a time in the process (see qnnpackMu).
	qnnpack bool
}

// qnnpackMu serializes the forwards of qnnpack int8 modules. qnnpack runs
// its kernels on one process-wide pthreadpool (caffe2::pthreadpool), and
// concurrent int8 forwards from several instances were seen to hang in
// pthreadpool_parallelize (gdb: one caller waiting on a futex for a worker
// that waits for work), so they do not overlap.
var qnnpackMu sync.Mutex

func newModule(h native.Module, name string) (*Module, error) {
	m := &Module{h: h, name: name}
	args, err := h.Inputs()
	for _, a := range args {
		m.inputs = append(m.inputs, Arg{Name: a.Name, Type: a.Type})
	}
	if err == nil {
		if m.output, err = h.OutputType(); err == nil {
			if m.schema, err = h.Schema(); err == nil {
				m.params, m.pbytes, err = h.ParamStats()
			}
		}
	}
	if err != nil {
		h.Free()
		return nil, fmt.Errorf("kiln: module %s: %w", name, err)
	}
	m.cleanup = runtime.AddCleanup(m, func(h native.Module) { h.Free() }, h)
	return m, nil
}

// LoadModule loads a TorchScript archive (as written by torch.jit.save)
// under the process's current quantized engine. It reads only the file:
// the model of a Kiln model package, whose manifest may record the
// quantized engine its int8 weights were packed for, loads with
// core/modelpkg (Load, LoadModule), which reads the manifest and calls
// LoadQuantizedModule.
func LoadModule(path string) (*Module, error) {
	return LoadQuantizedModule(path, "")
}

// LoadQuantizedModule loads a TorchScript archive under the quantized
// engine engine (a name of torch.backends.quantized.engine: "qnnpack",
// "onednn", "fbgemm", "x86"), so that int8 weights are packed for, and
// run with, the engine they were quantized for; the process's engine is
// put back afterwards. An engine this libtorch lacks is an error; ""
// loads under the current engine, as LoadModule does.
func LoadQuantizedModule(path, engine string) (*Module, error) {
	if _, err := os.Stat(path); err != nil {
		// CodeOf gives NotFound for a missing file (fs.ErrNotExist).
		return nil, fmt.Errorf("kiln: load module: %w", err)
	}
	var h native.Module
	var err error
	if engine != "" {
		err = optimize.WithQEngine(engine, func() error {
			h, err = native.LoadModule(path)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("kiln: load module %s (int8 for the %s engine): %w", path, engine, err)
		}
	} else if h, err = native.LoadModule(path); err != nil {
		return nil, fmt.Errorf("kiln: load module %s: %w", path, err)
	}
	m, err := newModule(h, path)
	if err == nil && engine == "qnnpack" {
		m.qnnpack = true
	}
	return m, err
}

// LoadModuleBytes loads a TorchScript archive held in memory.
func LoadModuleBytes(b []byte) (*Module, error) {
	if len(b) == 0 {
		return nil, Errorf(InvalidArgument, "kiln: load module: no bytes")
	}
	h, err := native.LoadModuleBytes(b)
	if err != nil {
		return nil, fmt.Errorf("kiln: load module from %d bytes: %w", len(b), err)
	}
	return newModule(h, fmt.Sprintf("<%d bytes>", len(b)))
}

// Inputs returns the arguments of forward, self excluded.
func (m *Module) Inputs() []Arg { return append([]Arg(nil), m.inputs...) }

// OutputType returns forward's declared return type, e.g. "Tensor" or
// "Tuple[Tensor, Tensor]".
func (m *Module) OutputType() string { return m.output }

// Schema returns the TorchScript schema of forward.
func (m *Module) Schema() string { return m.schema }

// NumParameters returns the number of parameter elements.
func (m *Module) NumParameters() int64 { return m.params }

// ParameterBytes returns the size of the parameters in bytes.
func (m *Module) ParameterBytes() int64 { return m.pbytes }

// String describes the module.
func (m *Module) String() string { return fmt.Sprintf("Module(%s: %s)", m.name, m.schema) }

func (m *Module) use(f func(h native.Module) error) error {
	if m == nil {
		return Errorf(InvalidArgument, "kiln: nil module")
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if !m.h.Valid() {
		return ErrClosed
	}
	return f(m.h)
}

// Forward runs the module on inputs without recording gradients. A module
// returning a tuple or list of tensors yields one tensor each, in order.
// The caller owns and must close the results.
func (m *Module) Forward(inputs ...*Tensor) ([]*Tensor, error) {
	// Hold every input's read lock so that none is closed mid-call.
	hs := make([]native.Tensor, len(inputs))
	for i, t := range inputs {
		if t == nil {
			return nil, Errorf(InvalidArgument, "kiln: forward: input %d is nil", i)
		}
		t.mu.RLock()
		defer t.mu.RUnlock()
		if !t.h.Valid() {
			return nil, fmt.Errorf("kiln: forward: input %d: %w", i, ErrClosed)
		}
		hs[i] = t.h
	}
	var outs []native.Tensor
	if m.qnnpack {
		qnnpackMu.Lock()
		defer qnnpackMu.Unlock()
	}
	err := m.use(func(h native.Module) (err error) {
		outs, err = h.Forward(hs)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("kiln: forward %s with %s: %w", m.name, describe(inputs), err)
	}
	res := make([]*Tensor, 0, len(outs))
	for i, o := range outs {
		t, err := wrap(o)
		if err != nil {
			CloseAll(res)
			for _, rest := range outs[i+1:] {
				rest.Free()
			}
			return nil, err
		}
		res = append(res, t)
	}
	return res, nil
}

// Results of ForwardInto.
const (
	// ForwardIntoDone: the outputs were written into the caller's buffers.
	ForwardIntoDone = native.ForwardIntoDone
	// ForwardIntoMismatch: the model returned another number of outputs,
	// or an output whose dtype or shape differs from the descriptor's (or
	// that is not contiguous); nothing was written.
	ForwardIntoMismatch = native.ForwardIntoMismatch
	// ForwardIntoAliased: an output shares memory with an input; nothing
	// was written.
	ForwardIntoAliased = native.ForwardIntoAliased
)

// ForwardIntoMaxDims bounds the rank of each tensor in ForwardInto's
// descriptor.
const ForwardIntoMaxDims = native.ForwardIntoMaxDims

// ForwardInto is Forward for small calls whose output dtypes and shapes
// the caller already knows, in one native call that makes no tensor
// handle: the inputs borrow the memory at the addresses in (C-contiguous,
// alive and unchanged during the call; C memory, or Go memory the caller
// keeps alive and pinned), and each output is copied into the buffer at
// the address out[i] (C-contiguous,
// writable, as large as described). desc describes every tensor, inputs
// first, then outputs, as int64s: DType code, number of dimensions (at
// most ForwardIntoMaxDims), the dimensions. It returns ForwardIntoDone, or
// ForwardIntoMismatch / ForwardIntoAliased when the caller must use
// Forward instead (nothing written), or an error (INVALID_ARGUMENT for a
// bad descriptor or inputs the model rejects).
func (m *Module) ForwardInto(desc []int64, in, out []uintptr) (int, error) {
	if m.qnnpack {
		qnnpackMu.Lock()
		defer qnnpackMu.Unlock()
	}
	var status int
	err := m.use(func(h native.Module) (err error) {
		status, err = h.ForwardInto(desc, in, out)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("kiln: forward %s: %w", m.name, err)
	}
	return status, nil
}

func describe(ts []*Tensor) string {
	s := "["
	for i, t := range ts {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%v%v", t.dtype, t.shape)
	}
	return s + "]"
}

// Save writes the module as a TorchScript archive that torch.jit.load reads.
func (m *Module) Save(path string) error {
	err := m.use(func(h native.Module) error { return h.Save(path) })
	if err != nil {
		return fmt.Errorf("kiln: save module to %s: %w", path, err)
	}
	return nil
}

// SetTraining switches the module between training and eval mode. Modules
// load in eval mode.
func (m *Module) SetTraining(train bool) error {
	return m.use(func(h native.Module) error { return h.SetTrain(train) })
}

// OptimizeForInference replaces a CPU module by its frozen,
// inference-optimized form, what PyTorch's
// torch.jit.optimize_for_inference(torch.jit.freeze(m.eval())) returns:
// parameters become constants, convolutions run on oneDNN with weights
// reordered once (batch norms folded into them), linear layers keep
// pre-transposed weights. Forward's inputs and outputs are unchanged;
// values may differ from the original module's by float rounding. The
// module is then for inference only: it stays in eval mode and cannot be
// trained, moved to another device or saved as the original. On error (a
// module on a CUDA device: InvalidArgument; one freezing refuses) it is
// left as it was.
func (m *Module) OptimizeForInference() error {
	return m.use(func(h native.Module) error { return h.OptimizeForInference() })
}

// Close releases the module. Closing twice is a no-op.
func (m *Module) Close() error {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.h.Valid() {
		m.cleanup.Stop()
		m.h.Free()
		m.h = native.Module{}
	}
	return nil
}

// AdoptModule wraps a native module handle made elsewhere (for example a
// network built by core/nn); the Module takes ownership of h and frees it
// on Close. On error h has been freed.
func AdoptModule(h native.Module, name string) (*Module, error) {
	if !h.Valid() {
		return nil, Errorf(InvalidArgument, "kiln: adopt module: invalid handle")
	}
	return newModule(h, name)
}

// Handle returns the native handle for packages that cross into C
// themselves (core/train). It stays owned by m and is valid until Close.
func (m *Module) Handle() native.Module {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.h
}
