// Package batcher schedules inference requests for one model version: a
// queue served by a fixed number of instances, and, when dynamic batching
// is on, merging of queued requests along dimension 0 into one execution
// whose outputs are split back per request.
package batcher

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native"
)

// Tensor is a request's or response's tensor: little-endian elements in Go
// memory, row-major without padding.
type Tensor struct {
	// DType is the element type.
	DType core.DType
	// Shape is the size of each dimension.
	Shape []int64
	// Data holds the elements; its length is the product of Shape times
	// the element size.
	Data []byte
}

// Runner executes the model: it takes the (possibly merged) inputs, which
// the batcher closes after the call, and returns outputs the batcher owns.
// It must be safe for concurrent use by every instance.
type Runner func(inputs []*core.Tensor) ([]*core.Tensor, error)

// Options configure a Batcher.
type Options struct {
	// MaxBatchSize is the model's largest batch along dimension 0; 0 means
	// the model does not batch: inputs are whole tensors and requests are
	// never merged.
	MaxBatchSize int
	// Dynamic merges queued requests into batches of up to MaxBatchSize
	// rows. It needs MaxBatchSize > 0.
	Dynamic bool
	// MaxQueueDelay is the longest the oldest queued request waits for
	// others to join its batch.
	MaxQueueDelay time.Duration
	// PreferredBatchSizes are batch sizes dispatched as soon as they can be
	// formed from queued requests.
	PreferredBatchSizes []int
	// MaxQueueSize bounds the requests waiting in the queue; 0 is unbounded.
	MaxQueueSize int
	// Instances is the number of executions that may run at once (≥ 1).
	Instances int
	// Logger receives the batcher's logs; nil means slog.Default().
	Logger *slog.Logger
}

// ErrQueueFull is returned by Submit when the queue holds MaxQueueSize
// requests.
var ErrQueueFull error = &core.Error{Code: core.ResourceExhausted, Message: "queue is full"}

// ErrClosed is returned by Submit after Close.
var ErrClosed error = &core.Error{Code: core.Unavailable, Message: "batcher is closed"}

// ExecError is the error of a failed model execution.
type ExecError struct{ Err error }

// Error returns the execution's error message.
func (e *ExecError) Error() string { return e.Err.Error() }

// ErrorCode is core.Internal: the inputs passed the configuration's
// checks, so a model that fails on them (or returns outputs that do not
// match its configuration) is the server's fault, as in Triton. Running
// out of memory, an operator this libtorch lacks, and the caller
// cancelling or running out of time keep their own codes.
func (e *ExecError) ErrorCode() core.Code {
	switch c := core.CodeOf(e.Err); c {
	case core.OutOfMemory, core.ResourceExhausted, core.Unsupported, core.Cancelled, core.DeadlineExceeded:
		return c
	}
	return core.Internal
}

// Unwrap returns the underlying error.
func (e *ExecError) Unwrap() error { return e.Err }

type result struct {
	outputs []Tensor
	tensors []*core.Tensor // a direct request's outputs, owned by its caller
	err     error
}

// Request states of a direct request (see ForwardTensors): an instance
// takes it only from queued, its caller gives it up only from queued.
const (
	stateQueued int32 = iota
	stateRunning
	stateAbandoned
)

type request struct {
	ctx       context.Context
	inputs    []Tensor
	direct    []*core.Tensor // ForwardTensors' inputs: run alone, never merged
	rows      int
	key       string // requests merge only with equal keys
	enqueued  time.Time
	done      chan result
	abandoned atomic.Bool
	state     atomic.Int32 // direct requests only
}

// directKey is the merge key of direct requests: no Submit request has it
// (theirs are built of digits, commas and semicolons), and a direct request
// is never merged with another one either (see pickLocked).
const directKey = "direct"

// Batcher queues requests and executes them on its instances.
type Batcher struct {
	run   Runner
	opts  Options
	log   *slog.Logger
	stats *Stats

	mu      sync.Mutex
	queue   []*request
	closed  bool
	notify  chan struct{}
	closing chan struct{}

	formMu sync.Mutex // one instance forms a batch at a time
	wg     sync.WaitGroup
}

