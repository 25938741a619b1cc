package evaluate

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/evaluate/stats"
)

// warmupCalls is the number of untimed forward calls of each model on the
// first batch before any timed one (libtorch's first calls of a
// TorchScript module run its profiling executor and allocate).
const warmupCalls = 3

// outputs is one model's outputs on every row: width values per row.
type outputs struct {
	v     []float32
	width int
}

// score runs both models over every row in batches of BatchSize, in
// alternation (candidate first on even batches, baseline first on odd
// ones, so neither always runs on a cache the other warmed), timing each
// forward call alone, and keeps the outputs. When one pass yields fewer
// than MinTimings calls per model, further passes over the same batches
// are timed (outputs discarded). The measurement runs on one locked OS
// thread so that libtorch's per-thread state stays warm.
func (j *Job) score(ctx context.Context) ([2]outputs, [2]Latency, error) {
	var out [2]outputs
	var lat [2]Latency
	n, bs := j.table.Rows(), j.opts.BatchSize
	nb := (n + bs - 1) / bs
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	forward := func(s *side, lo, hi int) ([]float32, int, time.Duration, error) {
		x, err := core.NewTensor(s.x[lo*s.inputs:hi*s.inputs], int64(hi-lo), int64(s.inputs))
		if err != nil {
			return nil, 0, 0, err
		}
		defer x.Close()
		t0 := time.Now()
		ys, err := s.mod.Forward(x)
		d := time.Since(t0)
		if err != nil {
			return nil, 0, 0, fmt.Errorf("kiln: evaluate: %s %s: rows %d-%d: %w", s.pkg.Role, s.pkg.Ref, lo, hi-1, err)
		}
		defer core.CloseAll(ys)
		if len(ys) == 0 || ys[0].Dim() == 0 || ys[0].Shape()[0] != int64(hi-lo) {
			return nil, 0, 0, core.Errorf(core.InvalidArgument, "kiln: evaluate: %s %s: forward on %d rows returned %v, want [%d, ...]",
				s.pkg.Role, s.pkg.Ref, hi-lo, ys, hi-lo)
		}
		f, err := ys[0].To(core.Float32)
		if err != nil {
			return nil, 0, 0, err
		}
		defer f.Close()
		v, err := core.CopyData[float32](f)
		if err != nil {
			return nil, 0, 0, err
		}
		return v, len(v) / (hi - lo), d, nil
	}
	for _, s := range j.sides {
		for range warmupCalls {
			if _, _, _, err := forward(s, 0, min(bs, n)); err != nil {
				return out, lat, err
			}
		}
	}
	times := [2][]float64{}
	for pass := 0; pass == 0 || len(times[0]) < j.opts.MinTimings; pass++ {
		for b := range nb {
			if err := ctx.Err(); err != nil {
				return out, lat, err
			}
			lo, hi := b*bs, min((b+1)*bs, n)
			for k := range 2 {
				i := (k + b + pass) % 2
				v, w, d, err := forward(j.sides[i], lo, hi)
				if err != nil {
					return out, lat, err
				}
				times[i] = append(times[i], float64(d.Nanoseconds())/1e6)
				if pass > 0 {
					continue
				}
				if want := j.sides[i].pkg.outputWidth(); w != want {
					return out, lat, core.Errorf(core.InvalidArgument, "kiln: evaluate: %s %s: forward returned %d values per row, its manifest declares %d",
						j.sides[i].pkg.Role, j.sides[i].pkg.Ref, w, want)
				}
				out[i].v = append(out[i].v, v...)
				out[i].width = w
			}
			if j.opts.Progress != nil {
				stage := "score"
				if pass > 0 {
					stage = "time"
				}
				j.opts.Progress(Progress{Stage: stage, Done: b + 1, Total: nb})
			}
		}
	}
	for i := range 2 {
		t := slices.Clone(times[i])
		slices.Sort(t)
		var sum float64
		for _, v := range t {
			sum += v
		}
		lat[i] = Latency{BatchSize: bs, Calls: len(t), P50Ms: stats.Quantile(t, 0.5), P95Ms: stats.Quantile(t, 0.95), MeanMs: sum / float64(len(t))}
	}
	return out, lat, nil
}
