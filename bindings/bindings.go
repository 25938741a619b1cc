// Package bindings is the Go surface that gopy wraps into the kiln Python
// package. It uses only types gopy supports (strings, ints, structs with
// methods, errors); tensors cross as addresses of memory that Python owns
// (numpy buffers, Arrow buffers) or that libtorch owns (results), never as
// element-by-element lists. Every exported function recovers panics into
// errors, since a Go panic would abort the Python interpreter.
package bindings

import (
	"encoding/json"
	"fmt"
	"runtime/debug"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native"
)

// guard turns a panic into an error.
func guard(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("kiln: internal error: %v\n%s", r, debug.Stack())
	}
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
}

// LoadModel loads a TorchScript file.
func LoadModel(path string) (_ *Model, err error) {
	defer guard(&err)
	m, err := core.LoadModule(path)
	if err != nil {
		return nil, err
	}
	return &Model{m: m}, nil
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
		return nil, fmt.Errorf("kiln: predict: bad input description: %w", err)
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
		return 0, fmt.Errorf("kiln: output %d of %d", i, len(o.ts))
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
		return nil, fmt.Errorf("kiln: predict: bad column description: %w", err)
	}
	ins := make([]*core.Tensor, 0, len(cols))
	defer func() { core.CloseAll(ins) }()
	for i, names := range cols {
		var t *core.Tensor
		switch len(names) {
		case 0:
			return nil, fmt.Errorf("kiln: predict: input %d has no columns", i)
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
