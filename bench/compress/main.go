// Command compress compares Kiln's model compression with the same
// transformations done in Python PyTorch on the same trained model, in one
// table: for each variant (fp32; 50% unstructured magnitude pruning; 50%
// structured pruning with fine-tuning; dynamic int8; static int8; fp16
// weights) and each side, the TorchScript file size, parameter count,
// sparsity, test accuracy and median latency at batch 1 and 64.
//
//	go run ./bench/compress [-threads 1] [-dir build/bench-compress] [-json FILE] [-cnn]
//
// The model is the digits MLP of core/optimize's tests (64 pixels → 256 →
// 128 → 10, ReLU, dropout) trained by Kiln on scikit-learn's 1797 digits
// (seeded stratified 65/15/20 split); -cnn adds a small digits CNN. Kiln's
// variants come from core/optimize.Run; bench/compress/peer.py rebuilds the
// trained model as an eager torch.nn model from Kiln's weights (checked to
// give the same outputs) and applies torch.nn.utils.prune and
// torch.ao.quantization as its documentation shows (see peer.py). Both
// sides' TorchScript files are then loaded and measured here alike: the
// same test rows, the same batches, the same libtorch and intra-op thread
// count, all variants of both sides timed in alternation
// (core/optimize.Latencies: warm-up, 15 rounds, median call time).
//
// Needs a Python with torch and scikit-learn ($KILN_PYTHON).
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
)

// variant is one compression, done by both sides.
type variant struct {
	key, name string
	opts      optimize.Options
}

// Row is one measured model.
type Row struct {
	Model    string  `json:"model"`
	Variant  string  `json:"variant"`
	Side     string  `json:"side"`
	File     string  `json:"-"`
	Bytes    int64   `json:"file_bytes"`
	Params   int64   `json:"params"`
	Sparsity float64 `json:"sparsity"`
	Accuracy float64 `json:"accuracy"`
	MsB1     float64 `json:"latency_ms_b1"`
	MsB64    float64 `json:"latency_ms_b64"`
}

func main() {
	threads := flag.Int("threads", 1, "libtorch intra-op threads (and OpenBLAS threads) for timing")
	dir := flag.String("dir", "build/bench-compress", "working directory for data, models and the JSON table")
	jsonOut := flag.String("json", "", "also write the table as JSON here (default DIR/compress.json)")
	cnn := flag.Bool("cnn", false, "also compare on a small digits CNN")
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if *jsonOut == "" {
		*jsonOut = filepath.Join(*dir, "compress.json")
	}
	if err := run(*threads, *dir, *jsonOut, *cnn); err != nil {
		fmt.Fprintln(os.Stderr, "bench/compress:", err)
		os.Exit(1)
	}
}

func digitsJob(model nn.Spec) train.Job {
	return train.Job{
		Model: model,
		Data:  data.Options{Target: "digit", Task: data.Classification},
		Split: data.SplitOptions{Val: 0.15, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 40, BatchSize: 32, Seed: 1,
			Optimizer:     train.Optimizer{Type: "adam", LR: 1e-3},
			Schedule:      train.Schedule{Type: "cosine", WarmupEpochs: 1},
			EarlyStopping: &train.EarlyStopping{Patience: 8, Metric: "accuracy"}},
	}
}

