package main

import (
	"bufio"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
)

type predictOptions struct {
	model     string
	data      string
	labels    string
	target    string
	batchSize int
	topK      int
	jsonOut   bool
}

func newPredictCmd() *cobra.Command {
	var o predictOptions
	cmd := &cobra.Command{
		Use:   "predict --model MODEL.pt --data ROWS.csv",
		Short: "Run batched inference of a classifier over the rows of a CSV file",
		Long: `Reads numeric feature rows from a CSV file (a header row is skipped), runs
the TorchScript model over them in batches of --batch-size rows, applies
softmax to each output row and prints the top classes, with label names
from --labels (one per line). With --target, the named column holds the
true class index and is excluded from the features; accuracy is reported.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return runPredict(cmd.OutOrStdout(), o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.model, "model", "", "TorchScript model file or Kiln model package directory (required)")
	f.StringVar(&o.data, "data", "", "CSV file of feature rows (required)")
	f.StringVar(&o.labels, "labels", "", "file with one class label per line")
	f.StringVar(&o.target, "target", "", "CSV column holding the true class index")
	f.IntVar(&o.batchSize, "batch-size", 16, "rows per forward pass")
	f.IntVar(&o.topK, "top-k", 1, "classes to print per row")
	f.BoolVar(&o.jsonOut, "json", false, "print one JSON object per row")
	cmd.MarkFlagRequired("model")
	cmd.MarkFlagRequired("data")
	return cmd
}

// readRows parses a numeric CSV; a first row that does not parse is a header.
func readRows(path, target string) (rows [][]float32, truth []int, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	r := csv.NewReader(bufio.NewReader(f))
	targetCol := -1
	for line := 1; ; line++ {
		rec, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", path, err)
		}
		vals := make([]float32, 0, len(rec))
		var bad error
		for _, s := range rec {
			v, err := strconv.ParseFloat(strings.TrimSpace(s), 32)
			if err != nil {
				bad = err
				break
			}
			vals = append(vals, float32(v))
		}
		if bad != nil {
			if line == 1 { // header
				for i, name := range rec {
					if strings.TrimSpace(name) == target {
						targetCol = i
					}
				}
				if target != "" && targetCol < 0 {
					return nil, nil, fmt.Errorf("%s: no column %q in header %v", path, target, rec)
				}
				continue
			}
			return nil, nil, fmt.Errorf("%s line %d: %w", path, line, bad)
		}
		if targetCol >= 0 {
			truth = append(truth, int(vals[targetCol]))
			vals = append(vals[:targetCol], vals[targetCol+1:]...)
		}
		if len(rows) > 0 && len(vals) != len(rows[0]) {
			return nil, nil, fmt.Errorf("%s line %d: %d features, earlier rows have %d", path, line, len(vals), len(rows[0]))
		}
		rows = append(rows, vals)
	}
	if len(rows) == 0 {
		return nil, nil, fmt.Errorf("%s: no data rows", path)
	}
	return rows, truth, nil
}

func readLabels(path string) ([]string, error) {
	if path == "" {
		return nil, nil
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var labels []string
	for _, l := range strings.Split(strings.TrimRight(string(raw), "\n"), "\n") {
		labels = append(labels, strings.TrimSpace(l))
	}
	return labels, nil
}

// rowResult is one row's prediction.
type rowResult struct {
	Row     int       `json:"row"`
	Classes []int     `json:"classes"`
	Labels  []string  `json:"labels,omitempty"`
	Scores  []float64 `json:"scores"`
	Truth   *int      `json:"truth,omitempty"`
}

func topK(logits []float32, k int) ([]int, []float64) {
	mx := math.Inf(-1)
	for _, v := range logits {
		mx = math.Max(mx, float64(v))
	}
	probs := make([]float64, len(logits))
	sum := 0.0
	for i, v := range logits {
		probs[i] = math.Exp(float64(v) - mx)
		sum += probs[i]
	}
	idx := make([]int, 0, k)
	used := make([]bool, len(logits))
	for len(idx) < k && len(idx) < len(logits) {
		best := -1
		for i := range probs {
			if !used[i] && (best < 0 || probs[i] > probs[best]) {
				best = i
			}
		}
		used[best] = true
		idx = append(idx, best)
	}
	scores := make([]float64, len(idx))
	for i, c := range idx {
		scores[i] = probs[c] / sum
	}
	return idx, scores
}

func runPredict(w io.Writer, o predictOptions) error {
	if o.batchSize < 1 {
		return fmt.Errorf("--batch-size must be >= 1, got %d", o.batchSize)
	}
	if o.topK < 1 {
		return fmt.Errorf("--top-k must be >= 1, got %d", o.topK)
	}
	m, err := modelpkg.LoadModule(o.model)
	if err != nil {
		return err
	}
	defer m.Close()
	rows, truth, err := readRows(o.data, o.target)
	if err != nil {
		return err
	}
	labels, err := readLabels(o.labels)
	if err != nil {
		return err
	}
	width := len(rows[0])
	enc := json.NewEncoder(w)
	correct, batches := 0, 0
	start := time.Now()
	for lo := 0; lo < len(rows); lo += o.batchSize {
		hi := min(lo+o.batchSize, len(rows))
		flat := make([]float32, 0, (hi-lo)*width)
		for _, r := range rows[lo:hi] {
			flat = append(flat, r...)
		}
		x, err := core.NewTensor(flat, int64(hi-lo), int64(width))
		if err != nil {
			return err
		}
		outs, err := m.Forward(x)
		x.Close()
		if err != nil {
			return fmt.Errorf("rows %d-%d: %w", lo, hi-1, err)
		}
		batches++
		out := outs[0]
		if out.DType() != core.Float32 || out.Dim() != 2 || out.Shape()[0] != int64(hi-lo) {
			core.CloseAll(outs)
			return fmt.Errorf("model output is %v; predict expects float32 [batch, classes]", out)
		}
		logits, err := core.Data[float32](out)
		if err != nil {
			core.CloseAll(outs)
			return err
		}
		nc := int(out.Shape()[1])
		for i := 0; i < hi-lo; i++ {
			classes, scores := topK(logits[i*nc:(i+1)*nc], o.topK)
			res := rowResult{Row: lo + i, Classes: classes, Scores: scores}
			for _, c := range classes {
				if c < len(labels) {
					res.Labels = append(res.Labels, labels[c])
				}
			}
			if truth != nil {
				tr := truth[lo+i]
				res.Truth = &tr
				if classes[0] == tr {
					correct++
				}
			}
			if o.jsonOut {
				if err := enc.Encode(res); err != nil {
					core.CloseAll(outs)
					return err
				}
				continue
			}
			fmt.Fprintf(w, "row %4d:", res.Row)
			for j, c := range classes {
				name := strconv.Itoa(c)
				if j < len(res.Labels) {
					name = res.Labels[j]
				}
				fmt.Fprintf(w, "  %-12s %.3f", name, scores[j])
			}
			if res.Truth != nil {
				mark := "ok"
				if classes[0] != *res.Truth {
					mark = "WRONG"
				}
				tname := strconv.Itoa(*res.Truth)
				if *res.Truth < len(labels) {
					tname = labels[*res.Truth]
				}
				fmt.Fprintf(w, "  (true: %s, %s)", tname, mark)
			}
			fmt.Fprintln(w)
		}
		core.CloseAll(outs)
	}
	if !o.jsonOut {
		el := time.Since(start)
		fmt.Fprintf(w, "%d rows in %d batches of up to %d, %.2f ms, libtorch %s, %d threads\n",
			len(rows), batches, o.batchSize, float64(el.Microseconds())/1000, core.TorchVersion(), core.NumThreads())
		if truth != nil {
			fmt.Fprintf(w, "accuracy %.1f%% (%d/%d)\n", 100*float64(correct)/float64(len(rows)), correct, len(rows))
		}
	}
	return nil
}
