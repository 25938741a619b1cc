package flightserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/batcher"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
)

// FeaturesMetadataKey is the schema metadata key that names, as a JSON
// array of strings or a comma-separated list, the columns to stack into a
// model's single feature input (see the package documentation).
const FeaturesMetadataKey = "kiln.features"

// exchangeDepth is the number of input batches a DoExchange stream has in
// flight at once: while one batch's outputs are written, the next ones are
// already queued in the batcher.
const exchangeDepth = 4

// maxChunksInFlight bounds the requests one input batch has queued at once.
const maxChunksInFlight = 64

func invalidArg(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

func shapeString(s []int64) string {
	parts := make([]string, len(s))
	for i, d := range s {
		parts[i] = strconv.FormatInt(d, 10)
	}
	return "[" + strings.Join(parts, ",") + "]"
}

// inputSource says where a model input's values come from in a record batch.
type inputSource struct {
	name     string     // the model input
	dt       core.DType // its element type
	cols     []int      // one column, or the columns stacked as features
	rowShape []int64    // shape of one row's value
	rowElems int64      // product of rowShape
	stacked  bool       // cols are features stacked into one input
	phys     []int64    // a permuted fixed_shape_tensor's physical row shape
	perm     []int64    // and its permutation; nil when rows are row-major
	// column is the input's spec when it is a column of a raw record
	// (repository.Config Columns; see columns.go).
	column *repository.TensorSpec
}

// plan maps the columns of an input schema to a model's inputs.
type plan struct {
	model   string
	batched bool // max_batch_size > 0
	maxRows int  // max_batch_size
	dims    [][]int64
	inputs  []inputSource
}

// rowType returns the element type and per-row (logical) shape of a column
// type: numeric primitives (shape []), FixedSizeLists of numbers (shape
// [size]) and fixed_shape_tensor (its logical shape). For a
// fixed_shape_tensor with a non-trivial permutation it also returns the
// physical row shape and the permutation.
func rowType(dt arrow.DataType) (elem arrow.DataType, shape, phys, perm []int64) {
	switch t := dt.(type) {
	case *arrowio.FixedShapeTensorType:
		if p := t.Permutation(); p != nil {
			for i, v := range p {
				if int64(i) != v {
					return t.ValueType(), t.LogicalShape(), t.Shape(), p
				}
			}
		}
		return t.ValueType(), t.Shape(), nil, nil
	case *arrow.FixedSizeListType:
		return t.Elem(), []int64{int64(t.Len())}, nil, nil
	}
	return dt, nil, nil, nil
}

// permuteRows writes into out, as long as src, rows of permuted tensors in
// their logical row-major order: row r's physical values src[r*n:(r+1)*n]
// (n = product of phys, in elements of size bytes) hold a tensor of
// physical shape phys whose logical dimension i is physical dimension
// perm[i].
func permuteRows(out, src []byte, rows int, phys, perm []int64, size int) {
	k := len(phys)
	pstride := make([]int64, k)
	n := int64(1)
	for i := k - 1; i >= 0; i-- {
		pstride[i] = n
		n *= phys[i]
	}
	shape := make([]int64, k)  // logical shape
	stride := make([]int64, k) // logical dimension's stride in the physical layout
	for i, p := range perm {
		shape[i], stride[i] = phys[p], pstride[p]
	}
	idx := make([]int64, k)
	for r := 0; r < rows; r++ {
		row := src[int64(r)*n*int64(size):]
		dst := out[int64(r)*n*int64(size):]
		clear(idx)
		off := int64(0)
		for e := int64(0); e < n; e++ {
			copy(dst[e*int64(size):(e+1)*int64(size)], row[off*int64(size):(off+1)*int64(size)])
			for d := k - 1; d >= 0; d-- {
				idx[d]++
				off += stride[d]
				if idx[d] < shape[d] {
					break
				}
				off -= stride[d] * shape[d]
				idx[d] = 0
			}
		}
	}
}

func dtypeOf(dt arrow.DataType) (core.DType, repository.DataType, error) {
	d, err := arrowio.DTypeOf(dt)
	if err != nil {
		return 0, "", err
	}
	v2, err := repository.FromDType(d)
	return d, v2, err
}

func product(s []int64) int64 {
	n := int64(1)
	for _, d := range s {
		n *= d
	}
	return n
}

// featureColumns returns the columns to stack for a feature input of width
// k (-1: any width), by the rule of the package documentation.
func featureColumns(schema *arrow.Schema, k int64) ([]int, error) {
	var names []string
	if raw, ok := schema.Metadata().GetValue(FeaturesMetadataKey); ok {
		if err := json.Unmarshal([]byte(raw), &names); err != nil {
			names = strings.Split(raw, ",")
			for i := range names {
				names[i] = strings.TrimSpace(names[i])
			}
		}
		cols := make([]int, len(names))
		for i, n := range names {
			idx := schema.FieldIndices(n)
			if len(idx) != 1 {
				return nil, fmt.Errorf("metadata %s names column %q, which the schema has %d times", FeaturesMetadataKey, n, len(idx))
			}
			cols[i] = idx[0]
		}
		return cols, nil
	}
	cols := make([]int, schema.NumFields())
	for i := range cols {
		cols[i] = i
	}
	if k >= 0 && int64(len(cols)) != k {
		return nil, fmt.Errorf("the schema has %d columns, the feature width is %d", len(cols), k)
	}
	return cols, nil
}

// newPlan checks an input schema against a model's configuration.
func newPlan(model string, cfg *repository.Config, schema *arrow.Schema) (*plan, error) {
	if cfg.Columns {
		return columnsPlan(model, cfg, schema)
	}
	p := &plan{model: model, batched: cfg.MaxBatchSize > 0, maxRows: cfg.MaxBatchSize}
	want := func(c repository.TensorSpec) string {
		if p.batched {
			return fmt.Sprintf("%s %s per row", c.DataType, shapeString(c.Dims))
		}
		return fmt.Sprintf("%s %s with the rows as dimension 0", c.DataType, shapeString(c.Dims))
	}
	for _, c := range cfg.Inputs {
		src := inputSource{name: c.Name}
		dt, ok := c.DataType.DType()
		if !ok {
			return nil, invalidArg("model %q: input %q has datatype %s, which Arrow columns cannot carry", model, c.Name, c.DataType)
		}
		src.dt = dt
		// The per-row dims: the configured dims for a batching model, the
		// configured shape less its first (row) dimension otherwise.
		rowDims := c.Dims
		if !p.batched {
			if len(c.Dims) == 0 {
				return nil, invalidArg("model %q: input %q is a scalar, which a column of rows cannot carry", model, c.Name)
			}
			rowDims = c.Dims[1:]
		}
		idx := schema.FieldIndices(c.Name)
		switch {
		case len(idx) > 1:
			return nil, invalidArg("model %q: input column %q appears %d times", model, c.Name, len(idx))
		case len(idx) == 1:
			f := schema.Field(idx[0])
			et, shape, phys, perm := rowType(f.Type)
			_, v2, err := dtypeOf(et)
			if err != nil || v2 != c.DataType {
				return nil, invalidArg("model %q: input column %q has type %s, expected %s (a numeric column, FixedSizeList or fixed_shape_tensor of %s)", model, c.Name, f.Type, want(c), c.DataType)
			}
			if len(shape) == 0 && len(rowDims) == 1 && (rowDims[0] == 1 || rowDims[0] == -1) {
				shape = []int64{1} // a plain column feeds a [1] input
			}
			if !manager.ShapeMatches(rowDims, shape) {
				return nil, invalidArg("model %q: input column %q holds %s per row, expected %s", model, c.Name, shapeString(shape), want(c))
			}
			src.cols, src.rowShape, src.phys, src.perm = idx, shape, phys, perm
		case len(cfg.Inputs) == 1 && len(rowDims) == 1:
			// Stack numeric columns as the features of the only input.
			cols, err := featureColumns(schema, rowDims[0])
			if err != nil {
				return nil, invalidArg("model %q: no input column %q, and the columns cannot be stacked as its features: %v (expected %s)", model, c.Name, err, want(c))
			}
			if len(cols) == 0 {
				return nil, invalidArg("model %q: no input column %q (expected %s)", model, c.Name, want(c))
			}
			for _, ci := range cols {
				f := schema.Field(ci)
				_, v2, err := dtypeOf(f.Type)
				if err != nil || v2 != c.DataType {
					return nil, invalidArg("model %q: no input column %q, and column %q (%s) cannot be stacked as one of its %s features", model, c.Name, f.Name, f.Type, c.DataType)
				}
			}
			src.cols, src.rowShape, src.stacked = cols, []int64{int64(len(cols))}, true
		default:
			names := make([]string, len(cfg.Inputs))
			for i, in := range cfg.Inputs {
				names[i] = in.Name
			}
			return nil, invalidArg("model %q: missing input column %q (expected %s); the model takes columns %s", model, c.Name, want(c), strings.Join(names, ", "))
		}
		src.rowElems = product(src.rowShape)
		p.inputs = append(p.inputs, src)
		p.dims = append(p.dims, c.Dims)
	}
	return p, nil
}

// columnBytes returns the little-endian values of rows of a numeric column
// (primitive, FixedSizeList or fixed_shape_tensor), without copying.
func columnBytes(col arrow.Array, elemSize int, rowElems int64) ([]byte, error) {
	if col.NullN() > 0 {
		return nil, errors.New("has nulls")
	}
	d := col.Data()
	first := int64(d.Offset())
	if len(d.Children()) == 1 { // FixedSizeList storage
		ch := d.Children()[0]
		if ch.NullN() > 0 {
			return nil, errors.New("has null elements")
		}
		first = first*rowElems + int64(ch.Offset())
		d = ch
	}
	buf := d.Buffers()[1]
	n := int64(col.Len()) * rowElems * int64(elemSize)
	start := first * int64(elemSize)
	if buf == nil {
		if n == 0 {
			return nil, nil
		}
		return nil, errors.New("has no values buffer")
	}
	if int64(buf.Len()) < start+n {
		return nil, fmt.Errorf("values buffer of %d bytes is shorter than %d", buf.Len(), start+n)
	}
	return buf.Bytes()[start : start+n], nil
}

// gather returns the values of one input for every row of rec, row-major.
// A single column is not copied, unless it is a permuted fixed_shape_tensor,
// whose rows are copied into their logical order; stacked columns are
// interleaved into a new buffer.
func (src *inputSource) gather(rec arrow.RecordBatch) ([]byte, error) {
	return src.gatherTo(rec, func(n int) []byte { return make([]byte, n) })
}

// gatherTo is gather with the buffers that copies need from alloc.
func (src *inputSource) gatherTo(rec arrow.RecordBatch, alloc func(n int) []byte) ([]byte, error) {
	if src.column != nil {
		return src.gatherColumn(rec)
	}
	size := src.dt.Size()
	if !src.stacked {
		b, err := columnBytes(rec.Column(src.cols[0]), size, src.rowElems)
		if err != nil {
			return nil, invalidArg("input column %q: %v", src.name, err)
		}
		if src.perm != nil {
			out := alloc(len(b))
			permuteRows(out, b, int(rec.NumRows()), src.phys, src.perm, size)
			b = out
		}
		return b, nil
	}
	rows, k := int(rec.NumRows()), len(src.cols)
	// Every column's values are checked against the buffers received
	// before the output, sized by the batch's declared length, exists.
	cols := make([][]byte, k)
	for j, ci := range src.cols {
		b, err := columnBytes(rec.Column(ci), size, 1)
		if err != nil {
			return nil, invalidArg("feature column %q: %v", rec.Schema().Field(ci).Name, err)
		}
		if len(b) != rows*size {
			return nil, invalidArg("feature column %q: %d bytes for %d rows", rec.Schema().Field(ci).Name, len(b), rows)
		}
		cols[j] = b
	}
	out := alloc(rows * k * size)
	for j, b := range cols {
		for r := 0; r < rows; r++ {
			copy(out[(r*k+j)*size:(r*k+j+1)*size], b[r*size:(r+1)*size])
		}
	}
	return out, nil
}

// outputSpec is the Arrow form of a model output, fixed for a stream.
type outputSpec struct {
	name     string
	dt       core.DType
	rowShape []int64
	field    arrow.Field
}

func makeOutputSpec(name string, dt core.DType, rowShape []int64) (outputSpec, error) {
	at, err := arrowio.ArrowTypeOf(dt)
	if err != nil {
		return outputSpec{}, fmt.Errorf("output %q: %w", name, err)
	}
	spec := outputSpec{name: name, dt: dt, rowShape: slices.Clone(rowShape), field: arrow.Field{Name: name, Type: at}}
	if len(rowShape) > 0 {
		typ, err := arrowio.NewFixedShapeTensorType(at, slices.Clone(rowShape))
		if err != nil {
			return outputSpec{}, fmt.Errorf("output %q: %w", name, err)
		}
		spec.field.Type = typ
	}
	return spec, nil
}

// array wraps data, rows of the output's values, as an Arrow array.
func (o *outputSpec) array(data []byte, rows int) (arrow.Array, error) {
	buf := memory.NewBufferBytes(data)
	defer buf.Release()
	return o.arrayOf(buf, rows)
}

// arrayOf wraps buf, rows of the output's values, as an Arrow array, which
// holds its own reference on buf.
func (o *outputSpec) arrayOf(buf *memory.Buffer, rows int) (arrow.Array, error) {
	at, _ := arrowio.ArrowTypeOf(o.dt)
	vals := array.NewData(at, rows*int(product(o.rowShape)), []*memory.Buffer{nil, buf}, nil, 0, 0)
	defer vals.Release()
	va := array.MakeFromData(vals)
	if len(o.rowShape) == 0 {
		return va, nil
	}
	defer va.Release()
	a, err := arrowio.NewFixedShapeTensorArray(o.field.Type.(*arrowio.FixedShapeTensorType), va)
	if err != nil {
		return nil, err
	}
	return a, nil
}

// exchange holds the state of one DoExchange stream.
type exchange struct {
	s       *Server
	name    string
	version string

	mu      sync.Mutex
	outputs []outputSpec // fixed by the first result
}

// result is the outcome of one input batch.
type result struct {
	done chan struct{}
	rec  arrow.RecordBatch
	meta []byte
	err  error
}

// DoExchange runs streaming inference: see the package documentation.
func (s *Server) DoExchange(stream flight.FlightService_DoExchangeServer) (err error) {
	defer recoverStatus(&err, "DoExchange")
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	in := &checkedStream{FlightService_DoExchangeServer: stream, lim: s.hdrLim, gate: s.opts.Gate}
	rdr, err := newExchangeReader(in, s.mem)
	s.opts.Gate.Release(in.take()) // the schema is read
	if err != nil {
		return statusFromReadErr(ctx, "DoExchange: reading the input schema", err)
	}
	readerOwned := true // until readLoop takes the reader over
	defer func() {
		if readerOwned {
			rdr.Release()
		}
	}()
	name, version, err := modelDescriptor(rdr.LatestFlightDescriptor())
	if err != nil {
		return err
	}
	x := &exchange{s: s, name: name, version: version}
	// Check the model and the schema before any data.
	m, err := s.acquire(name, version)
	if err != nil {
		return err
	}
	cfg := m.Config()
	m.Release()
	if _, err := newPlan(name, cfg, rdr.Schema()); err != nil {
		return err
	}
	if specs, ok := staticOutputs(cfg); ok {
		x.outputs = specs
	}

	pending := make(chan *result, exchangeDepth)
	readErr := make(chan error, 1)
	readerOwned = false
	go func() {
		defer rdr.Release() // after the last Read, which may outlive the handler on shutdown
		defer close(pending)
		readErr <- x.readLoop(ctx, rdr, in, pending)
	}()
	var w *ipc.Writer
	defer func() {
		if w != nil {
			w.Close()
		}
	}()
	sender := &payloadSender{stream: stream}
	startWriter := func() {
		if w == nil {
			w = ipc.NewWriterWithPayloadWriter(sender, ipc.WithSchema(x.schema()), ipc.WithAllocator(s.mem))
		}
	}
	var firstErr error
	handle := func(r *result) {
		<-r.done
		if firstErr != nil {
			if r.rec != nil {
				r.rec.Release()
			}
			return
		}
		if r.err != nil {
			firstErr = r.err
			cancel()
			return
		}
		startWriter()
		err := sender.write(w, r.rec, r.meta)
		r.rec.Release()
		if err != nil {
			firstErr = status.Errorf(codes.Unavailable, "DoExchange %s: sending predictions: %v", x.label(), err)
			cancel()
		}
	}
	stopping := false
read:
	for {
		select {
		case r, ok := <-pending:
			if !ok {
				break read
			}
			handle(r)
		case <-s.stopping:
			stopping = true
			break read
		}
	}
	if stopping {
		// Answer every batch already read. If the client's stream had
		// ended (the read loop is done), this is an ordinary end;
		// otherwise the read loop may still be in a Read that ends with
		// the stream: what it produces from now on is released in the
		// background, and the client is told to send the rest elsewhere.
		for drained := false; !drained; {
			select {
			case r, ok := <-pending:
				if !ok {
					stopping, drained = false, true
					break
				}
				handle(r)
			default:
				drained = true
			}
		}
	}
	if stopping {
		go func() {
			for r := range pending {
				<-r.done
				if r.rec != nil {
					r.rec.Release()
				}
			}
		}()
		if firstErr == nil {
			firstErr = status.Errorf(codes.Unavailable, "DoExchange %s: the server is shutting down; the batches read so far were answered, send the rest again", x.label())
		}
		return toStatus(firstErr)
	}
	if rerr := <-readErr; firstErr == nil && rerr != nil {
		firstErr = rerr
	}
	if firstErr != nil {
		return toStatus(firstErr)
	}
	if x.known() {
		startWriter() // an empty exchange still answers with the schema
	}
	return nil
}

func (x *exchange) label() string {
	if x.version == "" {
		return fmt.Sprintf("model %q", x.name)
	}
	return fmt.Sprintf("model %q version %s", x.name, x.version)
}

func (x *exchange) known() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.outputs != nil
}

