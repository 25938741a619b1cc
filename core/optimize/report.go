package optimize

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/train"
)

// Variant is one row of a Report: a model and what it measured.
type Variant struct {
	Name string `json:"name"`
	// FileBytes is the size of the saved TorchScript file.
	FileBytes int64 `json:"file_bytes"`
	// Params is the number of weight and bias elements (quantized ones
	// included).
	Params int64 `json:"params"`
	// Sparsity is the fraction of zero weights in linear and conv layers.
	Sparsity float64 `json:"sparsity"`
	// Metric names Value: test accuracy (classification) or test r2.
	Metric string  `json:"metric"`
	Value  float64 `json:"value"`
	// LatencyB1 and LatencyB64 are the median forward times, in
	// milliseconds, for batches of 1 and 64 rows.
	LatencyB1  float64 `json:"latency_ms_b1"`
	LatencyB64 float64 `json:"latency_ms_b64"`
}

// Report compares variants of a model.
type Report struct {
	Variants []Variant `json:"variants"`
	// Threads is libtorch's intra-op thread count the latencies were
	// measured with (the process's, core.SetNumThreads).
	Threads int `json:"threads,omitempty"`
}

// WriteText writes the report as an aligned table.
func (r *Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "variant\tfile\tparams\tsparsity\tmetric\tms b1\tms b64\t")
	for _, v := range r.Variants {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.1f%%\t%s %.4f\t%.3f\t%.3f\t\n", v.Name, humanBytes(v.FileBytes), v.Params,
			100*v.Sparsity, v.Metric, v.Value, v.LatencyB1, v.LatencyB64)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if r.Threads > 0 {
		_, err := fmt.Fprintf(w, "latency: median forward time, variants timed in alternation, %d intra-op thread(s)\n", r.Threads)
		return err
	}
	return nil
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// Measure saves m to a temporary file for its size and measures its test
// metric on ds and its latency. task and classes say how outputs score.
func Measure(name string, m *core.Module, params int64, sparsity float64, ds *data.Dataset, task data.Task, classes int) (Variant, error) {
	return measure(name, m, params, sparsity, ds, task, classes, false, true)
}

// measure is Measure, timing the latencies only when timed.
// probs says a single output is a probability (threshold 0.5), not a logit.
func measure(name string, m *core.Module, params int64, sparsity float64, ds *data.Dataset, task data.Task, classes int, probs, timed bool) (Variant, error) {
	v := Variant{Name: name, Params: params, Sparsity: sparsity}
	dir, err := os.MkdirTemp("", "kiln-measure-")
	if err != nil {
		return v, err
	}
	defer os.RemoveAll(dir)
	p := filepath.Join(dir, "model.pt")
	if err := m.Save(p); err != nil {
		return v, err
	}
	st, err := os.Stat(p)
	if err != nil {
		return v, err
	}
	v.FileBytes = st.Size()
	met, err := ScoreOutputs(m, ds, task, classes, probs)
	if err != nil {
		return v, err
	}
	v.Metric = "r2"
	if task == data.Classification {
		v.Metric = "accuracy"
	}
	v.Value = met[v.Metric]
	if !timed {
		return v, nil
	}
	if v.LatencyB1, err = Latency(m, ds, 1); err != nil {
		return v, err
	}
	if v.LatencyB64, err = Latency(m, ds, 64); err != nil {
		return v, err
	}
	return v, nil
}

// outputs runs m over ds in batches of 256 and returns the flat outputs
// and the number of values per row.
func outputs(m *core.Module, ds *data.Dataset) ([]float32, int, error) {
	var out []float32
	width := 0
	for start := 0; start < ds.Len(); start += 256 {
		end := min(start+256, ds.Len())
		x, err := core.NewTensor(ds.X[start*ds.Features:end*ds.Features], int64(end-start), int64(ds.Features))
		if err != nil {
			return nil, 0, err
		}
		ys, err := m.Forward(x)
		x.Close()
		if err != nil {
			return nil, 0, err
		}
		f, err := ys[0].To(core.Float32)
		if err != nil {
			core.CloseAll(ys)
			return nil, 0, err
		}
		v, err := core.CopyData[float32](f)
		shape := f.Shape()
		f.Close()
		core.CloseAll(ys)
		if err != nil {
			return nil, 0, err
		}
		width = len(v) / (end - start)
		_ = shape
		out = append(out, v...)
	}
	return out, width, nil
}

