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

	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/registry/runlog"
)

type optimizeOptions struct {
	model, data, out, quantize, engine, norm, calibrate, weights string
	prune                                                        float64
	structured, global, jsonOut                                  bool
	finetune, steps                                              int
	val, test                                                    float64
	stratify                                                     bool
	register                                                     string
	reg                                                          registryFlags
}

func newOptimizeCmd() *cobra.Command {
	var o optimizeOptions
	cmd := &cobra.Command{
		Use:   "optimize --model DIR --data DATA.csv [--prune 0.5 [--structured]] [--quantize int8|fp16|bf16 [--calibrate DATA] [--engine E]] --out DIR",
		Short: "Prune and quantize a Kiln model package, measuring size, accuracy and latency",
		Long: `Opens the model package DIR (from kiln train), re-creates its train,
validation and test splits from the data it was trained on (checked by
fingerprint), prunes (unstructured magnitude pruning, per layer or --global;
or --structured: whole Linear neurons and conv channels removed and a
smaller dense network rebuilt), fine-tunes after pruning with the package's hyper-parameters, and
quantizes (int8: dynamic int8 Linear layers for the chosen quantized engine;
int8 with --calibrate DATA: static int8 Linear and Conv layers, activation
ranges observed by running DATA's rows, which hold the model's input
columns, through the float model; fp16, bf16: weight-only). The engine
(--engine, else fbgemm, qnnpack or onednn, whichever the linked libtorch
has first) is recorded in the manifest and selected when Kiln loads the
package. Writes a model package to --out with the
optimization recorded in manifest.json, and prints the report.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runOptimize(cmd, cmd.OutOrStdout(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.model, "model", "", "model package directory, or a registered version: models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest (required)")
	f.StringVar(&o.data, "data", "", "CSV the model was trained on (required)")
	f.StringVar(&o.out, "out", "", "directory for the optimized package (required)")
	f.Float64Var(&o.prune, "prune", 0, "fraction of weights (or neurons with --structured) to remove, in [0, 1)")
	f.BoolVar(&o.structured, "structured", false, "remove whole Linear neurons and conv channels and rebuild smaller dense layers")
	f.BoolVar(&o.global, "global", false, "rank weights across all layers (unstructured)")
	f.StringVar(&o.norm, "norm", "l2", "neuron/filter ranking for --structured: l1 or l2 norm of its weights")
	f.IntVar(&o.steps, "steps", 1, "prune in this many steps, fine-tuning after each")
	f.IntVar(&o.finetune, "finetune-epochs", 10, "fine-tuning epochs after each pruning step (0: none)")
	f.StringVar(&o.quantize, "quantize", "", "int8 (dynamic; static with --calibrate), fp16 or bf16 (weight-only)")
	f.StringVar(&o.engine, "engine", "", "quantized engine for int8 (default: fbgemm, else qnnpack, else onednn)")
	f.StringVar(&o.calibrate, "calibrate", "", "static int8: calibration data (CSV, Arrow IPC or Parquet with the model's input columns)")
	f.StringVar(&o.weights, "weights", "", "static int8 weight scales: per-channel or per-tensor (default: the engine's, per-tensor on qnnpack)")
	f.Float64Var(&o.val, "val", -1, "validation fraction, for packages whose manifest lacks the split")
	f.Float64Var(&o.test, "test", -1, "test fraction, for packages whose manifest lacks the split")
	f.BoolVar(&o.stratify, "stratify", false, "the split was stratified (with --val/--test)")
	f.BoolVar(&o.jsonOut, "json", false, "print the report as JSON")
	f.StringVar(&o.register, "register", "", "register the optimized package as a new version of this model (its parent: --model's version when it is a registered one)")
	o.reg.addTo(f)
	cmd.MarkFlagRequired("model")
	cmd.MarkFlagRequired("data")
	cmd.MarkFlagRequired("out")
	return cmd
}

func runOptimize(cmd *cobra.Command, stdout io.Writer, o optimizeOptions) error {
	if o.calibrate != "" && o.quantize != optimize.Int8 {
		return fmt.Errorf("kiln: optimize: --calibrate is for static int8: add --quantize int8")
	}
	if o.weights != "" && o.calibrate == "" {
		return fmt.Errorf("kiln: optimize: --weights is for static int8: add --calibrate DATA")
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	dir, parent, err := registeredInput(ctx, o.reg, o.model)
	if err != nil {
		return err
	}
	if parent != nil {
		defer os.RemoveAll(filepath.Dir(dir))
	}
	src, err := optimize.Open(dir)
	if err != nil {
		return err
	}
	defer src.Close()
	params := runlog.OptimizeParams(o.options(nil), map[string]string{"model": o.model, "data": o.data, "out": o.out, "calibrate": o.calibrate})
	tr, err := startRun(ctx, o.reg, o.register, runlog.KindOptimize, params)
	if err != nil {
		return err
	}
	defer tr.Close()
	version, err := optimizeAndSave(ctx, stdout, o, src, tr, parent)
	if ferr := tr.Finish(err, nil); err == nil {
		err = ferr
	}
	if err != nil {
		return err
	}
	if version != nil && !o.jsonOut {
		fmt.Fprintf(stdout, "registered %s (sha256:%s, parent %s)\n", version.Ref(), version.Digest, parentOf(*version))
	}
	return nil
}

// options are the optimization's options, with cal as static int8's
// calibration rows (nil: none).
func (o optimizeOptions) options(cal *data.Dataset) optimize.Options {
	return optimize.Options{
		Prune: o.prune, Structured: o.structured, Global: o.global, Norm: optimize.Norm(o.norm),
		Steps: o.steps, FineTuneEpochs: o.finetune, Quantize: o.quantize, Engine: o.engine,
		Calibration: cal, Weights: o.weights,
	}
}

// registeredInput returns the package directory --model names: the
// directory itself, or a registered version (models:/...) fetched, its
// digest verified, into a temporary directory (the caller removes its
// parent), with the version's reference.
func registeredInput(ctx context.Context, rf registryFlags, model string) (string, *registry.Ref, error) {
	if !strings.HasPrefix(model, registry.URIScheme) {
		return model, nil, nil
	}
	r, err := rf.open(ctx)
	if err != nil {
		return "", nil, err
	}
	defer r.Close()
	v, err := r.Resolve(ctx, model)
	if err != nil {
		return "", nil, err
	}
	tmp, err := os.MkdirTemp("", "kiln-optimize-")
	if err != nil {
		return "", nil, err
	}
	dir := filepath.Join(tmp, "pkg")
	if _, err := r.Fetch(ctx, v.Ref(), dir); err != nil {
		os.RemoveAll(tmp)
		return "", nil, err
	}
	ref := v.Ref()
	return dir, &ref, nil
}

// optimizeAndSave runs the optimization, writes --out, prints the report,
// logs the variants' figures to the run and registers the result.
func optimizeAndSave(ctx context.Context, stdout io.Writer, o optimizeOptions, src *optimize.Source, tr *runlog.Tracker, parent *registry.Ref) (*registry.Version, error) {
	tb, err := loadTable(o.data)
	if err != nil {
		return nil, err
	}
	var split *data.SplitOptions
	if o.val >= 0 || o.test >= 0 {
		split = &data.SplitOptions{Val: max(o.val, 0), Test: max(o.test, 0), Stratify: o.stratify}
	}
	sp, err := src.Splits(tb, split)
	if err != nil {
		return nil, err
	}
	var cal *data.Dataset
	if o.calibrate != "" {
		ct, err := loadTable(o.calibrate)
		if err != nil {
			return nil, err
		}
		if cal, err = src.Calibration(ct); err != nil {
			return nil, fmt.Errorf("%w (--calibrate %s)", err, o.calibrate)
		}
	}
	res, err := optimize.Run(ctx, src, sp, o.options(cal))
	if err != nil {
		return nil, err
	}
	defer res.Module.Close()
	if err := optimize.SavePackage(o.out, src, sp, res); err != nil {
		return nil, err
	}
	// One metric step per variant, in the report's order.
	runlog.OptimizeVariants(tr, res.Record.Report)
	var version *registry.Version
	if o.register != "" {
		v, err := tr.Register(ctx, o.register, o.out, parent)
		if err != nil {
			return nil, err
		}
		version = &v
	}
	if o.jsonOut {
		b, err := json.MarshalIndent(res.Record.Report, "", "  ")
		if err != nil {
			return nil, err
		}
		_, err = fmt.Fprintln(stdout, string(b))
		return version, err
	}
	if err := res.Record.Report.WriteText(stdout); err != nil {
		return nil, err
	}
	_, err = fmt.Fprintf(stdout, "wrote %s\n", filepath.Join(o.out, modelpkg.ModelFile))
	return version, err
}
