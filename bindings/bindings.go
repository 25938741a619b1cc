// Package bindings is the Go surface that gopy wraps into the kiln Python
// package. It uses only types gopy supports (strings, ints, structs with
// methods, errors); tensors cross as addresses of memory that Python owns
// (numpy buffers, Arrow buffers) or that libtorch owns (results), never as
// element-by-element lists. Every exported function recovers panics into
// errors, since a Go panic would abort the Python interpreter.
package bindings

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"unsafe"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/native"
)

// guard, deferred by every exported function that returns an error, turns
// a panic into an Internal error and tags the error with its code (see
// tagged).
func guard(err *error) {
	if r := recover(); r != nil {
		*err = core.Errorf(core.Internal, "kiln: internal error: %v\n%s", r, debug.Stack())
	}
	*err = tagged(*err)
}

// codeTagPrefix and codeTagSuffix frame the code at the start of every
// error message the bindings return: "[KILN_INVALID_ARGUMENT] message".
// gopy turns a Go error into RuntimeError(str(err)), so the message is all
// that reaches Python; python/kiln/_errors.py reads the tag (only at
// position 0) to pick the exception class and shows the rest.
const (
	codeTagPrefix = "[KILN_"
	codeTagSuffix = "] "
)

// codeTagged is an error whose message starts with its code's tag.
type codeTagged struct{ err error }

func (e *codeTagged) Error() string {
	return codeTagPrefix + core.CodeOf(e.err).String() + codeTagSuffix + e.err.Error()
}

func (e *codeTagged) Unwrap() error { return e.err }

// tagged returns err with its code (core.CodeOf) written as a tag before
// its message; nil stays nil and an error tagged already is not tagged
// again.
func tagged(err error) error {
	if err == nil {
		return nil
	}
	var t *codeTagged
	if errors.As(err, &t) {
		return err
	}
	return &codeTagged{err}
}

// Init configures the process once, when the kiln Python package is
// imported: libtorch's intra-op threads from $KILN_NUM_THREADS, else the
// number of CPUs (internal/kilnenv reads the environment).
func Init() (err error) {
	defer guard(&err)
	vars, err := kilnenv.Load(os.Getenv)
	if err != nil {
		return fmt.Errorf("kiln: %w", err)
	}
	n := vars.NumThreads
	if n == 0 {
		n = runtime.NumCPU()
	}
	return core.SetNumThreads(n)
}

// Version returns Kiln's version.
func Version() string { return core.Version }

// TorchVersion returns the version of the libtorch Kiln runs on.
func TorchVersion() string { return core.TorchVersion() }

// SetNumThreads sets libtorch's intra-op thread count.
func SetNumThreads(n int) (err error) {
	defer guard(&err)
	return core.SetNumThreads(n)
}

// NumThreads returns libtorch's intra-op thread count.
func NumThreads() int { return core.NumThreads() }

// Model is a loaded TorchScript model.
type Model struct {
	m *core.Module
	// manifest is the package's manifest.json as JSON ("" for a file).
	manifest string
}

// LoadModel loads a Kiln model package directory or a TorchScript file
// (modelpkg.LoadModule: an int8 package's model loads under the quantized
// engine its manifest records).
func LoadModel(path string) (_ *Model, err error) {
	defer guard(&err)
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		m, man, err := modelpkg.Load(path)
		if err != nil {
			return nil, err
		}
		b, err := json.Marshal(man)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("kiln: model package %s: %w", path, err)
		}
		return &Model{m: m, manifest: string(b)}, nil
	}
	m, err := modelpkg.LoadModule(path)
	if err != nil {
		return nil, err
	}
	return &Model{m: m}, nil
}

// ManifestJSON returns the manifest of the package the model was loaded
// from (modelpkg.Manifest as JSON), or "" for a TorchScript file.
func (m *Model) ManifestJSON() string { return m.manifest }

// RecordLabels records a classifier's class labels in the manifest of the
// package in pkgDir and returns the new manifest as JSON. labelsJSON is a
// JSON list of the labels as text ("labels", what Go and the server read);
// pythonLabelsJSON the same labels, as many, with their Python types
// ("python_labels", what kiln.Model.classes_ returns). The manifest is
// rewritten atomically (modelpkg.WriteManifest).
func RecordLabels(pkgDir, labelsJSON, pythonLabelsJSON string) (_ string, err error) {
	defer guard(&err)
	var labels []string
	if err := json.Unmarshal([]byte(labelsJSON), &labels); err != nil {
		return "", fmt.Errorf("kiln: record labels: labels: %w", err)
	}
	var typed []json.RawMessage
	if err := json.Unmarshal([]byte(pythonLabelsJSON), &typed); err != nil {
		return "", fmt.Errorf("kiln: record labels: python labels: %w", err)
	}
	if len(typed) != len(labels) {
		return "", fmt.Errorf("kiln: record labels: %d labels but %d python labels", len(labels), len(typed))
	}
	man, err := modelpkg.Read(pkgDir)
	if err != nil {
		return "", err
	}
	man.Labels, man.PythonLabels = labels, json.RawMessage(pythonLabelsJSON)
	if err := modelpkg.WriteManifest(pkgDir, man); err != nil {
		return "", err
	}
	b, err := json.Marshal(man)
	if err != nil {
		return "", fmt.Errorf("kiln: record labels: %w", err)
	}
	return string(b), nil
}

