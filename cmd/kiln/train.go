package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/dist"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/registry/runlog"
)

type trainOptions struct {
	spec, data, target, out string
	loss                    string
	register                string
	reg                     registryFlags
	epochs                  int
	seed                    int64
	device, amp             string
	checkpointDir           string
	resume, quiet, jsonOut  bool
	syncBatchNorm           bool
	dist                    distOptions
	fineTune                fineTuneFlags
}

func newTrainCmd() *cobra.Command {
	var o trainOptions
	cmd := &cobra.Command{
		Use:   "train --spec SPEC.yaml|--init MODEL.pt --data DATA.csv|DATA.arrow|DATA.parquet --target COL --out DIR",
		Short: "Train a network on tabular data and save it as a Kiln model package",
		Long: `Reads a training spec (YAML or JSON: model, data, split and train sections;
see core/train.Job), loads the data (CSV, Arrow IPC or Parquet: numeric
and boolean columns are numeric, string and dictionary columns categorical), splits it (seeded, optionally
stratified), fits the preprocessing on the training split, trains with
validation each epoch and saves DIR/model.pt (TorchScript taking raw
feature columns) and DIR/manifest.json. Progress goes to stderr; the final
metrics to stdout. Ctrl-C stops after the current progress interval; with
--checkpoint-dir, --resume continues a killed run.

--init MODEL.pt fine-tunes a TorchScript model of any architecture instead
(a file torch.jit.save wrote, or a package): the feature columns, unscaled,
reshaped to --input-shape, go to its forward; --freeze PREFIX keeps the
parameters whose names start with PREFIX fixed, --lr-group PREFIX=LR trains
those at their own learning rate. The spec (optional then) may still give
the data, split and train sections.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runTrain(ctx, cmd.OutOrStdout(), cmd.ErrOrStderr(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.spec, "spec", "", "training spec, YAML or JSON (required)")
	f.StringVar(&o.data, "data", "", "training data: CSV with a header row, Arrow IPC (.arrow, .feather, .ipc, .arrows) or Parquet (.parquet) (required)")
	f.StringVar(&o.target, "target", "", "column to predict (overrides the spec's data.target)")
	f.StringVar(&o.out, "out", "", "directory for the model package (required)")
	f.IntVar(&o.epochs, "epochs", 0, "epochs (overrides the spec)")
	f.StringVar(&o.loss, "loss", "", "loss (overrides the spec's train.loss.type): mse, l1, huber, bce_with_logits, cross_entropy, or Keras's binary_crossentropy (network ending in a sigmoid), categorical_crossentropy, sparse_categorical_crossentropy (ending in a softmax), computed stably on the activation's input")
	f.Int64Var(&o.seed, "seed", -1, "seed for the split, initialization, dropout and shuffling (overrides the spec)")
	f.StringVar(&o.device, "device", "", "where to train: cpu, cuda or cuda:N (overrides the spec's train.device; a GPU needs a libtorch with CUDA)")
	f.StringVar(&o.amp, "amp", "", "mixed precision: none, bf16 (CPU or CUDA) or fp16 (CUDA) — forward and loss under autocast (overrides the spec's train.amp)")
	f.StringVar(&o.checkpointDir, "checkpoint-dir", "", "write a checkpoint here every epoch")
	f.BoolVar(&o.resume, "resume", false, "continue from the latest checkpoint in --checkpoint-dir")
	f.BoolVarP(&o.quiet, "quiet", "q", false, "no progress bar")
	f.BoolVar(&o.jsonOut, "json", false, "print the report as JSON")
	f.StringVar(&o.register, "register", "", "register the package as a new version of this model in the registry")
	o.reg.addTo(f)
	f.IntVar(&o.dist.nprocPerNode, "nproc-per-node", 0, "data-parallel training: start this many local ranks (as torchrun does; under torchrun or a PyTorchJob leave it unset)")
	f.IntVar(&o.dist.nnodes, "nnodes", 1, "data-parallel training: number of nodes")
	f.IntVar(&o.dist.nodeRank, "node-rank", 0, "data-parallel training: this node's rank in [0, nnodes)")
	f.StringVar(&o.dist.masterAddr, "master-addr", "", "data-parallel training: address of node 0, where rank 0 hosts the rendezvous store (default 127.0.0.1 with one node)")
	f.IntVar(&o.dist.masterPort, "master-port", 29500, "data-parallel training: port of the rendezvous store")
	f.DurationVar(&o.dist.timeout, "dist-timeout", dist.DefaultTimeout, "data-parallel training: a rank that dies or hangs makes the others fail within this time")
	o.fineTune.addTo(f)
	f.StringVar(&o.dist.backend, "backend", dist.BackendGloo, "data-parallel training: c10d backend, gloo or nccl (nccl needs a libtorch with CUDA and NCCL)")
	f.BoolVar(&o.syncBatchNorm, "sync-batchnorm", false, "data-parallel training: synchronize batch-norm statistics across the ranks (torch.nn.SyncBatchNorm; default: per rank, as DDP)")
	cmd.MarkFlagRequired("data")
	cmd.MarkFlagRequired("out")
	return cmd
}

// loadTable reads every column of training data; see loadTableColumns.
func loadTable(path string) (*data.Table, error) { return loadTableColumns(path, nil) }

// loadTableColumns reads training data: CSV (.csv, .txt or no extension),
// or an Arrow IPC file or stream (.arrow, .feather, .ipc, .arrows) or
// Parquet file (.parquet, .pq) through arrowio.ReadTable, reading only the
// given columns when there are any (Parquet is read column-projected).
func loadTableColumns(path string, columns []string) (*data.Table, error) {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".csv", ".txt", "":
		return data.ReadCSVFile(path)
	case ".arrow", ".feather", ".ipc", ".arrows", ".parquet", ".pq":
		t, err := arrowio.ReadTable(path, columns)
		if err != nil {
			return nil, fmt.Errorf("kiln: %w", err)
		}
		return t, nil
	}
	return nil, fmt.Errorf("kiln: %s: unknown data format %q (want .csv, .arrow, .feather, .ipc, .arrows or .parquet)", path, filepath.Ext(path))
}

// tableColumns returns the columns a job reads: its features and target,
// or none (every column) when it names no features.
func tableColumns(o data.Options) []string {
	if len(o.Features) == 0 || o.Target == "" {
		return nil
	}
	return append(append([]string(nil), o.Features...), o.Target)
}

func runTrain(ctx context.Context, stdout, stderr io.Writer, o trainOptions) error {
	if err := dist.CheckBackend(o.dist.backend); err != nil {
		return err
	}
	if o.dist.nprocPerNode > 0 && !launched(os.Getenv) {
		return launchRanks(ctx, stderr, o.dist)
	}
	env, distributed, err := dist.EnvFrom(os.Getenv)
	if err != nil {
		return err
	}
	var job train.Job
	switch {
	case o.spec != "":
		raw, err := os.ReadFile(o.spec)
		if err != nil {
			return fmt.Errorf("kiln: train: %w", err)
		}
		if job, err = train.ParseJob(raw); err != nil {
			return fmt.Errorf("%w (in %s)", err, o.spec)
		}
	case o.fineTune.init == "":
		return fmt.Errorf("kiln: train: --spec is required (or --init MODEL.pt to fine-tune a TorchScript model)")
	}
	if err := o.fineTune.apply(&job); err != nil {
		return err
	}
	if o.target != "" {
		job.Data.Target = o.target
	}
	if o.epochs > 0 {
		job.Train.Epochs = o.epochs
	}
	if o.loss != "" {
		job.Train.Loss.Type = o.loss
	}
	if o.seed >= 0 {
		job.Train.Seed = uint64(o.seed)
	}
	if o.device != "" {
		job.Train.Device = o.device
	}
	if o.amp != "" {
		job.Train.AMP = o.amp
	}
	if o.checkpointDir != "" {
		job.Train.CheckpointDir = o.checkpointDir
	}
	if o.syncBatchNorm {
		job.Train.SyncBatchNorm = true
	}
	if o.resume {
		if job.Train.CheckpointDir == "" {
			return fmt.Errorf("kiln: train: --resume needs --checkpoint-dir (or train.checkpoint_dir in the spec)")
		}
		job.Train.Resume = true
	}
	tb, err := loadTableColumns(o.data, tableColumns(job.Data))
	if err != nil {
		return err
	}
	out, quiet := o.out, o.quiet
	rank0 := true
	if distributed {
		g, err := dist.Init(env, dist.Options{Timeout: o.dist.timeout, Backend: o.dist.backend})
		if err != nil {
			return err
		}
		defer g.Close()
		job.Train.Group = g
		if g.Rank() != 0 {
			out, quiet, rank0 = "", true, false // rank 0 reports, writes the package and records the run
		}
	}
	var tr *runlog.Tracker
	if rank0 {
		params := runlog.TrainParams(job, map[string]string{"data": o.data, "spec": o.spec, "out": o.out})
		if tr, err = startRun(ctx, o.reg, o.register, runlog.KindTrain, params); err != nil {
			return err
		}
		defer tr.Close()
	}
	bar := newProgressBar(stderr, quiet)
	rep, err := train.Run(ctx, job, tb, o.data, out, func(e train.Event) {
		bar.event(e)
		tr.Epoch(e.Epoch, runlog.TrainEpoch(e))
	})
	bar.finish()
	var final map[string]float64
	var version *registry.Version
	if err == nil {
		final = runlog.TrainFinal(rep)
		if o.register != "" && rank0 {
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
	if g := job.Train.Group; g != nil {
		// The ranks leave together: rank 0 (which may host the store) last.
		if err := g.Barrier(); err != nil {
			return fmt.Errorf("kiln: train: %w", err)
		}
		if g.Rank() != 0 {
			return nil
		}
	}
	if o.jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	r := rep.Result
	fmt.Fprintf(stdout, "trained %d epochs (best %d, stopped: %s) in %.1fs, %.0f samples/s\n",
		len(r.History), r.BestEpoch, r.StopReason, r.Seconds, r.SamplesPerSec)
	if rep.Val != nil {
		fmt.Fprintf(stdout, "validation  %s\n", formatMetrics(rep.Val))
	}
	if rep.Test != nil {
		fmt.Fprintf(stdout, "test        %s\n", formatMetrics(rep.Test))
	}
	fmt.Fprintf(stdout, "saved       %s (model.pt, manifest.json)\n", o.out)
	if tr != nil {
		fmt.Fprintf(stdout, "run         %s\n", tr.ID())
	}
	if version != nil {
		fmt.Fprintf(stdout, "registered  %s (sha256:%s)\n", version.Ref(), version.Digest)
	}
	return nil
}

// formatMetrics prints metrics in a stable order.
func formatMetrics(m train.Metrics) string {
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	parts := make([]string, len(names))
	for i, k := range names {
		parts[i] = fmt.Sprintf("%s %.4f", k, m[k])
	}
	return strings.Join(parts, "  ")
}

// progressBar draws training progress on a terminal (redrawn in place) or,
// when stderr is not a terminal, prints one line per epoch.
type progressBar struct {
	w      io.Writer
	quiet  bool
	tty    bool
	drawn  bool
	lastAt time.Time
}

func newProgressBar(w io.Writer, quiet bool) *progressBar {
	tty := false
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil {
			tty = st.Mode()&os.ModeCharDevice != 0
		}
	}
	return &progressBar{w: w, quiet: quiet, tty: tty}
}

func (b *progressBar) event(e train.Event) {
	if b.quiet {
		return
	}
	switch e.Kind {
	case "step":
		if !b.tty || time.Since(b.lastAt) < 100*time.Millisecond {
			return
		}
		b.lastAt = time.Now()
		const width = 24
		done := int(float64(width) * float64(e.Step) / float64(max(e.Steps, 1)))
		fmt.Fprintf(b.w, "\r\x1b[Kepoch %d/%d [%s%s] %d/%d loss %.4f lr %.2g %.0f samples/s ETA %s",
			e.Epoch, e.Epochs, strings.Repeat("=", done), strings.Repeat(" ", width-done),
			e.Step, e.Steps, e.Loss, e.LR, e.SamplesPerSec, e.ETA.Round(time.Second))
		b.drawn = true
	case "epoch":
		if b.tty {
			fmt.Fprint(b.w, "\r\x1b[K")
		}
		line := fmt.Sprintf("epoch %d/%d loss %.4f", e.Epoch, e.Epochs, e.Loss)
		if len(e.Metrics) > 0 {
			line += "  val " + formatMetrics(e.Metrics)
		}
		fmt.Fprintf(b.w, "%s  %.0f samples/s ETA %s\n", line, e.SamplesPerSec, e.ETA.Round(time.Second))
		b.drawn = false
	}
}

func (b *progressBar) finish() {
	if b.drawn && b.tty {
		fmt.Fprint(b.w, "\r\x1b[K")
	}
}