// Score computes the metrics of m's outputs on ds: class metrics (argmax
// of the logits; one output: logit > 0) or regression metrics.
func Score(m *core.Module, ds *data.Dataset, task data.Task, classes int) (train.Metrics, error) {
	return ScoreOutputs(m, ds, task, classes, false)
}

// ScoreOutputs is Score for a model whose single output is a probability
// of class 1 (threshold 0.5) when probs, as a package trained with
// binary_crossentropy on a sigmoid output records (core/train).
func ScoreOutputs(m *core.Module, ds *data.Dataset, task data.Task, classes int, probs bool) (train.Metrics, error) {
	if ds == nil || ds.Len() == 0 {
		return nil, fmt.Errorf("kiln: optimize: no data to score on")
	}
	out, w, err := outputs(m, ds)
	if err != nil {
		return nil, err
	}
	n := ds.Len()
	if task != data.Classification {
		pred, truth := make([]float64, n), make([]float64, n)
		for i := range n {
			pred[i], truth[i] = float64(out[i*w]), float64(ds.Y[i])
		}
		return train.RegressionMetrics(pred, truth), nil
	}
	pred, truth := make([]int, n), make([]int, n)
	for i := range n {
		row := out[i*w : (i+1)*w]
		if w == 1 {
			if (probs && row[0] > 0.5) || (!probs && row[0] > 0) {
				pred[i] = 1
			}
		} else {
			pred[i] = slices.Index(row, slices.Max(row))
		}
		truth[i] = int(ds.Y[i])
	}
	return train.ClassMetrics(pred, truth, max(classes, 2)), nil
}

// Latency returns the median time in milliseconds of m's forward on a
// batch of `batch` rows of ds (Latencies with one module).
func Latency(m *core.Module, ds *data.Dataset, batch int) (float64, error) {
	l, err := Latencies([]*core.Module{m}, ds, batch)
	if err != nil {
		return 0, err
	}
	return l[0], nil
}

// Timing of Latencies: each module's warm-up, the rounds, and the length
// of one module's block of calls in a round.
const (
	latencyWarmup = 50 * time.Millisecond
	latencyRounds = 15
	latencyBlock  = 20 * time.Millisecond
)

// Latencies returns the median time in milliseconds of each module's
// forward on the same batch of `batch` rows of ds (its first rows,
// repeated when ds has fewer). The modules are timed in alternation so
// that each sees the same conditions (other processes, frequency, cache):
// after a warm-up of each (at least 10 calls and 50 ms), 15 rounds run
// every module, in an order rotated each round, for a block of calls of
// about 20 ms, each call timed alone. The median over all of a module's
// calls ignores the slow outliers a shared machine produces. Forward runs
// with the process's intra-op thread count (core.SetNumThreads).
func Latencies(mods []*core.Module, ds *data.Dataset, batch int) ([]float64, error) {
	if ds == nil || ds.Len() == 0 {
		return nil, fmt.Errorf("kiln: optimize: no data to time on")
	}
	x := make([]float32, 0, batch*ds.Features)
	for i := range batch {
		r := i % ds.Len()
		x = append(x, ds.X[r*ds.Features:(r+1)*ds.Features]...)
	}
	t, err := core.NewTensor(x, int64(batch), int64(ds.Features))
	if err != nil {
		return nil, err
	}
	defer t.Close()
	// One OS thread for the whole measurement: libtorch's per-thread
	// state (thread pools, caches) stays warm.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	run := func(m *core.Module) (time.Duration, error) {
		start := time.Now()
		ys, err := m.Forward(t)
		d := time.Since(start)
		core.CloseAll(ys)
		return d, err
	}
	// Warm up, and size each module's block from its warm-up calls.
	block := make([]int, len(mods))
	for i, m := range mods {
		var calls int
		var spent time.Duration
		for calls < 10 || spent < latencyWarmup {
			d, err := run(m)
			if err != nil {
				return nil, err
			}
			calls++
			spent += d
		}
		block[i] = max(3, int(latencyBlock/(spent/time.Duration(calls))))
	}
	times := make([][]time.Duration, len(mods))
	for r := range latencyRounds {
		for k := range mods {
			i := (k + r) % len(mods)
			for range block[i] {
				d, err := run(mods[i])
				if err != nil {
					return nil, err
				}
				times[i] = append(times[i], d)
			}
		}
	}
	out := make([]float64, len(mods))
	for i, ts := range times {
		slices.Sort(ts)
		out[i] = float64(ts[len(ts)/2].Nanoseconds()) / 1e6
	}
	return out, nil
}

// String is the report as text.
func (r *Report) String() string {
	var b strings.Builder
	r.WriteText(&b)
	return b.String()
}
