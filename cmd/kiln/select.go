package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/registry/runlog"
)

type selectOptions struct {
	spec, data, target, out string
	register                string
	reg                     registryFlags
	epochs, concurrency     int
	seconds                 float64
	quiet, jsonOut          bool
}

func newSelectCmd() *cobra.Command {
	var o selectOptions
	cmd := &cobra.Command{
		Use:   "select --spec SELECT.yaml --data DATA.csv --target COL [--out DIR]",
		Short: "Train candidate networks within a budget and rank them",
		Long: `Reads a selection spec (YAML or JSON: data, split, train, candidates and/or
search {depth, width, lr, dropout}, budget {epochs, seconds}, rank {metric,
params_penalty, latency_penalty}, concurrency; see core/train.SelectJob),
trains every candidate on the same split, measures single-sample latency,
and prints the leaderboard, best first. With --out the winner is saved as
a Kiln model package.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runSelect(ctx, cmd.OutOrStdout(), cmd.ErrOrStderr(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.spec, "spec", "", "selection spec, YAML or JSON (required)")
	f.StringVar(&o.data, "data", "", "CSV file with a header row (required)")
	f.StringVar(&o.target, "target", "", "column to predict (overrides the spec's data.target)")
	f.StringVar(&o.out, "out", "", "save the winner as a model package here")
	f.IntVar(&o.epochs, "budget-epochs", 0, "epochs per candidate (overrides the spec)")
	f.Float64Var(&o.seconds, "budget-seconds", 0, "seconds per candidate (overrides the spec)")
	f.IntVar(&o.concurrency, "concurrency", 0, "candidates trained at once (default: CPUs)")
	f.BoolVarP(&o.quiet, "quiet", "q", false, "no progress lines")
	f.BoolVar(&o.jsonOut, "json", false, "print the leaderboard as JSON")
	f.StringVar(&o.register, "register", "", "register the winner (needs --out) as a new version of this model in the registry")
	o.reg.addTo(f)
	cmd.MarkFlagRequired("spec")
	cmd.MarkFlagRequired("data")
	return cmd
}

func runSelect(ctx context.Context, stdout, stderr io.Writer, o selectOptions) error {
	raw, err := os.ReadFile(o.spec)
	if err != nil {
		return fmt.Errorf("kiln: select: %w", err)
	}
	job, err := train.ParseSelectJob(raw)
	if err != nil {
		return fmt.Errorf("%w (in %s)", err, o.spec)
	}
	if o.target != "" {
		job.Data.Target = o.target
	}
	if o.epochs > 0 {
		job.Budget.Epochs = o.epochs
	}
	if o.seconds > 0 {
		job.Budget.Seconds = o.seconds
	}
	if o.concurrency > 0 {
		job.Concurrency = o.concurrency
	}
	if o.register != "" && o.out == "" {
		return fmt.Errorf("kiln: select: --register needs --out (the winner's package is what is registered)")
	}
	tb, err := loadTable(o.data)
	if err != nil {
		return err
	}
	params := runlog.SelectParams(job, map[string]string{"data": o.data, "spec": o.spec})
	tr, err := startRun(ctx, o.reg, o.register, runlog.KindSelect, params)
	if err != nil {
		return err
	}
	defer tr.Close()
	var mu sync.Mutex
	progress := func(name string, e train.Event) {
		if e.Kind == "epoch" {
			mu.Lock()
			tr.Epoch(e.Epoch, runlog.SelectEpoch(name, e))
			mu.Unlock()
		}
		if o.quiet || e.Kind != "done" {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(stderr, "%-28s %d epochs  val %s\n", name, e.Epoch, formatMetrics(e.Metrics))
	}
	lb, err := train.Select(ctx, job, tb, o.data, o.out, progress)
	var final map[string]float64
	var version *registry.Version
	if err == nil && lb.Winner != nil {
		var winner map[string]string
		final, winner = runlog.SelectFinal(lb)
		if perr := tr.LogParams(ctx, winner); perr != nil {
			err = perr
		}
		if err == nil && o.register != "" {
			v, rerr := tr.Register(ctx, o.register, o.out, nil)
			err, version = rerr, &v
		}
	}
	if ferr := tr.Finish(err, final); err == nil {
		err = ferr
	}
	if err != nil {
		return err
	}
	if o.jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(lb)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "rank\tcandidate\tval %s\tparams\tlatency ms\tscore\tepochs\tseconds\terror\n", lb.Metric)
	for _, e := range lb.Entries {
		fmt.Fprintf(tw, "%d\t%s\t%.4f\t%d\t%.3f\t%.4f\t%d\t%.1f\t%s\n",
			e.Rank, e.Name, e.Metric, e.Params, e.LatencyMs, e.Score, e.Epochs, e.Seconds, e.Err)
	}
	tw.Flush()
	fmt.Fprintf(stdout, "winner: %s (lr %g)\n", lb.Winner.Name, lb.Winner.LR)
	if o.out != "" {
		fmt.Fprintf(stdout, "saved:  %s (model.pt, manifest.json)\n", o.out)
	}
	if tr != nil {
		fmt.Fprintf(stdout, "run:    %s\n", tr.ID())
	}
	if version != nil {
		fmt.Fprintf(stdout, "registered: %s (sha256:%s)\n", version.Ref(), version.Digest)
	}
	return nil
}
