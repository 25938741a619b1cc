package batcher

import (
	"math"
	"slices"
	"sync"
	"time"
)

// LatencyBounds are the upper bounds, in seconds, of the request latency
// histogram (StatsSnapshot.Latency): 50 µs to 60 s, about 19% apart, so
// that a percentile read from it is within one bucket (±19%) of the true
// value. The last bucket of Latency, past the final bound, is +Inf.
var LatencyBounds = func() []float64 {
	var b []float64
	for x := 50e-6; x < 60; x *= math.Pow(10, 0.075) {
		b = append(b, x)
	}
	return append(b, 60)
}()

// Histogram counts durations by LatencyBounds: Counts[i] is the number of
// durations d with LatencyBounds[i-1] < d ≤ LatencyBounds[i] (seconds);
// the last element counts those above the final bound.
type Histogram struct {
	Counts []uint64
	// Sum is the total of the durations, in seconds.
	Sum float64
}

func (h *Histogram) add(d time.Duration) {
	if h.Counts == nil {
		h.Counts = make([]uint64, len(LatencyBounds)+1)
	}
	sec := d.Seconds()
	i, _ := slices.BinarySearch(LatencyBounds, sec)
	h.Counts[i]++
	h.Sum += sec
}

// Total returns the number of durations counted.
func (h Histogram) Total() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}

// Sub returns h minus an earlier snapshot of the same histogram (the
// durations counted in between).
func (h Histogram) Sub(earlier Histogram) Histogram {
	out := Histogram{Counts: slices.Clone(h.Counts), Sum: h.Sum - earlier.Sum}
	for i := range earlier.Counts {
		if i < len(out.Counts) {
			out.Counts[i] -= min(out.Counts[i], earlier.Counts[i])
		}
	}
	return out
}

// Quantile returns the q-quantile (0 < q ≤ 1) of the durations counted,
// as the upper bound of the bucket it falls in (Prometheus's
// histogram_quantile interpolates within the bucket; an upper bound never
// understates a latency), or 0 when nothing was counted. Durations past
// the final bound report it.
func (h Histogram) Quantile(q float64) time.Duration {
	total := h.Total()
	if total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(total)))
	var cum uint64
	for i, c := range h.Counts {
		cum += c
		if cum >= rank && c > 0 {
			b := LatencyBounds[min(i, len(LatencyBounds)-1)]
			return time.Duration(b * float64(time.Second))
		}
	}
	return time.Duration(LatencyBounds[len(LatencyBounds)-1] * float64(time.Second))
}

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
	// Latency is the histogram of successful requests' end-to-end
	// durations (by LatencyBounds).
	Latency Histogram
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
		s.s.Latency.add(d)
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
	out.Latency.Counts = slices.Clone(s.s.Latency.Counts)
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
