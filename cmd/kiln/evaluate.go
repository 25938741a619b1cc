package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/evaluate"
)

type evaluateOptions struct {
	candidate, baseline, data, target, metric, report string
	minMargin, alpha, maxLatencyRatio, maxSizeRatio   float64
	bootstrap, batchSize                              int
	seed                                              uint64
	jsonOut, quiet                                    bool
}

func newEvaluateCmd() *cobra.Command {
	var o evaluateOptions
	cmd := &cobra.Command{
		Use:   "evaluate --candidate MODEL --baseline MODEL --data HOLDOUT",
		Short: "Score a candidate model against a baseline on the same holdout rows and decide PROMOTE, HOLD or REJECT",
		Long: `Scores two Kiln model packages on every row of a holdout table (CSV, Arrow
IPC or Parquet, read as kiln train reads it) in one job: task metrics
(classification: accuracy, macro F1, macro precision and recall, log-loss;
regression: MSE, MAE, R²), forward latency per batch (p50/p95, both models
timed in alternation on the same batches), size (model.pt bytes,
parameters). A paired test decides significance: McNemar's test on the
per-row correct/incorrect pairs for classifiers (exact binomial when the
discordant pairs b+c < 25, chi-square with continuity correction
otherwise, as statsmodels' mcnemar), a paired percentile bootstrap interval
of the metric's difference for regressors (--bootstrap resamples, --seed).

Verdict (improvement d = candidate better by, in the metric's units):
  REJECT   significantly worse, or d < -min-margin
  PROMOTE  significantly better and d >= min-margin, within the budgets
           (--max-latency-ratio, --max-size-ratio; over one: HOLD)
  HOLD     otherwise

Before any model runs, both packages, the data's columns (each model's raw
input columns and the target) and the target's values are checked, and
both models loaded; a problem is an error naming what is wrong.

Exit status: 0 for every verdict (read it from the output or --json); 1
for an error. The JSON (--json on stdout, --report FILE) is the evidence
record (core/evaluate.Evidence) a registry stores with the verdict.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runEvaluate(ctx, cmd.OutOrStdout(), cmd.ErrOrStderr(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.candidate, "candidate", "", "candidate model: a Kiln model package directory (required)")
	f.StringVar(&o.baseline, "baseline", "", "baseline model: a Kiln model package directory (required)")
	f.StringVar(&o.data, "data", "", "holdout rows: CSV with a header row, Arrow IPC or Parquet (required)")
	f.StringVar(&o.target, "target", "", "target column (default: the one both manifests record)")
	f.StringVar(&o.metric, "metric", "", "the metric the verdict rests on: accuracy (classification); mse (default), mae or r2 (regression)")
	f.Float64Var(&o.minMargin, "min-margin", 0, "smallest improvement that promotes, in the metric's units (e.g. 0.01 = one accuracy point)")
	f.Float64Var(&o.alpha, "alpha", evaluate.DefaultAlpha, "significance level; the bootstrap interval's level is 1-alpha")
	f.IntVar(&o.bootstrap, "bootstrap", evaluate.DefaultResamples, "bootstrap resamples B")
	f.Uint64Var(&o.seed, "seed", 1, "seed of the bootstrap's resampling")
	f.IntVar(&o.batchSize, "batch-size", evaluate.DefaultBatchSize, "rows per forward call")
	f.Float64Var(&o.maxLatencyRatio, "max-latency-ratio", 0, "hold a better candidate whose median batch latency exceeds the baseline's times this (0: no budget)")
	f.Float64Var(&o.maxSizeRatio, "max-size-ratio", 0, "hold a better candidate whose model.pt exceeds the baseline's size times this (0: no budget)")
	f.BoolVar(&o.jsonOut, "json", false, "print the evidence as JSON instead of the table")
	f.StringVar(&o.report, "report", "", "also write the evidence as JSON to this file")
	f.BoolVarP(&o.quiet, "quiet", "q", false, "no progress on stderr")
	cmd.MarkFlagRequired("candidate")
	cmd.MarkFlagRequired("baseline")
	cmd.MarkFlagRequired("data")
	return cmd
}

// resolveModel turns a model reference given on the command line into the
// package directory it names. Today a reference is a path (a package
// directory, or its model.pt or manifest.json); registry references
// (models:/NAME/ALIAS) resolve here once the registry exists. A missing
// path is NotFound.
func resolveModel(ref string) (string, error) {
	if ref == "" {
		return "", core.Errorf(core.InvalidArgument, "kiln: evaluate: empty model reference")
	}
	if _, err := os.Stat(ref); err != nil {
		return "", core.Errorf(core.NotFound, "kiln: evaluate: model %q: no such model package (%v)", ref, err)
	}
	return filepath.Clean(ref), nil
}

func runEvaluate(ctx context.Context, stdout, stderr io.Writer, o evaluateOptions) error {
	if o.bootstrap < 1 {
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: --bootstrap %d must be >= 1", o.bootstrap)
	}
	if !(o.alpha > 0 && o.alpha < 1) {
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: --alpha %v is outside (0, 1)", o.alpha)
	}
	if o.batchSize < 1 {
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: --batch-size %d must be >= 1", o.batchSize)
	}
	var pkgs [2]*evaluate.Package
	for i, ref := range []string{o.candidate, o.baseline} {
		role := [2]string{"candidate", "baseline"}[i]
		dir, err := resolveModel(ref)
		if err != nil {
			return fmt.Errorf("%s: %w", role, err)
		}
		if pkgs[i], err = evaluate.OpenPackage(role, ref, dir); err != nil {
			return err
		}
	}
	if _, err := os.Stat(o.data); err != nil {
		return core.Errorf(core.NotFound, "kiln: evaluate: data %s: %v", o.data, err)
	}
	tb, err := loadTable(o.data)
	if err != nil {
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: data %s: %v", o.data, err)
	}
	opts := evaluate.Options{
		Target: o.target, Metric: o.metric, MinMargin: o.minMargin, Alpha: o.alpha,
		Resamples: o.bootstrap, Seed: o.seed, BatchSize: o.batchSize,
		MaxLatencyRatio: o.maxLatencyRatio, MaxSizeRatio: o.maxSizeRatio, Source: o.data,
	}
	if !o.quiet {
		last := ""
		opts.Progress = func(p evaluate.Progress) {
			if p.Done == p.Total && p.Stage != last {
				last = p.Stage
				fmt.Fprintf(stderr, "evaluate: %s done (%d/%d)\n", p.Stage, p.Done, p.Total)
			}
		}
	}
	job, err := evaluate.Prepare(pkgs[0], pkgs[1], tb, opts)
	if err != nil {
		return err
	}
	defer job.Close()
	ev, err := job.Run(ctx)
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(ev, "", "  ")
	if err != nil {
		return fmt.Errorf("kiln: evaluate: %w", err)
	}
	b = append(b, '\n')
	if o.report != "" {
		if err := os.WriteFile(o.report, b, 0o644); err != nil {
			return fmt.Errorf("kiln: evaluate: --report: %w", err)
		}
	}
	if o.jsonOut {
		_, err = stdout.Write(b)
		return err
	}
	return ev.WriteText(stdout)
}