// New starts a batcher with opts.Instances instances that execute run.
func New(run Runner, opts Options) (*Batcher, error) {
	if run == nil {
		return nil, errors.New("batcher: nil runner")
	}
	if opts.MaxBatchSize < 0 || opts.MaxQueueSize < 0 || opts.MaxQueueDelay < 0 {
		return nil, errors.New("batcher: negative option")
	}
	if opts.Dynamic && opts.MaxBatchSize == 0 {
		return nil, errors.New("batcher: dynamic batching needs MaxBatchSize > 0")
	}
	opts.Instances = max(opts.Instances, 1)
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	b := &Batcher{
		run: run, opts: opts, log: opts.Logger, stats: &Stats{},
		notify: make(chan struct{}, 1), closing: make(chan struct{}),
	}
	for range opts.Instances {
		b.wg.Add(1)
		go b.instance()
	}
	return b, nil
}

// Stats returns the batcher's statistics, which the caller may add
// request outcomes to.
func (b *Batcher) Stats() *Stats { return b.stats }

// QueueLen returns the number of requests waiting for execution.
func (b *Batcher) QueueLen() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.queue)
}

// Submit queues a request and waits for its outputs. With MaxBatchSize > 0
// every input's dimension 0 is the request's batch size, equal across
// inputs and within 1..MaxBatchSize. The inputs' Data must not change until
// Submit returns. It returns ErrQueueFull when the queue is full,
// ErrClosed after Close, ctx's error when ctx ends first (a request whose
// context ended before execution is dropped), and an *ExecError when the
// model fails.
func (b *Batcher) Submit(ctx context.Context, inputs []Tensor) ([]Tensor, error) {
	r := &request{ctx: ctx, inputs: inputs, rows: 1, done: make(chan result, 1)}
	if err := b.prepare(r); err != nil {
		return nil, err
	}
	if err := b.enqueue(ctx, r); err != nil {
		return nil, err
	}
	select {
	case res := <-r.done:
		return res.outputs, res.err
	case <-ctx.Done():
		r.abandoned.Store(true)
		return nil, ctx.Err()
	}
}

// ForwardTensors runs inputs, tensors of any number of rows (the
// MaxBatchSize bound does not apply), through the model in one execution
// on one of the batcher's instances, queued with the Submit requests but
// never merged with them, and returns the model's outputs without copying
// them: the caller owns and must close them. The inputs are not copied
// either; they must stay open until ForwardTensors returns, and the caller
// closes them. It is for callers that already hold a whole batch in C
// memory (Flight's DoExchange), where Submit would copy it in and out.
// Errors are those of Submit; a failed execution is an *ExecError.
func (b *Batcher) ForwardTensors(ctx context.Context, inputs []*core.Tensor) ([]*core.Tensor, error) {
	if len(inputs) == 0 {
		return nil, core.Errorf(core.InvalidArgument, "batcher: request without inputs")
	}
	rows := 1
	for i, t := range inputs {
		if t == nil {
			return nil, core.Errorf(core.InvalidArgument, "batcher: input %d is nil", i)
		}
		if b.opts.MaxBatchSize > 0 && t.Dim() == 0 {
			return nil, core.Errorf(core.InvalidArgument, "batcher: input %d has no batch dimension", i)
		}
	}
	if b.opts.MaxBatchSize > 0 {
		rows = int(inputs[0].Shape()[0])
	}
	r := &request{ctx: ctx, direct: inputs, rows: rows, key: directKey, done: make(chan result, 1)}
	if err := b.enqueue(ctx, r); err != nil {
		return nil, err
	}
	select {
	case res := <-r.done:
		return res.tensors, res.err
	case <-ctx.Done():
		if r.state.CompareAndSwap(stateQueued, stateAbandoned) {
			r.abandoned.Store(true) // dropExpiredLocked removes it
			return nil, ctx.Err()
		}
		// An instance runs it: the inputs are in use until it ends.
		res := <-r.done
		core.CloseAll(res.tensors)
		return nil, ctx.Err()
	}
}