func (x *exchange) schema() *arrow.Schema {
	x.mu.Lock()
	defer x.mu.Unlock()
	fields := make([]arrow.Field, len(x.outputs))
	for i, o := range x.outputs {
		fields[i] = o.field
	}
	return arrow.NewSchema(fields, nil)
}

// staticOutputs returns the output columns of a batching model whose
// outputs' dims are all fixed, known before any inference.
func staticOutputs(cfg *repository.Config) ([]outputSpec, bool) {
	if cfg.MaxBatchSize <= 0 {
		return nil, false
	}
	specs := make([]outputSpec, len(cfg.Outputs))
	for i, o := range cfg.Outputs {
		dt, ok := o.DataType.DType()
		if !ok || slices.Contains(o.Dims, -1) {
			return nil, false
		}
		spec, err := makeOutputSpec(o.Name, dt, o.Dims)
		if err != nil {
			return nil, false
		}
		specs[i] = spec
	}
	return specs, true
}

// readLoop reads input batches and starts their inference, queueing their
// results in order on pending. The bytes in reads admitted through the
// gate are released once the batch they carried is predicted (or
// dropped).
func (x *exchange) readLoop(ctx context.Context, rdr *putReader, in *checkedStream, pending chan<- *result) error {
	gate := x.s.opts.Gate
	defer func() { gate.Release(in.take()) }()
	for {
		rec, err := rdr.Read()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return statusFromReadErr(ctx, "DoExchange: reading input batches", withColumn(rdr.Schema(), err))
		}
		if err := validateRecord(rec); err != nil {
			return invalidArg("DoExchange: %v", err)
		}
		rec.Retain()
		n := in.take()
		r := &result{done: make(chan struct{}), meta: slices.Clone(rdr.LatestAppMetadata())}
		select {
		case pending <- r:
		case <-ctx.Done():
			rec.Release()
			gate.Release(n)
			return nil
		}
		go func() {
			defer close(r.done)
			defer gate.Release(n)
			defer rec.Release()
			r.rec, r.err = x.infer(ctx, rec)
		}()
	}
}

