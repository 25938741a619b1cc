// Command statscheck runs the evaluation gate's statistics on inputs read
// as JSON from stdin and prints the results as JSON on stdout, so that
// tests/python/test_evaluate_stats.py can compare them with statsmodels and
// SciPy. It is a test helper, not a user command.
//
// Input:
//
//	{"mcnemar": [{"b": 3, "c": 9}, ...],
//	 "bootstrap": [{"kind": "regression"|"accuracy", "metric": "mse",
//	                "truth": [...], "candidate": [...], "baseline": [...],
//	                "resamples": 2000, "seed": 1, "level": 0.95,
//	                "indices": true}, ...]}
//
// For kind "accuracy", candidate and baseline are each row's correctness
// (0 or 1) and truth is unused. Output: for each McNemar case the exact,
// chi-square and automatic forms (stats.McNemarTest, stats.McNemarAuto);
// for each bootstrap case the interval (evaluate.RegressionDifferenceInterval
// or evaluate.AccuracyDifferenceInterval) and, with "indices", every
// resample's row indices as stats.Resamples draws them for the same
// (rows, resamples, seed).
//
// Exit status 1 with the error on stderr when an input is invalid.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"

	"github.com/kilnml/kiln/core/evaluate"
	"github.com/kilnml/kiln/core/evaluate/stats"
)

type input struct {
	McNemar   []struct{ B, C int } `json:"mcnemar"`
	Bootstrap []struct {
		Kind      string    `json:"kind"`
		Metric    string    `json:"metric"`
		Truth     []float64 `json:"truth"`
		Candidate []float64 `json:"candidate"`
		Baseline  []float64 `json:"baseline"`
		Resamples int       `json:"resamples"`
		Seed      uint64    `json:"seed"`
		Level     float64   `json:"level"`
		Indices   bool      `json:"indices"`
	} `json:"bootstrap"`
}

type mcnemarOut struct {
	Exact stats.McNemar `json:"exact"`
	Chi2  stats.McNemar `json:"chi2"`
	Auto  stats.McNemar `json:"auto"`
}

type bootstrapOut struct {
	Interval stats.Interval `json:"interval"`
	Indices  [][]int        `json:"indices,omitempty"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "statscheck:", err)
		os.Exit(1)
	}
}

func run() error {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		return err
	}
	ctx := context.Background()
	var out struct {
		McNemar   []mcnemarOut   `json:"mcnemar"`
		Bootstrap []bootstrapOut `json:"bootstrap"`
	}
	for _, m := range in.McNemar {
		var r mcnemarOut
		var err error
		if r.Exact, err = stats.McNemarTest(m.B, m.C, true); err != nil {
			return err
		}
		if r.Chi2, err = stats.McNemarTest(m.B, m.C, false); err != nil {
			return err
		}
		if r.Auto, err = stats.McNemarAuto(m.B, m.C); err != nil {
			return err
		}
		out.McNemar = append(out.McNemar, r)
	}
	for _, b := range in.Bootstrap {
		var r bootstrapOut
		var err error
		switch b.Kind {
		case "accuracy":
			c, bl := make([]bool, len(b.Candidate)), make([]bool, len(b.Baseline))
			for i, v := range b.Candidate {
				c[i] = v != 0
			}
			for i, v := range b.Baseline {
				bl[i] = v != 0
			}
			r.Interval, err = evaluate.AccuracyDifferenceInterval(ctx, c, bl, b.Resamples, b.Seed, b.Level, nil)
		case "regression":
			r.Interval, err = evaluate.RegressionDifferenceInterval(ctx, b.Metric, b.Truth, b.Candidate, b.Baseline, b.Resamples, b.Seed, b.Level, nil)
		default:
			err = fmt.Errorf("bootstrap kind %q (want accuracy or regression)", b.Kind)
		}
		if err != nil {
			return err
		}
		if b.Indices {
			err = stats.Resamples(ctx, r.Interval.Rows, b.Resamples, b.Seed, func(_ int, idx []int) error {
				r.Indices = append(r.Indices, slices.Clone(idx))
				return nil
			})
			if err != nil {
				return err
			}
		}
		out.Bootstrap = append(out.Bootstrap, r)
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}