// enqueue appends r to the queue and wakes the dispatcher, unless ctx is
// done (its error), the batcher is closed (ErrClosed) or the queue is full
// (ErrQueueFull). Submit and ForwardTensors share it.
func (b *Batcher) enqueue(ctx context.Context, r *request) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	b.mu.Lock()
	switch {
	case b.closed:
		b.mu.Unlock()
		return ErrClosed
	case b.opts.MaxQueueSize > 0 && len(b.queue) >= b.opts.MaxQueueSize:
		b.mu.Unlock()
		return ErrQueueFull
	}
	r.enqueued = time.Now()
	b.queue = append(b.queue, r)
	b.mu.Unlock()
	select {
	case b.notify <- struct{}{}:
	default:
	}
	return nil
}

// prepare checks the request's tensors and computes its rows and key.
func (b *Batcher) prepare(r *request) error {
	if len(r.inputs) == 0 {
		return core.Errorf(core.InvalidArgument, "batcher: request without inputs")
	}
	var key []byte
	for i, t := range r.inputs {
		n, err := numElements(t.Shape)
		if err != nil {
			return fmt.Errorf("batcher: input %d: %w", i, err)
		}
		if !t.DType.Valid() || int64(len(t.Data)) != n*int64(t.DType.Size()) {
			return core.Errorf(core.InvalidArgument, "batcher: input %d: %d bytes for %v %v", i, len(t.Data), t.DType, t.Shape)
		}
		if b.opts.MaxBatchSize > 0 {
			if len(t.Shape) == 0 {
				return core.Errorf(core.InvalidArgument, "batcher: input %d has no batch dimension", i)
			}
			rows := t.Shape[0]
			if i == 0 {
				if rows < 1 || rows > int64(b.opts.MaxBatchSize) {
					return core.Errorf(core.InvalidArgument, "batcher: batch size %d is not within 1..%d", rows, b.opts.MaxBatchSize)
				}
				r.rows = int(rows)
			} else if rows != int64(r.rows) {
				return core.Errorf(core.InvalidArgument, "batcher: input %d has batch size %d, input 0 has %d", i, rows, r.rows)
			}
			key = strconv.AppendInt(key, int64(t.DType), 10)
			for _, d := range t.Shape[1:] {
				key = append(key, ',')
				key = strconv.AppendInt(key, d, 10)
			}
			key = append(key, ';')
		}
	}
	r.key = string(key)
	return nil
}

func numElements(shape []int64) (int64, error) {
	n := int64(1)
	for i, d := range shape {
		if d < 0 {
			return 0, core.Errorf(core.InvalidArgument, "dimension %d is negative (%d)", i, d)
		}
		if d != 0 && n > (1<<62)/d {
			return 0, core.Errorf(core.InvalidArgument, "shape %v overflows", shape)
		}
		n *= d
	}
	return n, nil
}

