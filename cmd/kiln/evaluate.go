package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/evaluate"
	"github.com/kilnml/kiln/registry"
)

type evaluateOptions struct {
	candidate, baseline, data, target, metric, report string
	minMargin, alpha, maxLatencyRatio, maxSizeRatio   float64
	bootstrap, batchSize                              int
	seed                                              uint64
	jsonOut, quiet, promote                           bool
	reg                                               registryFlags
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

Models are package directories or registry references (models:/NAME/VERSION,
models:/NAME@ALIAS, models:/NAME/latest; --registry), fetched with their
digest verified. When the candidate is a registry version, the verdict and
its evidence are recorded with it (kiln registry show lists them); with
--promote, a PROMOTE moves the baseline's alias to the candidate by
compare-and-swap (it fails, changing nothing, when someone moved the alias
since the evaluation began), and HOLD or REJECT leave it where it is.

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
	f.BoolVar(&o.promote, "promote", false, "on PROMOTE, move the baseline's alias (--baseline models:/NAME@ALIAS) to the candidate (models:/NAME/VERSION of the same model) by compare-and-swap, citing the recorded evaluation")
	o.reg.addTo(f)
	cmd.MarkFlagRequired("candidate")
	cmd.MarkFlagRequired("baseline")
	cmd.MarkFlagRequired("data")
	return cmd
}

// evalModels resolves the command line's model references: package paths
// as they are, registry references (models:/...) fetched from the
// registry (opened on first need) into temporary directories that cleanup
// removes. A missing path is NotFound.
type evalModels struct {
	o       evaluateOptions
	reg     *registry.Registry
	dirs    [2]string
	refs    [2]*registry.Ref // the registry versions, when references
	aliases [2]string        // the alias a reference named, if any
	tmp     []string
}

func (m *evalModels) resolve(ctx context.Context, i int, ref string) error {
	if ref == "" {
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: empty model reference")
	}
	if !strings.HasPrefix(ref, registry.URIScheme) {
		if _, err := os.Stat(ref); err != nil {
			return core.Errorf(core.NotFound, "kiln: evaluate: model %q: no such model package (%v)", ref, err)
		}
		m.dirs[i] = filepath.Clean(ref)
		return nil
	}
	_, _, alias, err := registry.ParseURI(ref)
	if err != nil {
		return err
	}
	if m.reg == nil {
		if m.reg, err = m.o.reg.open(ctx); err != nil {
			return err
		}
	}
	v, err := m.reg.Resolve(ctx, ref)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "kiln-evaluate-")
	if err != nil {
		return err
	}
	m.tmp = append(m.tmp, tmp)
	dir := filepath.Join(tmp, "pkg")
	if _, err := m.reg.Fetch(ctx, v.Ref(), dir); err != nil {
		return err
	}
	r := v.Ref()
	m.dirs[i], m.refs[i] = dir, &r
	if alias != "latest" {
		m.aliases[i] = alias
	}
	return nil
}

func (m *evalModels) close() {
	for _, t := range m.tmp {
		os.RemoveAll(t)
	}
	if m.reg != nil {
		m.reg.Close()
	}
}

// checkPromote says why --promote cannot work with these references.
func (m *evalModels) checkPromote() error {
	c, b := m.refs[0], m.refs[1]
	switch {
	case c == nil:
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: --promote needs a registered candidate (models:/NAME/VERSION)")
	case b == nil || m.aliases[1] == "":
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: --promote needs the baseline as an alias (models:/NAME@ALIAS)")
	case c.Model != b.Model:
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: --promote: candidate %s and baseline %s are versions of different models", c, b)
	}
	return nil
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
	models := &evalModels{o: o}
	defer models.close()
	var pkgs [2]*evaluate.Package
	for i, ref := range []string{o.candidate, o.baseline} {
		role := [2]string{"candidate", "baseline"}[i]
		if err := models.resolve(ctx, i, ref); err != nil {
			return fmt.Errorf("%s: %w", role, err)
		}
		var err error
		if pkgs[i], err = evaluate.OpenPackage(role, ref, models.dirs[i]); err != nil {
			return err
		}
	}
	if o.promote {
		if err := models.checkPromote(); err != nil {
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
	decision, err := models.record(ctx, ev, b)
	if err != nil {
		return err
	}
	if o.jsonOut {
		_, err = stdout.Write(b)
		return err
	}
	if err := ev.WriteText(stdout); err != nil {
		return err
	}
	if decision != "" {
		_, err = fmt.Fprintln(stdout, decision)
	}
	return err
}

// record stores the verdict with a registered candidate and, with
// --promote and a PROMOTE, moves the baseline's alias to the candidate by
// compare-and-swap (expecting the version evaluated as the baseline). It
// returns what it did, in words ("" when the candidate is not registered).
func (m *evalModels) record(ctx context.Context, ev *evaluate.Evidence, evidence []byte) (string, error) {
	c := m.refs[0]
	if c == nil {
		return "", nil
	}
	actor := m.o.reg.who()
	e, err := m.reg.RecordEvaluation(ctx, registry.Evaluation{Model: c.Model, Version: c.Version,
		Verdict: string(ev.Verdict), Evidence: evidence, CreatedBy: actor})
	if err != nil {
		return "", fmt.Errorf("kiln: evaluate: record the verdict: %w", err)
	}
	said := fmt.Sprintf("recorded   evaluation %d of %s: %s", e.ID, c, ev.Verdict)
	if !m.o.promote {
		return said, nil
	}
	b, alias := m.refs[1], m.aliases[1]
	if ev.Verdict != evaluate.Promote {
		return said + fmt.Sprintf("\nalias      %s@%s stays at version %d", b.Model, alias, b.Version), nil
	}
	if _, err := m.reg.CompareAndSwap(ctx, registry.Move{Model: c.Model, Alias: alias, Expected: b.Version, To: c.Version,
		Actor: actor, Reason: "kiln evaluate: " + ev.Reason, Verdict: string(ev.Verdict), EvaluationID: e.ID}); err != nil {
		return "", fmt.Errorf("kiln: evaluate: promote %s to %s@%s: %w", c, c.Model, alias, err)
	}
	return said + fmt.Sprintf("\npromoted   %s@%s: version %d -> %d", c.Model, alias, b.Version, c.Version), nil
}