// infer runs one input batch through the model as it came: one execution
// on one of the version's instances, not cut into max_batch_size requests
// (see batcher.Batcher.ForwardTensors), on tensors that share the batch's
// Arrow buffers where their layout allows (see inputSource.tensor), and
// answers with columns that share the model's output memory.
func (x *exchange) infer(ctx context.Context, rec arrow.RecordBatch) (arrow.RecordBatch, error) {
	m, err := x.s.acquire(x.name, x.version)
	if err != nil {
		return nil, err
	}
	defer m.Release()
	p, err := newPlan(x.name, m.Config(), rec.Schema())
	if err != nil {
		return nil, err
	}
	rows := int(rec.NumRows())
	if !p.batched {
		for i, in := range p.inputs {
			if d := p.dims[i][0]; d != -1 && d != int64(rows) {
				return nil, invalidArg("model %q: input %q has %d rows in its first dimension, this batch %d", x.name, in.name, d, rows)
			}
		}
	} else if rows == 0 {
		return x.emptyResult()
	}
	ins := make([]*core.Tensor, 0, len(p.inputs))
	defer func() { core.CloseAll(ins) }()
	for i := range p.inputs {
		t, err := p.inputs[i].tensor(rec)
		if err != nil {
			return nil, err
		}
		ins = append(ins, t)
	}
	outs, err := x.forward(ctx, m, ins)
	if err != nil {
		return nil, err
	}
	defer core.CloseAll(outs)
	return x.assemble(m, rows, outs)
}

