package batcher

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// f32 encodes values as a little-endian FP32 tensor of the given shape.
func f32(shape []int64, vals ...float32) Tensor {
	b := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return Tensor{DType: core.Float32, Shape: shape, Data: b}
}

func decode(t Tensor) []float32 {
	out := make([]float32, len(t.Data)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.Data[4*i:]))
	}
	return out
}

// recorder is a Runner computing y = 2x+1 and the row sums of x; it records
// the batch sizes it saw and fails on negative inputs.
type recorder struct {
	mu      sync.Mutex
	batches []int64
	gate    chan struct{} // when set, each call waits for a token
	entered chan struct{} // when set, each call signals on entry
	active  atomic.Int32
	peak    atomic.Int32
}

func (r *recorder) run(ins []*core.Tensor) ([]*core.Tensor, error) {
	n := r.active.Add(1)
	defer r.active.Add(-1)
	for {
		p := r.peak.Load()
		if n <= p || r.peak.CompareAndSwap(p, n) {
			break
		}
	}
	if r.entered != nil {
		r.entered <- struct{}{}
	}
	if r.gate != nil {
		<-r.gate
	}
	shape := ins[0].Shape()
	r.mu.Lock()
	r.batches = append(r.batches, shape[0])
	r.mu.Unlock()
	x, err := core.Data[float32](ins[0])
	if err != nil {
		return nil, err
	}
	y := make([]float32, len(x))
	sums := make([]float32, shape[0])
	cols := len(x) / int(shape[0])
	for i, v := range x {
		if v < 0 {
			return nil, fmt.Errorf("negative input %v", v)
		}
		y[i] = 2*v + 1
		sums[i/cols] += v
	}
	yt, err := core.NewTensor(y, shape...)
	if err != nil {
		return nil, err
	}
	st, err := core.NewTensor(sums, shape[0])
	if err != nil {
		yt.Close()
		return nil, err
	}
	return []*core.Tensor{yt, st}, nil
}

func (r *recorder) seen() []int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int64(nil), r.batches...)
}

func newBatcher(t *testing.T, r *recorder, o Options) *Batcher {
	t.Helper()
	b, err := New(r.run, o)
	require.NoError(t, err)
	t.Cleanup(b.Close)
	return b
}

func TestMergesUpToMaxBatchSize(t *testing.T) {
	r := &recorder{}
	b := newBatcher(t, r, Options{MaxBatchSize: 8, Dynamic: true, MaxQueueDelay: 5 * time.Second, Instances: 1})
	start := time.Now()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			out, err := b.Submit(context.Background(), []Tensor{f32([]int64{1, 2}, float32(i), float32(10*i))})
			require.NoError(t, err)
			assert.Equal(t, []float32{float32(2*i + 1), float32(20*i + 1)}, decode(out[0]))
			assert.Equal(t, []int64{1, 2}, out[0].Shape)
			assert.Equal(t, []float32{float32(11 * i)}, decode(out[1]))
			assert.Equal(t, []int64{1}, out[1].Shape)
		})
	}
	wg.Wait()
	// A full batch leaves at once, long before the 5 s delay.
	assert.Less(t, time.Since(start), 4*time.Second)
	assert.Equal(t, []int64{8}, r.seen())
	s := b.Stats().Snapshot()
	assert.Equal(t, uint64(8), s.InferenceCount)
	assert.Equal(t, uint64(1), s.ExecutionCount)
	assert.Equal(t, uint64(8), s.Queue.Count)
	require.Len(t, s.Batches, 1)
	assert.Equal(t, 8, s.Batches[0].Size)
}

