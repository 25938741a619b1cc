package pipeline

import (
	"context"
	"sync"
	"time"
)

// Trigger runs a function debounced and one at a time: Notify (a new
// dataset version committed) starts it once no other Notify came for the
// debounce period; a Notify while it runs queues exactly one follow-up run
// (however many came), started a debounce period after the run ends.
// Continuous training (`kiln serve --pipeline --watch-dataset`) drives a
// pipeline with it.
type Trigger struct {
	debounce time.Duration
	fn       func(ctx context.Context)
	ctx      context.Context
	cancel   context.CancelFunc

	mu      sync.Mutex
	timer   *time.Timer
	running bool
	pending bool
	closed  bool
	wg      sync.WaitGroup
}

// NewTrigger returns a Trigger calling fn (which must return when its
// context is cancelled) debounce after the last Notify.
func NewTrigger(debounce time.Duration, fn func(ctx context.Context)) *Trigger {
	ctx, cancel := context.WithCancel(context.Background())
	return &Trigger{debounce: debounce, fn: fn, ctx: ctx, cancel: cancel}
}

// Notify records a change: fn runs debounce after the last one, or after
// the run in progress (once, for every Notify during it).
func (t *Trigger) Notify() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	if t.running {
		t.pending = true
		return
	}
	t.arm()
}

// arm (re)starts the debounce timer; t.mu is held.
func (t *Trigger) arm() {
	if t.timer != nil {
		t.timer.Stop()
	}
	t.timer = time.AfterFunc(t.debounce, t.fire)
}

func (t *Trigger) fire() {
	t.mu.Lock()
	if t.closed || t.running {
		t.mu.Unlock()
		return
	}
	t.timer, t.running = nil, true
	t.wg.Add(1)
	t.mu.Unlock()
	defer t.wg.Done()
	t.fn(t.ctx)
	t.mu.Lock()
	t.running = false
	if t.pending && !t.closed {
		t.pending = false
		t.arm()
	}
	t.mu.Unlock()
}

// Close stops the trigger: no new run starts, a run in progress is
// cancelled, and Close waits for it to return.
func (t *Trigger) Close() {
	t.mu.Lock()
	t.closed = true
	if t.timer != nil {
		t.timer.Stop()
	}
	t.mu.Unlock()
	t.cancel()
	t.wg.Wait()
}
