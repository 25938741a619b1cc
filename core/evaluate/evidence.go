// Package evaluate is Kiln's evaluation gate: it scores a candidate model
// package and a baseline on the same rows of a holdout table in one job
// (task metrics, forward latency on the same batches, size), tests the
// difference with a paired test (McNemar's test on classification
// accuracy, a paired percentile bootstrap interval on a regression
// metric; see core/evaluate/stats), and decides PROMOTE, HOLD or REJECT
// under a minimum margin, a significance level and optional latency and
// size budgets. Everything the decision rests on is returned as Evidence,
// a JSON-serialisable record that a model registry can store with the
// verdict.
//
// The package sits in the core layer: it imports core, core/data,
// core/modelpkg and core/train (whose ClassMetrics and RegressionMetrics
// compute the task metrics). Reading the table (CSV, Arrow IPC, Parquet)
// is the caller's: `kiln evaluate` reads it as `kiln train` does.
package evaluate

import (
	"time"

	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/evaluate/stats"
)

// Verdict is the gate's decision about the candidate.
type Verdict string

// Verdicts.
const (
	// Promote: the candidate is better than the baseline by at least the
	// minimum margin, significantly, and within the budgets.
	Promote Verdict = "PROMOTE"
	// Hold: neither promote nor reject (no significant difference, an
	// improvement below the margin, or a budget exceeded).
	Hold Verdict = "HOLD"
	// Reject: the candidate is significantly worse, or worse by more than
	// the margin.
	Reject Verdict = "REJECT"
)

// Evidence is everything an evaluation measured and decided, as JSON (the
// record a registry stores with the verdict). Metric values are in the
// metric's own units (accuracy a fraction, MSE in squared target units);
// times are milliseconds; sizes bytes.
type Evidence struct {
	// Verdict and Reason (the rule that decided, in words, with the
	// figures it compared).
	Verdict Verdict `json:"verdict"`
	Reason  string  `json:"reason"`
	// Task is classification or regression; Target the target column.
	Task   data.Task `json:"task"`
	Target string    `json:"target"`
	// Data is the holdout table both models were scored on.
	Data DataInfo `json:"data"`
	// Metric is the metric the verdict rests on (accuracy for
	// classification; mse, mae or r2 for regression) and HigherIsBetter
	// its direction.
	Metric         string `json:"metric"`
	HigherIsBetter bool   `json:"higher_is_better"`
	// Difference is the candidate's Metric minus the baseline's;
	// Improvement is the same difference signed so that positive means
	// the candidate is better (Difference for accuracy and r2, minus
	// Difference for mse and mae).
	Difference  float64 `json:"difference"`
	Improvement float64 `json:"improvement"`
	// Test names the paired test that decided significance:
	// "mcnemar-exact", "mcnemar-chi2-corrected" or "paired-bootstrap".
	Test string `json:"test"`
	// Significant reports whether the test rejected equality at Alpha
	// (McNemar: p < Alpha; bootstrap: the 1-Alpha interval of the
	// difference excludes 0).
	Significant bool `json:"significant"`
	// MinMargin is the smallest Improvement that promotes (in Metric's
	// units) and Alpha the significance level.
	MinMargin float64 `json:"min_margin"`
	Alpha     float64 `json:"alpha"`
	// McNemar is McNemar's test on the per-row correct/incorrect pairs
	// (classification only): B baseline right and candidate wrong, C the
	// reverse; exact binomial when B+C < 25, chi-square with continuity
	// correction otherwise (stats.McNemarAuto).
	McNemar *stats.McNemar `json:"mcnemar,omitempty"`
	// Interval is the paired percentile bootstrap interval of Difference
	// at level 1-Alpha (for classification, of the accuracy difference,
	// reported beside McNemar's test; for regression, the test itself).
	Interval *stats.Interval `json:"interval,omitempty"`
	// Candidate and Baseline are each model's figures.
	Candidate ModelResult `json:"candidate"`
	Baseline  ModelResult `json:"baseline"`
	// Budgets are the latency and size limits and the ratios measured.
	Budgets Budgets `json:"budgets"`
	// Warnings are things the reader should know (e.g. the data is a
	// model's training data).
	Warnings []string `json:"warnings,omitempty"`
	// Threads is libtorch's intra-op thread count during the timings.
	Threads int `json:"threads"`
	// KilnVersion and TorchVersion are core.Version and
	// core.TorchVersion(); Created is when the evaluation finished (UTC)
	// and DurationMs how long it took.
	KilnVersion  string    `json:"kiln_version"`
	TorchVersion string    `json:"torch_version"`
	Created      time.Time `json:"created"`
	DurationMs   float64   `json:"duration_ms"`
}

// DataInfo identifies the holdout table.
type DataInfo struct {
	// Source is where it was read from (a path), SHA256 the table's
	// fingerprint (data.Table.Fingerprint), Rows its row count (every row
	// is scored).
	Source string `json:"source,omitempty"`
	SHA256 string `json:"sha256"`
	Rows   int    `json:"rows"`
}

// ModelResult is one model's figures on the holdout rows.
type ModelResult struct {
	// Ref is the reference given, Dir the package directory, Name the
	// manifest's model name.
	Ref  string `json:"ref"`
	Dir  string `json:"dir"`
	Name string `json:"name,omitempty"`
	// Metrics: classification: accuracy, f1_macro (macro-averaged F1 over
	// the classes, both classes for a binary model), precision_macro,
	// recall_macro, and log_loss (mean negative natural log of the
	// probability of the true class, from softmax/sigmoid of the logits)
	// when the output is logits. Regression: mse, mae, r2.
	Metrics map[string]float64 `json:"metrics"`
	// Latency is the forward time per batch.
	Latency Latency `json:"latency"`
	// ModelBytes is model.pt's size and PackageBytes model.pt plus
	// manifest.json; Parameters the parameter elements of the loaded
	// module (core.Module.NumParameters).
	ModelBytes   int64 `json:"model_bytes"`
	PackageBytes int64 `json:"package_bytes"`
	Parameters   int64 `json:"parameters"`
}

// Latency summarizes the timed forward calls of one model. Both models
// run on the same batches, in alternation (the order swapped from batch to
// batch), each call timed alone (wall clock, milliseconds).
type Latency struct {
	// BatchSize is the rows per batch (the last batch of a pass may be
	// smaller); Calls the number of timed calls.
	BatchSize int `json:"batch_size"`
	Calls     int `json:"calls"`
	// P50Ms and P95Ms are the median and 95th percentile (stats.Quantile,
	// linear interpolation) of the call times; MeanMs their mean.
	P50Ms  float64 `json:"p50_ms"`
	P95Ms  float64 `json:"p95_ms"`
	MeanMs float64 `json:"mean_ms"`
}

// Budgets are the limits that turn a PROMOTE into a HOLD, and what was
// measured against them. A zero limit is no limit.
type Budgets struct {
	// MaxLatencyRatio limits LatencyRatio, the candidate's median batch
	// latency over the baseline's.
	MaxLatencyRatio float64 `json:"max_latency_ratio,omitempty"`
	LatencyRatio    float64 `json:"latency_ratio"`
	// MaxSizeRatio limits SizeRatio, the candidate's model.pt bytes over
	// the baseline's.
	MaxSizeRatio float64 `json:"max_size_ratio,omitempty"`
	SizeRatio    float64 `json:"size_ratio"`
}
