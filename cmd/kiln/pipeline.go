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

	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/pipeline"
)

type pipelineOptions struct {
	reg       registryFlags
	runsDir   string
	resume    string
	jsonOut   bool
	authToken string
}

func newPipelineCmd() *cobra.Command {
	var o pipelineOptions
	cmd := &cobra.Command{
		Use:   "pipeline",
		Short: "Run the model lifecycle from a pipeline file: data, preprocess, train/select, optimize, evaluate, register, promote",
	}
	cmd.PersistentFlags().StringVar(&o.runsDir, "runs-dir", "", "directory of the pipeline runs (default $KILN_HOME/pipelines)")
	o.reg.addTo(cmd.PersistentFlags())

	run := &cobra.Command{
		Use:   "run PIPELINE.yaml [--resume RUN_ID]",
		Short: "Run a pipeline (or resume an interrupted run)",
		Long: `Checks the pipeline file (unknown stages and keys, missing fields, the data's
columns against the target, the features and the model the alias names)
before any work, records a registry run of kind "pipeline" and runs the
stages in order: data (copied into the run directory and fingerprinted),
preprocess (the holdout kept out, the preprocessing fitted), train (one
network, or a selection among the candidates), optimize (the smallest
variant within max_accuracy_drop), evaluate (against NAME@production on the
holdout; the first model is promoted without a comparison), register (the
trained version and the optimized variant, its parent the trained one, with
the verdict) and promote (a compare-and-swap of the alias on PROMOTE).

Each finished stage is checkpointed in RUNS_DIR/RUN_ID. A run that was
interrupted (kill -9, a crash) continues from its first unfinished stage
with --resume RUN_ID (the id is printed when the run starts, and listed by
kiln registry runs --model NAME, kind pipeline); a resume never runs automatically.
Progress is logged per stage and per epoch on stderr; the result goes to
stdout.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runPipeline(ctx, cmd.OutOrStdout(), cmd.ErrOrStderr(), args[0], o)
		},
	}
	run.Flags().StringVar(&o.resume, "resume", "", "continue the interrupted run RUN_ID of this pipeline file from its first unfinished stage")
	run.Flags().BoolVar(&o.jsonOut, "json", false, "print the result as JSON")
	run.Flags().StringVar(&o.authToken, "flight-token", "", "bearer token for a data.flight server (default $KILN_AUTH_TOKEN)")

	status := &cobra.Command{
		Use:   "status RUN_ID",
		Short: "Show a pipeline run: each stage's status, duration, summary and error",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return pipelineStatus(cmd.Context(), cmd.OutOrStdout(), args[0], o)
		},
	}
	status.Flags().BoolVar(&o.jsonOut, "json", false, "print the state as JSON")
	cmd.AddCommand(run, status)
	return cmd
}

// runsDir is --runs-dir, else $KILN_HOME/pipelines.
func (o pipelineOptions) dir() (string, error) {
	if o.runsDir != "" {
		return o.runsDir, nil
	}
	vars, err := kilnenv.Load(os.Getenv)
	if err != nil {
		return "", err
	}
	home, err := vars.DataDir()
	if err != nil {
		return "", fmt.Errorf("kiln: pipeline: %w", err)
	}
	return filepath.Join(home, "pipelines"), nil
}

func runPipeline(ctx context.Context, stdout, stderr io.Writer, file string, o pipelineOptions) error {
	raw, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("kiln: pipeline: %w", err)
	}
	dir, err := o.dir()
	if err != nil {
		return err
	}
	token := o.authToken
	if token == "" {
		if vars, err := kilnenv.Load(os.Getenv); err == nil {
			token = vars.AuthToken
		}
	}
	reg, err := o.reg.open(ctx)
	if err != nil {
		return err
	}
	defer reg.Close()
	abs, _ := filepath.Abs(file)
	opts := pipeline.Options{RunsDir: dir, Registry: reg, Actor: o.reg.who(), BaseDir: filepath.Dir(abs), FlightToken: token}
	var run *pipeline.Run
	if o.resume != "" {
		run, err = pipeline.Resume(ctx, o.resume, raw, opts)
	} else {
		run, err = pipeline.Start(ctx, raw, file, opts)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "pipeline run %s (%s; resume with: kiln pipeline run %s --resume %s)\n", run.ID(), run.Dir(), file, run.ID())
	res, err := run.Execute(ctx)
	if err != nil {
		return err
	}
	if o.jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	st, err := pipeline.ReadState(dir, run.ID())
	if err != nil {
		return err
	}
	return st.WriteText(stdout, false)
}

func pipelineStatus(ctx context.Context, stdout io.Writer, id string, o pipelineOptions) error {
	dir, err := o.dir()
	if err != nil {
		return err
	}
	st, err := pipeline.ReadState(dir, id)
	if err != nil {
		return err
	}
	if o.jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	return st.WriteText(stdout, pipeline.Active(dir, id))
}
