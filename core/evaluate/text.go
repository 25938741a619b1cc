package evaluate

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
)

// WriteText writes the evidence as a side-by-side table (metrics, latency,
// size of candidate and baseline, and their difference), the test, and the
// verdict with its reason.
func (ev *Evidence) WriteText(w io.Writer) error {
	fmt.Fprintf(w, "data       %s (%d rows, sha256 %.12s), target %q, %s\n", ev.Data.Source, ev.Data.Rows, ev.Data.SHA256, ev.Target, ev.Task)
	fmt.Fprintf(w, "candidate  %s\nbaseline   %s\n\n", ev.Candidate.Ref, ev.Baseline.Ref)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\tcandidate\tbaseline\tdifference\t")
	names := make([]string, 0, len(ev.Baseline.Metrics))
	for k := range ev.Baseline.Metrics {
		if _, ok := ev.Candidate.Metrics[k]; ok {
			names = append(names, k)
		}
	}
	slices.Sort(names)
	if i := slices.Index(names, ev.Metric); i > 0 { // the gate's metric first
		names = slices.Insert(slices.Delete(names, i, i+1), 0, ev.Metric)
	}
	for _, k := range names {
		c, b := ev.Candidate.Metrics[k], ev.Baseline.Metrics[k]
		mark := ""
		if k == ev.Metric {
			mark = " *"
		}
		fmt.Fprintf(tw, "%s%s\t%.4f\t%.4f\t%+.4f\t\n", k, mark, c, b, c-b)
	}
	lc, lb := ev.Candidate.Latency, ev.Baseline.Latency
	fmt.Fprintf(tw, "latency p50 ms (batch %d)\t%.3f\t%.3f\t×%.2f\t\n", lc.BatchSize, lc.P50Ms, lb.P50Ms, ev.Budgets.LatencyRatio)
	fmt.Fprintf(tw, "latency p95 ms\t%.3f\t%.3f\t×%.2f\t\n", lc.P95Ms, lb.P95Ms, ratio(lc.P95Ms, lb.P95Ms))
	fmt.Fprintf(tw, "model.pt bytes\t%d\t%d\t×%.2f\t\n", ev.Candidate.ModelBytes, ev.Baseline.ModelBytes, ev.Budgets.SizeRatio)
	fmt.Fprintf(tw, "parameters\t%d\t%d\t%+d\t\n", ev.Candidate.Parameters, ev.Baseline.Parameters, ev.Candidate.Parameters-ev.Baseline.Parameters)
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "(* the gate's metric; latency: %d timed calls per model, alternating on the same batches, %d intra-op threads)\n\n", lc.Calls, ev.Threads)
	if ev.McNemar != nil {
		m := ev.McNemar
		form := "chi-square, continuity-corrected"
		if m.Exact {
			form = "exact binomial"
		}
		fmt.Fprintf(w, "McNemar    %s: b=%d (baseline right, candidate wrong), c=%d (candidate right, baseline wrong), statistic %.4g, p=%.4g\n",
			form, m.B, m.C, m.Statistic, m.PValue)
	}
	if ev.Interval != nil {
		fmt.Fprintf(w, "bootstrap  %s difference %+.4g, %s\n", ev.Metric, ev.Interval.Estimate, ev.Interval)
	}
	for _, s := range ev.Warnings {
		fmt.Fprintf(w, "warning    %s\n", s)
	}
	_, err := fmt.Fprintf(w, "verdict    %s: %s\n", ev.Verdict, strings.TrimSpace(ev.Reason))
	return err
}