// CopyPackage copies the Kiln model package in src (model.pt and
// manifest.json) into the directory dst, creating it if missing
// (modelpkg.Copy).
func CopyPackage(src, dst string) (err error) {
	defer guard(&err)
	_, err = modelpkg.Copy(src, dst)
	return err
}

// InputsJSON describes forward's arguments as a JSON list of
// {"name":..., "type":...}.
func (m *Model) InputsJSON() string {
	type arg struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	var args []arg
	for _, a := range m.m.Inputs() {
		args = append(args, arg{a.Name, a.Type})
	}
	b, _ := json.Marshal(args)
	return string(b)
}

// Schema returns forward's TorchScript schema.
func (m *Model) Schema() string { return m.m.Schema() }

// NumParameters returns the number of parameter elements.
func (m *Model) NumParameters() int64 { return m.m.NumParameters() }

// Close releases the model.
func (m *Model) Close() { m.m.Close() }

// tensorRef describes a buffer owned by the caller.
type tensorRef struct {
	Addr  uint64  `json:"addr"`
	DType string  `json:"dtype"`
	Shape []int64 `json:"shape"`
}

// Predict runs forward on tensors that view the caller's buffers without
// copying. inputsJSON is a JSON list of {"addr", "dtype", "shape"}, one per
// input: addr is the address of a C-contiguous buffer (a numpy array's data)
// that must stay alive and unchanged during the call, and for as long as
// any output that may alias it lives. The outputs are libtorch's memory,
// owned by the returned Output until its Close.
func (m *Model) Predict(inputsJSON string) (_ *Output, err error) {
	defer guard(&err)
	var refs []tensorRef
	if err := json.Unmarshal([]byte(inputsJSON), &refs); err != nil {
		return nil, core.Errorf(core.InvalidArgument, "kiln: predict: bad input description: %v", err)
	}
	ins := make([]*core.Tensor, 0, len(refs))
	defer func() { core.CloseAll(ins) }()
	for i, r := range refs {
		dt, err := core.ParseDType(r.DType)
		if err != nil {
			return nil, fmt.Errorf("kiln: predict: input %d: %w", i, err)
		}
		// The address is memory Python owns (outside the Go heap), so
		// libtorch may view it; nothing is released when the view dies.
		t, err := core.FromBlob(native.AddrPointer(uintptr(r.Addr)), dt, r.Shape, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("kiln: predict: input %d: %w", i, err)
		}
		ins = append(ins, t)
	}
	return m.forward(ins)
}

// forward runs the model and makes every output contiguous.
func (m *Model) forward(ins []*core.Tensor) (*Output, error) {
	outs, err := m.m.Forward(ins...)
	if err != nil {
		return nil, err
	}
	for i, o := range outs {
		if !o.IsContiguous() {
			c, err := o.Contiguous()
			if err != nil {
				core.CloseAll(outs)
				return nil, err
			}
			o.Close()
			outs[i] = c
		}
	}
	return &Output{ts: outs}, nil
}

// Output holds the tensors one Predict returned.
type Output struct {
	ts []*core.Tensor
}

// Count returns the number of output tensors.
func (o *Output) Count() int { return len(o.ts) }

// Addr returns the address of output i's first element (0 when empty).
func (o *Output) Addr(i int) (_ uint64, err error) {
	defer guard(&err)
	if i < 0 || i >= len(o.ts) {
		return 0, core.Errorf(core.InvalidArgument, "kiln: output %d of %d", i, len(o.ts))
	}
	p, err := o.ts[i].DataPtr()
	return uint64(uintptr(p)), err
}

// DType returns output i's element type name, e.g. "float32".
func (o *Output) DType(i int) string {
	if i < 0 || i >= len(o.ts) {
		return ""
	}
	return o.ts[i].DType().String()
}

// ShapeJSON returns output i's shape as a JSON list.
func (o *Output) ShapeJSON(i int) string {
	if i < 0 || i >= len(o.ts) {
		return "null"
	}
	b, _ := json.Marshal(o.ts[i].Shape())
	return string(b)
}

// Close releases every output tensor.
func (o *Output) Close() { core.CloseAll(o.ts) }