// forward runs one batch, waiting and retrying while the queue is full,
// and records its outcome in the version's statistics.
func (x *exchange) forward(ctx context.Context, m Model, ins []*core.Tensor) ([]*core.Tensor, error) {
	delay := 100 * time.Microsecond
	for {
		start := time.Now()
		out, err := m.ForwardTensors(ctx, ins)
		if errors.Is(err, batcher.ErrQueueFull) {
			select {
			case <-time.After(delay):
				delay = min(2*delay, 20*time.Millisecond)
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		if err == nil {
			if err = checkOutputs(m.Config(), len(out)); err != nil {
				core.CloseAll(out)
				out = nil
			}
		}
		m.Stats().RecordRequest(err == nil, time.Since(start))
		return out, err
	}
}

// tensor returns the values of one input for every row of rec as a C
// tensor of shape [rows, rowShape...]. A single column whose values are C
// memory (the bodies the server's codec receives are), aligned for its
// type, is shared without copying: the tensor holds a reference on the
// Arrow buffer until libtorch drops it. Other columns (Go memory, a
// permuted fixed_shape_tensor, stacked features) are copied once into C
// memory.
func (src *inputSource) tensor(rec arrow.RecordBatch) (*core.Tensor, error) {
	shape := append([]int64{rec.NumRows()}, src.rowShape...)
	if rec.NumRows() == 0 || src.rowElems == 0 {
		return core.Zeros(src.dt, shape...)
	}
	if !src.stacked && src.perm == nil && src.column == nil {
		col := rec.Column(src.cols[0])
		b, err := columnBytes(col, src.dt.Size(), src.rowElems)
		if err != nil {
			return nil, invalidArg("input column %q: %v", src.name, err)
		}
		if p := unsafe.Pointer(unsafe.SliceData(b)); arrowio.IsCMemory(p, len(b)) && uintptr(p)%uintptr(src.dt.Size()) == 0 {
			buf := valuesBuffer(col)
			buf.Retain()
			t, err := core.FromBlob(p, src.dt, shape, nil, buf.Release)
			if err != nil {
				buf.Release()
				return nil, status.Errorf(codes.Internal, "input %q: %v", src.name, err)
			}
			return t, nil
		}
	}
	var c []byte
	alloc := func(n int) []byte { c = copyAlloc.Allocate(n); return c }
	b, err := src.gatherTo(rec, alloc)
	if err != nil {
		if c != nil {
			copyAlloc.Free(c)
		}
		return nil, err
	}
	if c == nil { // a single column gatherTo did not copy
		c = copyAlloc.Allocate(len(b))
		copy(c, b)
	}
	t, err := core.FromBlob(unsafe.Pointer(unsafe.SliceData(c)), src.dt, shape, nil, func() { copyAlloc.Free(c) })
	if err != nil {
		copyAlloc.Free(c)
		return nil, status.Errorf(codes.Internal, "input %q: %v", src.name, err)
	}
	return t, nil
}

// copyAlloc allocates the C memory of the inputs DoExchange copies.
var copyAlloc = arrowio.NewAllocator()

// valuesBuffer returns the buffer columnBytes read a column's values from.
func valuesBuffer(col arrow.Array) *memory.Buffer {
	d := col.Data()
	if len(d.Children()) == 1 {
		d = d.Children()[0]
	}
	return d.Buffers()[1]
}

// checkOutputs checks that a model returned as many outputs as its
// configuration names.
func checkOutputs(cfg *repository.Config, n int) error {
	if n != len(cfg.Outputs) {
		return &batcher.ExecError{Err: fmt.Errorf("the model returned %d outputs, its configuration names %d", n, len(cfg.Outputs))}
	}
	return nil
}

func (x *exchange) emptyResult() (arrow.RecordBatch, error) {
	if !x.known() {
		return nil, invalidArg("model %q: an empty batch before any rows: the output shapes are not known yet", x.name)
	}
	schema := x.schema()
	cols := make([]arrow.Array, len(x.outputs))
	for i := range x.outputs {
		a, err := x.outputs[i].array(nil, 0)
		if err != nil {
			return nil, err
		}
		defer a.Release()
		cols[i] = a
	}
	return array.NewRecordBatch(schema, cols, 0), nil
}

// tensorOwner is the allocator of a buffer that views a tensor's memory:
// freeing the buffer closes the tensor handle that keeps the memory alive.
type tensorOwner struct {
	once sync.Once
	t    *core.Tensor
}

func (*tensorOwner) Allocate(int) []byte {
	panic("flightserver: a buffer viewing a tensor cannot allocate")
}

func (*tensorOwner) Reallocate(int, []byte) []byte {
	panic("flightserver: a buffer viewing a tensor cannot grow")
}

func (o *tensorOwner) Free([]byte) { o.once.Do(func() { o.t.Close() }) }

// assemble makes the model's outputs for a batch of rows into columns that
// view the outputs' memory (made contiguous first: a copy only if an
// output was not).
func (x *exchange) assemble(m Model, rows int, outs []*core.Tensor) (arrow.RecordBatch, error) {
	cfg := m.Config()
	specs := make([]outputSpec, len(cfg.Outputs))
	for i, o := range cfg.Outputs {
		shape := outs[i].Shape()
		if len(shape) == 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "model %q: output %q is a scalar, which cannot be a column of rows", x.name, o.Name)
		}
		spec, err := makeOutputSpec(o.Name, outs[i].DType(), shape[1:])
		if err != nil {
			return nil, status.Errorf(codes.Unimplemented, "model %q: %v", x.name, err)
		}
		if shape[0] != int64(rows) {
			return nil, status.Errorf(codes.FailedPrecondition, "model %q: output %q has %d rows for %d input rows; only outputs with one row per input row can be columns", x.name, o.Name, shape[0], rows)
		}
		specs[i] = spec
	}
	x.mu.Lock()
	if x.outputs == nil {
		x.outputs = specs
	}
	fixed := x.outputs
	x.mu.Unlock()
	for i := range specs {
		if specs[i].dt != fixed[i].dt || !slices.Equal(specs[i].rowShape, fixed[i].rowShape) {
			return nil, status.Errorf(codes.FailedPrecondition, "model %q: output %q is %v %s per row, earlier in this stream it was %v %s; send batches whose outputs have one shape per stream",
				x.name, specs[i].name, specs[i].dt, shapeString(specs[i].rowShape), fixed[i].dt, shapeString(fixed[i].rowShape))
		}
	}
	cols := make([]arrow.Array, len(specs))
	defer func() {
		for _, c := range cols {
			if c != nil {
				c.Release()
			}
		}
	}()
	for i := range specs {
		c, err := outs[i].Contiguous()
		if err != nil {
			return nil, status.Errorf(codes.Internal, "model %q: output %q: %v", x.name, specs[i].name, err)
		}
		data, err := c.Bytes()
		if err != nil {
			c.Close()
			return nil, status.Errorf(codes.Internal, "model %q: output %q: %v", x.name, specs[i].name, err)
		}
		var buf *memory.Buffer
		if len(data) > 0 {
			buf = memory.NewBufferWithAllocator(data, &tensorOwner{t: c})
		} else {
			c.Close()
			buf = memory.NewBufferBytes(nil)
		}
		a, err := specs[i].arrayOf(buf, rows)
		buf.Release() // the array holds it
		if err != nil {
			return nil, status.Errorf(codes.Internal, "model %q: output %q: %v", x.name, specs[i].name, err)
		}
		cols[i] = a
	}
	return array.NewRecordBatch(x.schema(), cols, int64(rows)), nil
}
