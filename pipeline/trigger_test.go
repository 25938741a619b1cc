package pipeline

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestTrigger: a burst of notifications makes one run after the quiet
// period; notifications during a run make exactly one follow-up; runs
// never overlap; Close cancels the run in progress.
func TestTrigger(t *testing.T) {
	var runs, active, overlap atomic.Int32
	started := make(chan struct{}, 10)
	release := make(chan struct{})
	tr := NewTrigger(50*time.Millisecond, func(ctx context.Context) {
		if active.Add(1) > 1 {
			overlap.Add(1)
		}
		defer active.Add(-1)
		runs.Add(1)
		started <- struct{}{}
		select {
		case <-release:
		case <-ctx.Done():
		}
	})
	for range 5 {
		tr.Notify()
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("no run")
	}
	assert.Equal(t, int32(1), runs.Load(), "one run for the burst")
	// Three notifications during the run: one follow-up.
	tr.Notify()
	tr.Notify()
	tr.Notify()
	release <- struct{}{}
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("no follow-up run")
	}
	release <- struct{}{}
	time.Sleep(200 * time.Millisecond)
	assert.Equal(t, int32(2), runs.Load(), "exactly one follow-up")
	assert.Zero(t, overlap.Load())

	// Close cancels a run in progress and waits for it.
	tr.Notify()
	<-started
	done := make(chan struct{})
	go func() { tr.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not cancel the run")
	}
	require.Equal(t, int32(0), active.Load())
	tr.Notify() // after Close: nothing
	time.Sleep(100 * time.Millisecond)
	assert.Equal(t, int32(3), runs.Load())
}