func TestWaitsForDelayThenSendsPartialBatch(t *testing.T) {
	r := &recorder{}
	b := newBatcher(t, r, Options{MaxBatchSize: 8, Dynamic: true, MaxQueueDelay: 60 * time.Millisecond, Instances: 1})
	start := time.Now()
	out, err := b.Submit(context.Background(), []Tensor{f32([]int64{2, 1}, 1, 2)})
	require.NoError(t, err)
	assert.GreaterOrEqual(t, time.Since(start), 60*time.Millisecond)
	assert.Equal(t, []float32{3, 5}, decode(out[0]))
	assert.Equal(t, []int64{2}, r.seen())
}

// A delay under spinBelow takes the polling path instead of a timer; it
// still holds the batch open for the whole delay, and merges what arrives.
func TestShortDelayWaitsThenMerges(t *testing.T) {
	r := &recorder{}
	const delay = 800 * time.Microsecond
	b := newBatcher(t, r, Options{MaxBatchSize: 8, Dynamic: true, MaxQueueDelay: delay, Instances: 1})
	start := time.Now()
	out, err := b.Submit(context.Background(), []Tensor{f32([]int64{2, 1}, 1, 2)})
	require.NoError(t, err)
	assert.GreaterOrEqual(t, time.Since(start), delay)
	assert.Equal(t, []float32{3, 5}, decode(out[0]))

	// Requests submitted together while the first waits join its batch:
	// 64 rows in 1-row requests need at least 8 executions of 8 rows and
	// never more rows per execution than MaxBatchSize.
	var wg sync.WaitGroup
	for i := range 64 {
		wg.Go(func() {
			out, err := b.Submit(context.Background(), []Tensor{f32([]int64{1, 1}, float32(i))})
			require.NoError(t, err)
			assert.Equal(t, []float32{float32(2*i + 1)}, decode(out[0]))
		})
	}
	wg.Wait()
	total := int64(0)
	for _, n := range r.seen()[1:] {
		assert.LessOrEqual(t, n, int64(8))
		total += n
	}
	assert.Equal(t, int64(64), total)
}

func TestPreferredBatchSizeLeavesEarly(t *testing.T) {
	r := &recorder{}
	b := newBatcher(t, r, Options{MaxBatchSize: 8, Dynamic: true, MaxQueueDelay: 5 * time.Second,
		PreferredBatchSizes: []int{3}, Instances: 1})
	start := time.Now()
	out, err := b.Submit(context.Background(), []Tensor{f32([]int64{3, 1}, 1, 2, 3)})
	require.NoError(t, err)
	assert.Less(t, time.Since(start), 4*time.Second)
	assert.Equal(t, []float32{3, 5, 7}, decode(out[0]))
}

func TestNoCrossTalkUnderConcurrency(t *testing.T) {
	r := &recorder{}
	b := newBatcher(t, r, Options{MaxBatchSize: 16, Dynamic: true, MaxQueueDelay: 2 * time.Millisecond, Instances: 3})
	const clients, each = 32, 20
	var wg sync.WaitGroup
	var failures atomic.Int32
	for c := range clients {
		wg.Go(func() {
			for k := range each {
				rows := 1 + (c+k)%4
				vals := make([]float32, rows*3)
				var sums []float32
				for i := range vals {
					vals[i] = float32(c*1000 + k*10 + i)
				}
				for i := range rows {
					sums = append(sums, vals[3*i]+vals[3*i+1]+vals[3*i+2])
				}
				out, err := b.Submit(context.Background(), []Tensor{f32([]int64{int64(rows), 3}, vals...)})
				if err != nil {
					failures.Add(1)
					t.Errorf("client %d request %d: %v", c, k, err)
					return
				}
				want := make([]float32, len(vals))
				for i, v := range vals {
					want[i] = 2*v + 1
				}
				if !assert.Equal(t, want, decode(out[0])) || !assert.Equal(t, sums, decode(out[1])) {
					failures.Add(1)
				}
				assert.Equal(t, []int64{int64(rows), 3}, out[0].Shape)
			}
		})
	}
	wg.Wait()
	require.Zero(t, failures.Load())
	s := b.Stats().Snapshot()
	var rows int64
	merged := false
	for _, n := range r.seen() {
		rows += n
		assert.LessOrEqual(t, n, int64(16))
		if n > 4 {
			merged = true
		}
	}
	assert.Equal(t, uint64(rows), s.InferenceCount)
	assert.True(t, merged, "no batch merged several requests: %v", r.seen())
}