// PredictArrow runs forward on the columns of a record batch that the
// caller exported through the Arrow C Data Interface (pyarrow's
// RecordBatch._export_to_c) into the ArrowArray and ArrowSchema structs at
// arrayAddr and schemaAddr; Kiln takes ownership of the batch and releases
// it. columnsJSON lists, per model input, the column names that feed it:
// one column (a fixed_shape_tensor or numeric column, viewed without
// copying) or several numeric columns stacked into a [rows, k] feature
// matrix (one copy).
func (m *Model) PredictArrow(arrayAddr, schemaAddr uint64, columnsJSON string) (_ *Output, err error) {
	defer guard(&err)
	rec, err := arrowio.ImportRecordBatch(uintptr(arrayAddr), uintptr(schemaAddr))
	if err != nil {
		return nil, fmt.Errorf("kiln: predict: import Arrow batch: %w", err)
	}
	defer rec.Release()
	var cols [][]string
	if err := json.Unmarshal([]byte(columnsJSON), &cols); err != nil {
		return nil, core.Errorf(core.InvalidArgument, "kiln: predict: bad column description: %v", err)
	}
	ins := make([]*core.Tensor, 0, len(cols))
	defer func() { core.CloseAll(ins) }()
	for i, names := range cols {
		var t *core.Tensor
		switch len(names) {
		case 0:
			return nil, core.Errorf(core.InvalidArgument, "kiln: predict: input %d has no columns", i)
		case 1:
			t, err = arrowio.ColumnToTensor(rec, names[0])
		default:
			t, err = arrowio.StackColumns(rec, names)
		}
		if err != nil {
			return nil, fmt.Errorf("kiln: predict: input %d from columns %v: %w", i, names, err)
		}
		ins = append(ins, t)
	}
	return m.forward(ins)
}

// DTypeCode returns the code PredictInto's descriptors use for an element
// type name such as "float32" (-1 when unknown).
func DTypeCode(name string) int {
	dt, err := core.ParseDType(name)
	if err != nil {
		return -1
	}
	return int(dt)
}

// Results of PredictInto.
const (
	// PredictDone: the outputs were written into the caller's buffers.
	PredictDone = 0
	// PredictMismatch: an output's dtype or shape differs from the
	// descriptor (or it is not contiguous); nothing was written.
	PredictMismatch = 1
	// PredictAliased: an output shares memory with an input, so copying it
	// would break zero-copy; nothing was written.
	PredictAliased = 2
)

// PredictInto is the fast path of Predict for small outputs whose dtypes
// and shapes the caller already knows (from an earlier Predict with the
// same input shapes): one call, integer arguments only, no Go objects or
// strings handed back. It runs forward on the caller's input buffers
// without copying them and copies each output into a buffer the caller
// allocated.
//
// desc is the address of an int64 array describing the call:
//
//	nin, nout,
//	per input:  dtype code, ndim, dims...
//	per output: dtype code, ndim, dims...
//
// With one input and one output, in0 and out0 are their buffers'
// addresses; otherwise in0 is the address of an int64 array holding the
// nin input addresses followed by the nout output addresses (out0 is
// unused). Input buffers are C-contiguous and must stay alive and
// unchanged during the call; output buffers are C-contiguous, writable and
// exactly as large as their descriptors say.
//
// It returns PredictDone, or PredictMismatch / PredictAliased when the
// caller must use Predict instead (nothing written), or the model's error.
func (m *Model) PredictInto(desc, in0, out0 uint64) (_ int, err error) {
	defer guard(&err)
	d := unsafe.Slice((*int64)(native.AddrPointer(uintptr(desc))), 2)
	nin, nout := int(d[0]), int(d[1])
	if nin < 0 || nout < 0 || nin > 64 || nout > 64 {
		return 0, core.Errorf(core.InvalidArgument, "kiln: predict: bad descriptor (%d inputs, %d outputs)", nin, nout)
	}
	// The descriptor's length is known only while reading it: view it with
	// the largest length it can have; the native call reads forward and
	// checks each entry.
	d = unsafe.Slice(&d[0], 2+(nin+nout)*(2+core.ForwardIntoMaxDims))
	var stack [2]uintptr
	var ptrs []uintptr
	if nin == 1 && nout == 1 {
		stack[0], stack[1] = uintptr(in0), uintptr(out0)
		ptrs = stack[:]
	} else {
		ptrs = unsafe.Slice((*uintptr)(native.AddrPointer(uintptr(in0))), nin+nout)
	}
	status, err := m.m.ForwardInto(d[2:], ptrs[:nin], ptrs[nin:])
	if err != nil {
		return 0, fmt.Errorf("kiln: predict: %w", err)
	}
	switch status {
	case core.ForwardIntoDone:
		return PredictDone, nil
	case core.ForwardIntoAliased:
		return PredictAliased, nil
	default:
		return PredictMismatch, nil
	}
}