// Close stops accepting requests, executes those already queued, and
// returns when every instance has finished.
func (b *Batcher) Close() {
	b.mu.Lock()
	if !b.closed {
		b.closed = true
		close(b.closing)
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// instance executes batches until the batcher is closed and drained. With
// more than one intra-op thread it keeps one OS thread for its whole life:
// libtorch's intra-op thread count and libgomp's thread team belong to the
// calling OS thread, so a goroutine that the Go scheduler moved between
// threads would set the count again and start or wake another team on every
// thread it landed on; a locked instance sets them once and keeps its team
// warm. With one intra-op thread there is no team, and a locked goroutine
// only costs a thread handoff each time it blocks, so it stays unlocked.
// A locked thread ends with its goroutine.
func (b *Batcher) instance() {
	if core.NumThreads() > 1 {
		runtime.LockOSThread()
	}
	defer b.wg.Done()
	for {
		batch := b.next()
		if batch == nil {
			return
		}
		b.execute(batch)
	}
}

// next forms the next batch, waiting as the options allow; nil means the
// batcher is closed and drained.
func (b *Batcher) next() []*request {
	b.formMu.Lock()
	defer b.formMu.Unlock()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		b.mu.Lock()
		b.dropExpiredLocked()
		if len(b.queue) == 0 {
			closed := b.closed
			b.mu.Unlock()
			if closed {
				return nil
			}
			select {
			case <-b.notify:
			case <-b.closing:
			}
			continue
		}
		now := time.Now()
		picked, ready := b.pickLocked(now)
		if ready || b.closed {
			batch := make([]*request, 0, len(picked))
			for _, i := range picked {
				batch = append(batch, b.queue[i])
			}
			b.queue = slices.DeleteFunc(b.queue, func(r *request) bool { return slices.Contains(batch, r) })
			more := len(b.queue) > 0
			b.mu.Unlock()
			if more { // let the next former look at what is left
				select {
				case b.notify <- struct{}{}:
				default:
				}
			}
			return batch
		}
		deadline := b.queue[0].enqueued.Add(b.opts.MaxQueueDelay)
		wait := deadline.Sub(now)
		b.mu.Unlock()
		if wait < spinBelow {
			b.spinUntil(deadline)
			continue
		}
		if timer == nil {
			timer = time.NewTimer(wait)
		} else {
			timer.Reset(wait)
		}
		select {
		case <-b.notify:
		case <-timer.C:
		case <-b.closing:
		}
	}
}

// spinBelow is the wait under which next polls instead of sleeping on a
// timer: when every goroutine is idle, the Go runtime sleeps in epoll with
// millisecond resolution, so a 100 µs max_queue_delay_us would otherwise
// hold a lone request for about 1 ms.
const spinBelow = time.Millisecond

// spinUntil yields the processor until deadline, a new request or Close,
// whichever comes first. Other goroutines run meanwhile (Gosched), so the
// poll only uses time the process would otherwise leave idle; it lasts at
// most MaxQueueDelay (under spinBelow) per batch.
func (b *Batcher) spinUntil(deadline time.Time) {
	for time.Now().Before(deadline) {
		select {
		case <-b.notify:
			return
		case <-b.closing:
			return
		default:
			runtime.Gosched()
		}
	}
}

// dropExpiredLocked answers and removes queued requests whose context
// ended or whose caller left.
func (b *Batcher) dropExpiredLocked() {
	b.queue = slices.DeleteFunc(b.queue, func(r *request) bool {
		if r.abandoned.Load() {
			return true
		}
		if err := r.ctx.Err(); err != nil {
			r.done <- result{err: err}
			return true
		}
		return false
	})
}

// pickLocked chooses the queue indices of the next batch and whether it is
// ready to execute now.
func (b *Batcher) pickLocked(now time.Time) ([]int, bool) {
	if !b.opts.Dynamic {
		return []int{0}, true
	}
	head := b.queue[0]
	if head.direct != nil {
		return []int{0}, true
	}
	picked := []int{0}
	rows := head.rows
	sums := []int{rows}
	full := rows == b.opts.MaxBatchSize
	for i := 1; i < len(b.queue) && !full; i++ {
		r := b.queue[i]
		if r.key != head.key {
			continue
		}
		if rows+r.rows > b.opts.MaxBatchSize {
			full = true // the next compatible request does not fit
			break
		}
		rows += r.rows
		picked = append(picked, i)
		sums = append(sums, rows)
		full = rows == b.opts.MaxBatchSize
	}
	if full {
		return picked, true
	}
	if len(b.opts.PreferredBatchSizes) > 0 {
		for k := len(sums) - 1; k >= 0; k-- {
			if slices.Contains(b.opts.PreferredBatchSizes, sums[k]) {
				return picked[:k+1], true
			}
		}
	}
	return picked, now.Sub(head.enqueued) >= b.opts.MaxQueueDelay
}

// execute runs one batch and answers its requests.
func (b *Batcher) execute(batch []*request) {
	if batch[0].direct != nil {
		b.executeDirect(batch[0])
		return
	}
	start := time.Now()
	outs, rows, tIn, tInfer, err := b.forward(batch)
	if err != nil && len(batch) > 1 {
		// One bad request must not fail the others: run each alone.
		b.log.Warn("batched execution failed; retrying requests one by one", "requests", len(batch), "err", err)
		for _, r := range batch {
			b.execute([]*request{r})
		}
		return
	}
	if err != nil {
		batch[0].done <- result{err: &ExecError{Err: err}}
		return
	}
	defer core.CloseAll(outs)
	t0 := time.Now()
	results, err := b.split(outs, batch, rows)
	tOut := time.Since(t0)
	if err != nil {
		for _, r := range batch {
			r.done <- result{err: &ExecError{Err: err}}
		}
		return
	}
	queued := make([]time.Duration, len(batch))
	for i, r := range batch {
		queued[i] = start.Sub(r.enqueued)
	}
	b.stats.recordExecution(rows, queued, tIn, tInfer, tOut)
	for i, r := range batch {
		r.done <- result{outputs: results[i]}
	}
}

// executeDirect runs a ForwardTensors request alone and hands its outputs
// over to its caller.
func (b *Batcher) executeDirect(r *request) {
	if !r.state.CompareAndSwap(stateQueued, stateRunning) {
		return // its caller left
	}
	start := time.Now()
	outs, err := b.run(r.direct)
	infer := time.Since(start)
	if err != nil {
		r.done <- result{err: &ExecError{Err: err}}
		return
	}
	bucket := r.rows
	if bucket > b.opts.MaxBatchSize && bucket > 1 {
		bucket = 1 << bits.Len(uint(bucket-1))
	}
	b.stats.recordExecutionAs(bucket, r.rows, []time.Duration{start.Sub(r.enqueued)}, 0, infer, 0)
	r.done <- result{tensors: outs}
}

// forward merges the batch's inputs into C tensors and runs the model.
func (b *Batcher) forward(batch []*request) (outs []*core.Tensor, rows int, tIn, tInfer time.Duration, err error) {
	t0 := time.Now()
	for _, r := range batch {
		rows += r.rows
	}
	first := batch[0].inputs
	ins := make([]*core.Tensor, 0, len(first))
	defer func() { core.CloseAll(ins) }()
	for i := range first {
		shape := slices.Clone(first[i].Shape)
		if len(batch) > 1 {
			shape[0] = int64(rows)
		}
		parts := make([][]byte, len(batch))
		for j, r := range batch {
			parts[j] = r.inputs[i].Data
		}
		t, err := newTensor(first[i].DType, shape, parts)
		if err != nil {
			return nil, 0, 0, 0, fmt.Errorf("input %d: %w", i, err)
		}
		ins = append(ins, t)
	}
	t1 := time.Now()
	outs, err = b.run(ins)
	return outs, rows, t1.Sub(t0), time.Since(t1), err
}

// newTensor allocates a C tensor and copies parts into it, in order.
func newTensor(dt core.DType, shape []int64, parts [][]byte) (*core.Tensor, error) {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n == 0 {
		return core.Zeros(dt, shape...)
	}
	p := native.Malloc(uintptr(n))
	if p == nil {
		return nil, core.Errorf(core.OutOfMemory, "out of memory allocating %d bytes", n)
	}
	dst := unsafe.Slice((*byte)(p), n)
	off := 0
	for _, part := range parts {
		off += copy(dst[off:], part)
	}
	t, err := core.FromBlob(p, dt, shape, nil, func() { native.FreeC(p) })
	if err != nil {
		native.FreeC(p)
		return nil, err
	}
	return t, nil
}

// split copies each output into Go memory, cut per request along
// dimension 0 when the batch merged several.
func (b *Batcher) split(outs []*core.Tensor, batch []*request, rows int) ([][]Tensor, error) {
	res := make([][]Tensor, len(batch))
	for i, o := range outs {
		c, err := o.Contiguous()
		if err != nil {
			return nil, fmt.Errorf("output %d: %w", i, err)
		}
		raw, err := c.Bytes()
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("output %d: %w", i, err)
		}
		shape := c.Shape()
		if b.opts.MaxBatchSize > 0 && (len(shape) == 0 || shape[0] != int64(rows)) {
			c.Close()
			return nil, fmt.Errorf("output %d has shape %v; a batch of %d needs %d along dimension 0", i, shape, rows, rows)
		}
		if len(batch) == 1 {
			res[0] = append(res[0], Tensor{DType: c.DType(), Shape: shape, Data: slices.Clone(raw)})
			c.Close()
			continue
		}
		rowBytes := len(raw) / rows
		off := 0
		for j, r := range batch {
			s := slices.Clone(shape)
			s[0] = int64(r.rows)
			n := rowBytes * r.rows
			res[j] = append(res[j], Tensor{DType: c.DType(), Shape: s, Data: slices.Clone(raw[off : off+n])})
			off += n
		}
		c.Close()
	}
	return res, nil
}
