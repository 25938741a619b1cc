package evaluate

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/kilnml/kiln/core/evaluate/stats"
)

// TestDecide walks the rule's edges with crafted evidence (d is the
// improvement, m the margin).
func TestDecide(t *testing.T) {
	mk := func(d float64, significant bool, m float64, b Budgets) *Evidence {
		return &Evidence{
			Metric: "accuracy", Improvement: d, Significant: significant, MinMargin: m, Alpha: 0.05, Budgets: b,
			McNemar:   &stats.McNemar{B: 3, C: 20, Exact: true, PValue: 0.01},
			Candidate: ModelResult{Metrics: map[string]float64{"accuracy": 0.9}},
			Baseline:  ModelResult{Metrics: map[string]float64{"accuracy": 0.9 - d}},
		}
	}
	for _, tc := range []struct {
		name        string
		d           float64
		significant bool
		m           float64
		b           Budgets
		want        Verdict
		reason      string
	}{
		{"significantly worse, within the margin", -0.01, true, 0.05, Budgets{}, Reject, "significantly worse"},
		{"worse by more than the margin, not significant", -0.06, false, 0.05, Budgets{}, Reject, "worse by more than the margin"},
		{"worse within the margin, not significant", -0.04, false, 0.05, Budgets{}, Hold, "no significant difference"},
		{"worse at all with margin 0", -0.001, false, 0, Budgets{}, Reject, "worse by more than the margin"},
		{"tie", 0, false, 0, Budgets{}, Hold, "no significant difference"},
		{"better, not significant", 0.1, false, 0.05, Budgets{}, Hold, "no significant difference"},
		{"significantly better, below the margin", 0.04, true, 0.05, Budgets{}, Hold, "below the margin"},
		{"significantly better, at the margin", 0.05, true, 0.05, Budgets{}, Promote, "at least the margin"},
		{"significantly better, margin 0", 0.001, true, 0, Budgets{}, Promote, "at least the margin"},
		{"over the latency budget", 0.1, true, 0, Budgets{MaxLatencyRatio: 1.5, LatencyRatio: 1.6}, Hold, "latency budget"},
		{"within the latency budget", 0.1, true, 0, Budgets{MaxLatencyRatio: 1.5, LatencyRatio: 1.4, SizeRatio: 9}, Promote, "at least the margin"},
		{"over the size budget", 0.1, true, 0, Budgets{MaxSizeRatio: 2, SizeRatio: 2.5}, Hold, "size budget"},
		{"budgets do not save a worse model", -0.1, true, 0, Budgets{MaxSizeRatio: 2, SizeRatio: 0.5}, Reject, "significantly worse"},
	} {
		v, reason := decide(mk(tc.d, tc.significant, tc.m, tc.b))
		assert.Equal(t, tc.want, v, tc.name)
		assert.Contains(t, reason, tc.reason, tc.name)
		assert.Contains(t, reason, "McNemar exact binomial p=0.01 (b=3, c=20)", tc.name)
	}
}