func run(threads int, dir, jsonOut string, cnn bool) error {
	if err := os.Setenv("OPENBLAS_NUM_THREADS", fmt.Sprint(threads)); err != nil {
		return err
	}
	if err := core.SetNumThreads(threads); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	dataDir := filepath.Join(dir, "data")
	if err := testkit.MakeFixture("datasets", dataDir); err != nil {
		return fmt.Errorf("exporting digits: %w", err)
	}
	tb, err := data.ReadCSVFile(filepath.Join(dataDir, "digits.csv"))
	if err != nil {
		return err
	}
	models := []struct {
		name string
		spec nn.Spec
	}{
		{"digits MLP 64-256-128-10", nn.Sequential(nn.Linear(256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128), nn.ReLU(), nn.Linear(0))},
	}
	if cnn {
		models = append(models, struct {
			name string
			spec nn.Spec
		}{"digits CNN", nn.Sequential(
			nn.Layer{Type: "conv2d", Out: 16, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
			nn.Conv2d(32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64), nn.ReLU(), nn.Linear(0),
		).WithInputShape(1, 8, 8)})
	}
	var all []Row
	for i, m := range models {
		rows, err := compare(filepath.Join(dir, fmt.Sprintf("m%d", i)), m.name, m.spec, tb, threads)
		if err != nil {
			return fmt.Errorf("%s: %w", m.name, err)
		}
		all = append(all, rows...)
	}
	printTable(os.Stdout, all, threads)
	b, err := json.MarshalIndent(map[string]any{"threads": threads, "torch": core.TorchVersion(), "rows": all}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(jsonOut, append(b, '\n'), 0o644)
}

// compare trains spec on the digits, compresses it both ways and measures
// every variant.
func compare(dir, model string, spec nn.Spec, tb *data.Table, threads int) ([]Row, error) {
	pkg := filepath.Join(dir, "package")
	if _, err := train.Run(context.Background(), digitsJob(spec), tb, "digits.csv", pkg, nil); err != nil {
		return nil, fmt.Errorf("training: %w", err)
	}
	src, err := optimize.Open(pkg)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	sp, err := src.Splits(tb, nil)
	if err != nil {
		return nil, err
	}
	// Calibration rows for static int8: the first 256 training rows.
	calib := sp.Train.Subset(seq(min(256, sp.Train.Len())))
	const finetune = 10
	variants := []variant{
		{"fp32", "fp32", optimize.Options{}},
		{"unstructured", "pruned 50% unstructured", optimize.Options{Prune: 0.5}},
		{"structured", fmt.Sprintf("pruned 50%% structured + %d ep", finetune), optimize.Options{Prune: 0.5, Structured: true, FineTuneEpochs: finetune}},
		{"int8-dynamic", "int8 dynamic", optimize.Options{Quantize: optimize.Int8}},
		{"int8-static", "int8 static", optimize.Options{Quantize: optimize.Int8, Calibration: calib}},
		{"fp16", "fp16 weights", optimize.Options{Quantize: optimize.FP16}},
	}
	engine, err := optimize.ChooseEngine("")
	if err != nil {
		return nil, err
	}
	kdir := filepath.Join(dir, "kiln")
	if err := os.MkdirAll(kdir, 0o755); err != nil {
		return nil, err
	}
	var rows []Row
	var structured []string
	for _, v := range variants {
		p := filepath.Join(kdir, v.key+".pt")
		r := Row{Model: model, Variant: v.name, Side: "Kiln", File: p}
		if v.key == "fp32" {
			if err := src.Net.Save(p); err != nil {
				return nil, err
			}
			r.Params = src.Net.Params
		} else {
			res, err := optimize.Run(context.Background(), src, sp, v.opts)
			if err != nil {
				return nil, fmt.Errorf("kiln %s: %w", v.name, err)
			}
			err = res.Module.Save(p)
			res.Module.Close()
			if err != nil {
				return nil, err
			}
			r.Params, r.Sparsity = res.Record.After.Params, res.Record.After.Sparsity
			if v.opts.Structured {
				for i, l := range res.Spec.Layers {
					if l.Out != src.Manifest.Spec.Layers[i].Out {
						structured = append(structured, src.Net.Layers[i].Name)
					}
				}
			}
		}
		rows = append(rows, r)
	}

	// The PyTorch side, on the same weights and rows.
	hp := src.Hyperparameters
	meta := map[string]any{
		"features": sp.Train.Features, "spec": src.Manifest.Spec, "engine": engine, "threads": threads,
		"structured_layers": structured,
		"finetune": map[string]any{"epochs": finetune, "batch_size": hp.BatchSize, "optimizer": hp.Optimizer.Type,
			"lr": hp.Optimizer.LR * 0.5, "weight_decay": hp.Optimizer.WeightDecay, "seed": hp.Seed},
	}
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
		return nil, err
	}
	for name, ds := range map[string]*data.Dataset{"train": sp.Train, "val": sp.Val, "test": sp.Test, "calib": calib} {
		if err := writeF32(filepath.Join(dir, "data", name+"_x.f32"), ds.X); err != nil {
			return nil, err
		}
		if err := writeF32(filepath.Join(dir, "data", name+"_y.f32"), ds.Y); err != nil {
			return nil, err
		}
	}
	b, err := json.Marshal(meta)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "meta.json"), b, 0o644); err != nil {
		return nil, err
	}
	py, err := testkit.PythonPath()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(py, filepath.Join(testkit.Root(), "bench", "compress", "peer.py"), dir)
	cmd.Env = append(os.Environ(), fmt.Sprintf("OMP_NUM_THREADS=%d", threads))
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("peer.py: %v\n%s", err, out)
	}
	var pmeta struct {
		Variants map[string]struct {
			Params   int64   `json:"params"`
			Sparsity float64 `json:"sparsity"`
		} `json:"variants"`
	}
	if b, err = os.ReadFile(filepath.Join(dir, "torch", "meta.json")); err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, &pmeta); err != nil {
		return nil, err
	}
	keys := []string{"fp32", "unstructured", "structured", "int8-dynamic", "int8-static", "fp16"}
	names := map[string]string{}
	for _, v := range variants {
		names[v.key] = v.name
	}
	var both []Row
	for _, k := range keys {
		for _, r := range rows {
			if r.File == filepath.Join(kdir, k+".pt") {
				both = append(both, r)
			}
		}
		pv, ok := pmeta.Variants[k]
		if !ok {
			return nil, fmt.Errorf("peer.py made no %s variant", k)
		}
		both = append(both, Row{Model: model, Variant: names[k], Side: "PyTorch", File: filepath.Join(dir, "torch", k+".pt"),
			Params: pv.Params, Sparsity: pv.Sparsity})
	}

	// Measure every file alike.
	mods := make([]*core.Module, len(both))
	defer func() {
		for _, m := range mods {
			if m != nil {
				m.Close()
			}
		}
	}()
	for i := range both {
		st, err := os.Stat(both[i].File)
		if err != nil {
			return nil, err
		}
		both[i].Bytes = st.Size()
		if mods[i], err = modelpkg.LoadModule(both[i].File); err != nil { // Kiln int8: under its engine
			return nil, err
		}
		met, err := optimize.Score(mods[i], sp.Test, data.Classification, len(src.Manifest.Labels))
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", both[i].Side, both[i].Variant, err)
		}
		both[i].Accuracy = met["accuracy"]
	}
	for _, batch := range []int{1, 64} {
		l, err := optimize.Latencies(mods, sp.Test, batch)
		if err != nil {
			return nil, err
		}
		for i := range both {
			if batch == 1 {
				both[i].MsB1 = l[i]
			} else {
				both[i].MsB64 = l[i]
			}
		}
	}
	return both, nil
}

