package batcher

import (
	"slices"
	"sync"
	"time"
)

// Duration is a cumulative count and duration.
type Duration struct {
	// Count is the number of occurrences.
	Count uint64
	// NS is their total duration in nanoseconds.
	NS uint64
}

func (d *Duration) add(t time.Duration) {
	d.Count++
	if t > 0 {
		d.NS += uint64(t)
	}
}

// BatchStats aggregates the executions of one batch size.
type BatchStats struct {
	// Size is the batch size (rows along dimension 0; 1 without batching).
	Size int
	// ComputeInput is the time spent merging inputs into C tensors.
	ComputeInput Duration
	// ComputeInfer is the time spent in the model's forward.
	ComputeInfer Duration
	// ComputeOutput is the time spent splitting outputs per request.
	ComputeOutput Duration
}

// StatsSnapshot is a copy of a model version's statistics.
type StatsSnapshot struct {
	// Success and Fail are requests end to end, as the server records them.
	Success, Fail Duration
	// Queue is the time requests waited before execution.
	Queue Duration
	// ComputeInput, ComputeInfer and ComputeOutput are per request: each
	// request of a batch counts the batch's durations.
	ComputeInput, ComputeInfer, ComputeOutput Duration
	// InferenceCount counts successful inferences, one per batch row.
	InferenceCount uint64
	// ExecutionCount counts successful model executions.
	ExecutionCount uint64
	// LastInference is when the last request finished (zero if none).
	LastInference time.Time
	// Batches holds per batch size statistics, ascending by size.
	Batches []BatchStats
}

// Stats accumulates statistics of one model version. It is safe for
// concurrent use.
type Stats struct {
	mu      sync.Mutex
	s       StatsSnapshot
	batches map[int]*BatchStats
}

// RecordRequest records one request's end-to-end outcome and duration.
func (s *Stats) RecordRequest(ok bool, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok {
		s.s.Success.add(d)
	} else {
		s.s.Fail.add(d)
	}
	s.s.LastInference = time.Now()
}

func (s *Stats) recordExecution(rows int, requests []time.Duration, in, infer, out time.Duration) {
	s.recordExecutionAs(rows, rows, requests, in, infer, out)
}

// recordExecutionAs records an execution of rows under the batch size
// bucket (ForwardTensors' batches, of any size, are recorded under a power
// of two, so that the sizes kept stay few).
func (s *Stats) recordExecutionAs(bucket, rows int, requests []time.Duration, in, infer, out time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.batches == nil {
		s.batches = map[int]*BatchStats{}
	}
	b := s.batches[bucket]
	if b == nil {
		b = &BatchStats{Size: bucket}
		s.batches[bucket] = b
	}
	b.ComputeInput.add(in)
	b.ComputeInfer.add(infer)
	b.ComputeOutput.add(out)
	for _, q := range requests {
		s.s.Queue.add(q)
		s.s.ComputeInput.add(in)
		s.s.ComputeInfer.add(infer)
		s.s.ComputeOutput.add(out)
	}
	s.s.InferenceCount += uint64(rows)
	s.s.ExecutionCount++
}

// Snapshot returns a copy of the statistics.
func (s *Stats) Snapshot() StatsSnapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.s
	out.Batches = nil
	for _, b := range s.batches {
		out.Batches = append(out.Batches, *b)
	}
	slices.SortFunc(out.Batches, func(a, b BatchStats) int { return a.Size - b.Size })
	return out
}

// Reset clears the statistics (after a warmup, for example).
func (s *Stats) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.s = StatsSnapshot{}
	s.batches = nil
}