func TestIncompatibleShapesAreNotMerged(t *testing.T) {
	r := &recorder{}
	b := newBatcher(t, r, Options{MaxBatchSize: 8, Dynamic: true, MaxQueueDelay: 30 * time.Millisecond, Instances: 1})
	var wg sync.WaitGroup
	wg.Go(func() {
		out, err := b.Submit(context.Background(), []Tensor{f32([]int64{1, 2}, 1, 2)})
		require.NoError(t, err)
		assert.Equal(t, []float32{3, 5}, decode(out[0]))
	})
	wg.Go(func() {
		out, err := b.Submit(context.Background(), []Tensor{f32([]int64{1, 3}, 1, 2, 3)})
		require.NoError(t, err)
		assert.Equal(t, []float32{3, 5, 7}, decode(out[0]))
	})
	wg.Wait()
	assert.ElementsMatch(t, []int64{1, 1}, r.seen())
}

func TestQueueFull(t *testing.T) {
	r := &recorder{gate: make(chan struct{}), entered: make(chan struct{}, 8)}
	b := newBatcher(t, r, Options{MaxQueueSize: 2, Instances: 1})
	results := make(chan error, 3)
	submit := func(v float32) {
		_, err := b.Submit(context.Background(), []Tensor{f32([]int64{1}, v)})
		results <- err
	}
	go submit(1)
	<-r.entered // the first request executes, the queue is empty
	go submit(2)
	go submit(3)
	require.Eventually(t, func() bool { return b.QueueLen() == 2 }, 5*time.Second, time.Millisecond)
	_, err := b.Submit(context.Background(), []Tensor{f32([]int64{1}, 4)})
	require.ErrorIs(t, err, ErrQueueFull)
	for range 3 {
		r.gate <- struct{}{}
	}
	for range 3 {
		require.NoError(t, <-results)
	}
}

func TestExpiredRequestsAreDroppedBeforeExecution(t *testing.T) {
	r := &recorder{gate: make(chan struct{}), entered: make(chan struct{}, 8)}
	b := newBatcher(t, r, Options{Instances: 1})
	first := make(chan error, 1)
	go func() {
		_, err := b.Submit(context.Background(), []Tensor{f32([]int64{1}, 1)})
		first <- err
	}()
	<-r.entered
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	_, err := b.Submit(ctx, []Tensor{f32([]int64{7}, 1, 2, 3, 4, 5, 6, 7)})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	r.gate <- struct{}{}
	require.NoError(t, <-first)
	// The next request runs; the expired one (7 elements) never did.
	go func() { r.gate <- struct{}{} }()
	_, err = b.Submit(context.Background(), []Tensor{f32([]int64{2}, 1, 2)})
	require.NoError(t, err)
	assert.Equal(t, []int64{1, 2}, r.seen())
	// A request whose context already ended is refused at once.
	_, err = b.Submit(ctx, []Tensor{f32([]int64{1}, 1)})
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

func TestInstancesRunConcurrently(t *testing.T) {
	r := &recorder{gate: make(chan struct{}), entered: make(chan struct{}, 8)}
	b := newBatcher(t, r, Options{Instances: 3})
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Go(func() {
			_, err := b.Submit(context.Background(), []Tensor{f32([]int64{1}, float32(i))})
			assert.NoError(t, err)
		})
	}
	for range 3 {
		select {
		case <-r.entered:
		case <-time.After(5 * time.Second):
			t.Fatal("three instances did not run at once")
		}
	}
	assert.Equal(t, int32(3), r.active.Load())
	for range 3 {
		r.gate <- struct{}{}
	}
	wg.Wait()
}