func seq(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i
	}
	return s
}

func writeF32(p string, v []float32) error {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return os.WriteFile(p, b, 0o644)
}

func human(n int64) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
}

// printTable writes the side-by-side table: each variant's Kiln row, its
// PyTorch row, and per model the speed-up of each row over its side's
// fp32 at batch 64.
func printTable(w io.Writer, rows []Row, threads int) {
	fmt.Fprintf(w, "bench/compress: libtorch %s, %d intra-op thread(s); latency = median forward time, all rows of a model timed in alternation\n\n", core.TorchVersion(), threads)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "model\tvariant\tside\tfile\tparams\tsparsity\taccuracy\tms b1\tms b64\tb64 vs fp32\t")
	base := map[string]float64{}
	for _, r := range rows {
		if strings.HasPrefix(r.Variant, "fp32") {
			base[r.Model+r.Side] = r.MsB64
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%.1f%%\t%.4f\t%.4f\t%.4f\t%.2fx\t\n", r.Model, r.Variant, r.Side, human(r.Bytes), r.Params,
			100*r.Sparsity, r.Accuracy, r.MsB1, r.MsB64, base[r.Model+r.Side]/r.MsB64)
	}
	tw.Flush()

	fmt.Fprintf(w, "\nKiln against PyTorch per variant (ratios PyTorch ÷ Kiln: above 1 Kiln is smaller/faster; latencies within %.0f%% count as even,\nthe spread seen between rows of identical compute):\n\n", 100*noise)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "model\tvariant\tsize\taccuracy Δ\tb1\tb64\tverdict\t")
	for i := 0; i+1 < len(rows); i++ {
		k, p := rows[i], rows[i+1]
		if k.Side != "Kiln" || p.Side != "PyTorch" || k.Variant != p.Variant || k.Model != p.Model {
			continue
		}
		var miss []string
		if k.Bytes > p.Bytes {
			miss = append(miss, "larger")
		}
		if k.Accuracy < p.Accuracy {
			miss = append(miss, "less accurate")
		}
		if p.MsB1/k.MsB1 < 1-noise {
			miss = append(miss, "slower at b1")
		}
		if p.MsB64/k.MsB64 < 1-noise {
			miss = append(miss, "slower at b64")
		}
		verdict := "ok"
		if len(miss) > 0 {
			verdict = "MISS: " + strings.Join(miss, ", ")
		}
		fmt.Fprintf(tw, "%s\t%s\t%.2fx\t%+.4f\t%.2fx\t%.2fx\t%s\t\n", k.Model, k.Variant, float64(p.Bytes)/float64(k.Bytes),
			k.Accuracy-p.Accuracy, p.MsB1/k.MsB1, p.MsB64/k.MsB64, verdict)
	}
	tw.Flush()
}

// noise is the latency difference bench/compress treats as even.
const noise = 0.10
