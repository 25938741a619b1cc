// Package loadgen is the closed-loop load generator Kiln's benchmarks
// share: c workers each call a function back to back, for a warm-up whose
// calls are discarded and then for a measured duration.
package loadgen

import (
	"slices"
	"sync"
	"time"
)

// Result is what a run measured.
type Result struct {
	// Requests and Errors count the measured calls that succeeded and
	// failed; FirstErr is the first failure.
	Requests, Errors int
	FirstErr         error
	// Latencies are the successful calls' durations, ascending.
	Latencies []time.Duration
	// Elapsed is the measured duration.
	Elapsed time.Duration
}

// RPS returns the successful calls per second.
func (r Result) RPS() float64 { return float64(r.Requests) / r.Elapsed.Seconds() }

// Pct returns the p-quantile (0 ≤ p ≤ 1) of the latencies, 0 when none.
func (r Result) Pct(p float64) time.Duration {
	if len(r.Latencies) == 0 {
		return 0
	}
	return r.Latencies[min(len(r.Latencies)-1, int(p*float64(len(r.Latencies))))]
}

// Run runs c workers calling do for warm (discarded), then for dur; a call
// counts when it started and ended inside the measured span.
func Run(c int, warm, dur time.Duration, do func(worker int) error) Result {
	return RunMarked(c, warm, dur, nil, do)
}

// RunMarked is Run that also calls mark(true) when the measured span
// begins and mark(false) when it ends (from a goroutine of its own; Run
// returns after both), so that a benchmark can read counters, such as CPU
// time, over exactly that span. mark may be nil.
func RunMarked(c int, warm, dur time.Duration, mark func(begin bool), do func(worker int) error) Result {
	var mu sync.Mutex
	var res Result
	var wg sync.WaitGroup
	start := time.Now()
	measureFrom, end := start.Add(warm), start.Add(warm+dur)
	if mark != nil {
		wg.Go(func() {
			time.Sleep(time.Until(measureFrom))
			mark(true)
			time.Sleep(time.Until(end))
			mark(false)
		})
	}
	for w := range c {
		wg.Go(func() {
			var lat []time.Duration
			var n, errs int
			var first error
			for {
				t0 := time.Now()
				if !t0.Before(end) {
					break
				}
				err := do(w)
				t1 := time.Now()
				if t0.Before(measureFrom) || t1.After(end) {
					continue
				}
				if err != nil {
					errs++
					if first == nil {
						first = err
					}
					continue
				}
				n++
				lat = append(lat, t1.Sub(t0))
			}
			mu.Lock()
			res.Requests += n
			res.Errors += errs
			if res.FirstErr == nil {
				res.FirstErr = first
			}
			res.Latencies = append(res.Latencies, lat...)
			mu.Unlock()
		})
	}
	wg.Wait()
	res.Elapsed = dur
	slices.Sort(res.Latencies)
	return res
}