func TestFailingRequestDoesNotFailItsBatch(t *testing.T) {
	r := &recorder{}
	b := newBatcher(t, r, Options{MaxBatchSize: 4, Dynamic: true, MaxQueueDelay: time.Second, Instances: 1})
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			v := float32(i)
			if i == 2 {
				v = -1
			}
			out, err := b.Submit(context.Background(), []Tensor{f32([]int64{1, 1}, v)})
			if i == 2 {
				var ee *ExecError
				require.ErrorAs(t, err, &ee)
				assert.Contains(t, err.Error(), "negative input")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, []float32{2*v + 1}, decode(out[0]))
		})
	}
	wg.Wait()
	assert.Equal(t, []int64{4, 1, 1, 1, 1}, r.seen())
}

func TestCloseDrainsQueue(t *testing.T) {
	r := &recorder{gate: make(chan struct{}), entered: make(chan struct{}, 8)}
	b, err := New(r.run, Options{Instances: 1})
	require.NoError(t, err)
	errs := make(chan error, 2)
	submit := func(v float32) {
		go func() {
			_, err := b.Submit(context.Background(), []Tensor{f32([]int64{1}, v)})
			errs <- err
		}()
	}
	// The second request is queued only once the first is executing, so the
	// two are never merged into one batch.
	submit(0)
	<-r.entered
	submit(1)
	require.Eventually(t, func() bool { return b.QueueLen() == 1 }, 5*time.Second, time.Millisecond)
	closed := make(chan struct{})
	go func() { b.Close(); close(closed) }()
	require.Eventually(t, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.closed
	}, 5*time.Second, time.Millisecond)
	_, err = b.Submit(context.Background(), []Tensor{f32([]int64{1}, 9)})
	require.ErrorIs(t, err, ErrClosed)
	go func() {
		for range 2 {
			r.gate <- struct{}{}
		}
	}()
	<-closed
	for range 2 {
		require.NoError(t, <-errs)
	}
}

func TestRejectsMalformedRequests(t *testing.T) {
	r := &recorder{}
	b := newBatcher(t, r, Options{MaxBatchSize: 4, Dynamic: true, Instances: 1})
	ctx := context.Background()
	_, err := b.Submit(ctx, nil)
	require.Error(t, err)
	_, err = b.Submit(ctx, []Tensor{f32([]int64{5, 1}, 1, 2, 3, 4, 5)})
	require.ErrorContains(t, err, "batch size 5 is not within 1..4")
	_, err = b.Submit(ctx, []Tensor{f32([]int64{1, 2}, 1)})
	require.ErrorContains(t, err, "4 bytes for float32 [1 2]")
	_, err = b.Submit(ctx, []Tensor{f32([]int64{-1, 2}, 1)})
	require.ErrorContains(t, err, "negative")
	_, err = b.Submit(ctx, []Tensor{f32([]int64{1, 1 << 40, 1 << 40}, 1)})
	require.ErrorContains(t, err, "overflows")
	_, err = b.Submit(ctx, []Tensor{f32([]int64{1, 1}, 1), f32([]int64{2, 1}, 1, 2)})
	require.ErrorContains(t, err, "input 1 has batch size 2, input 0 has 1")
	assert.Empty(t, r.seen())
}

func TestOutputWithoutBatchDimensionFails(t *testing.T) {
	run := func(ins []*core.Tensor) ([]*core.Tensor, error) {
		t, err := core.NewTensor([]float32{1, 2, 3})
		return []*core.Tensor{t}, err
	}
	b, err := New(run, Options{MaxBatchSize: 4, Instances: 1})
	require.NoError(t, err)
	defer b.Close()
	_, err = b.Submit(context.Background(), []Tensor{f32([]int64{2, 1}, 1, 2)})
	require.ErrorContains(t, err, "output 0 has shape [3]; a batch of 2 needs 2 along dimension 0")
}
