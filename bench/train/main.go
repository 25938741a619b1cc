// Command train benchmarks training throughput: samples per second of
// Kiln's trainer (one C call per epoch over a TorchScript network) against
// the same model, loss, optimizer and batch size in Python PyTorch eager
// mode on the same libtorch and thread count. One run, one table:
//
//	(a) an 8→10→1 MLP, MSE, SGD with momentum, batch 32, 8192 tabular rows
//	(b) the digits CNN (conv-bn-relu ×2, max-pool, dropout, linear),
//	    cross-entropy, AdamW, batch 64, scikit-learn's 1797 digits
//	(c) fine-tuning a ResNet-like model scripted in Python torch
//	    (resnet.py: ResNet-18's layout, 16×16 digits), conv1/bn1/layer1
//	    frozen, fc at 10× the base rate, AdamW, batch 64: Kiln trains the
//	    TorchScript file (core/train InitModel path), PyTorch the same
//	    weights in eager mode
//
//	go run ./bench/train [-threads 1] [-rounds 8] [-dist-epochs 6]
//
// A second table, the distributed rows: the same two workloads trained by
// two data-parallel ranks, Kiln's (two goroutines of this process, each a
// c10d Gloo rank over loopback with bucketed gradient all-reduce, as
// Config.Workers runs them) next to PyTorch DDP's (torchrun
// --nproc_per_node 2, gloo, ddp_peer.py), same per-rank batch, data and
// intra-op threads (printed for both sides), both sides' ranks kept up and
// their epochs alternating, global samples/s of each side's fastest
// epoch; and the all-reduce bandwidth of one 25 MiB float32 gradient
// bucket through Kiln's group next to torch.distributed.all_reduce of the
// same size.
//
// Each side's figure is its fastest epoch of -rounds, the two sides'
// epochs alternating (peer.py stays up and trains one epoch per request),
// so that on a shared machine both see the same disturbances. Throughput
// is shown per wall-clock second and per CPU second of each process (the
// latter is steadier when other processes compete for the cores).
//
// Needs a Python with torch and scikit-learn ($KILN_PYTHON).
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
)

// rate is a throughput: samples per wall-clock second and per CPU second
// of the process (the latter barely moves when other processes compete
// for the cores).
type rate struct{ wall, cpu float64 }

func (r rate) max(o rate) rate { return rate{max(r.wall, o.wall), max(r.cpu, o.cpu)} }

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// kilnEpoch trains one epoch and returns its throughput.
func kilnEpoch(net *nn.Net, ds *data.Dataset, cfg train.Config) (rate, error) {
	cfg.Epochs = 1
	t0, c0 := time.Now(), cpuTime()
	_, err := train.Fit(context.Background(), net, ds, nil, cfg, nil)
	n := float64(ds.Len())
	return rate{n / time.Since(t0).Seconds(), n / (cpuTime() - c0).Seconds()}, err
}

// peer drives peer.py, the Python side, one epoch at a time.
type peer struct {
	in  io.WriteCloser
	out *bufio.Scanner
}

func (p *peer) epoch(name string) (rate, error) {
	if _, err := fmt.Fprintln(p.in, name); err != nil {
		return rate{}, err
	}
	if !p.out.Scan() {
		return rate{}, fmt.Errorf("python peer ended: %v", p.out.Err())
	}
	var r rate
	if _, err := fmt.Sscanf(p.out.Text(), "%g %g", &r.wall, &r.cpu); err != nil {
		return rate{}, fmt.Errorf("python peer said %q: %w", p.out.Text(), err)
	}
	return r, nil
}

// compare alternates Kiln and Python epochs of one workload, `rounds`
// times, after a warm-up epoch, and returns each side's fastest epoch: on
// a shared machine the fastest epoch is the least disturbed one, and
// alternating gives both sides the same chances.
func compare(p *peer, name string, net *nn.Net, ds *data.Dataset, cfg train.Config, rounds int) (kiln, py rate, err error) {
	if _, err := kilnEpoch(net, ds, cfg); err != nil {
		return rate{}, rate{}, err
	}
	for range rounds {
		k, err := kilnEpoch(net, ds, cfg)
		if err != nil {
			return rate{}, rate{}, fmt.Errorf("kiln %s: %w", name, err)
		}
		q, err := p.epoch(name)
		if err != nil {
			return rate{}, rate{}, fmt.Errorf("python %s: %w", name, err)
		}
		kiln, py = kiln.max(k), py.max(q)
	}
	return kiln, py, nil
}

func run() error {
	threads := flag.Int("threads", 1, "libtorch intra-op threads, both sides")
	rounds := flag.Int("rounds", 8, "timed epochs per side and workload, alternating (0: no single-process rows)")
	distEpochs := flag.Int("dist-epochs", 6, "distributed rows: timed epochs per side and workload, alternating (0: no distributed rows)")
	distOnly := flag.String("dist-only", "", "distributed rows: only this one (mlp, cnn or allreduce; for profiling)")
	flag.Parse()
	// libtorch's thread setting does not reach OpenBLAS, whose own worker
	// threads spin (sched_yield) between GEMMs and compete for the cores;
	// both sides get OPENBLAS_NUM_THREADS=-threads, which OpenBLAS reads
	// when it loads, hence the re-exec.
	if want := fmt.Sprint(*threads); os.Getenv("OPENBLAS_NUM_THREADS") != want {
		os.Setenv("OPENBLAS_NUM_THREADS", want)
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		return syscall.Exec(exe, os.Args, os.Environ())
	}
	if err := core.SetNumThreads(*threads); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "kiln-bench-train-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	// (a) tabular regression data: y = w·x + noise.
	const rows = 8192
	rng := rand.New(rand.NewPCG(1, 2))
	x := make([]float32, rows*8)
	y := make([]float32, rows)
	raw := make([]byte, 0, rows*9*4)
	put := func(v float32) { raw = binary.LittleEndian.AppendUint32(raw, math.Float32bits(v)) }
	for i := range rows {
		s := 0.0
		for j := range 8 {
			v := rng.NormFloat64()
			x[i*8+j] = float32(v)
			s += v * float64(j-4) / 4
			put(float32(v))
		}
		y[i] = float32(s + 0.1*rng.NormFloat64())
		put(y[i])
	}
	tab := filepath.Join(tmp, "tabular.bin")
	if err := os.WriteFile(tab, raw, 0o644); err != nil {
		return err
	}
	mlpData, err := data.NewDataset(x, 8, y)
	if err != nil {
		return err
	}
	mlp, err := nn.Build(nn.Sequential(nn.Linear(10), nn.ReLU(), nn.Linear(1)), 8, 1)
	if err != nil {
		return err
	}
	defer mlp.Close()

	// (b) digits, min-max scaled, as the Python side does.
	if err := testkit.MakeFixture("datasets", tmp); err != nil {
		return fmt.Errorf("exporting digits: %w", err)
	}
	tb, err := data.ReadCSVFile(filepath.Join(tmp, "digits.csv"))
	if err != nil {
		return err
	}
	all := make([]int, tb.Rows())
	for i := range all {
		all[i] = i
	}
	pre, err := data.Fit(tb, all, data.Options{Target: "digit", Task: data.Classification, Scale: "minmax"})
	if err != nil {
		return err
	}
	dx, err := pre.EncodeFeatures(tb, all)
	if err != nil {
		return err
	}
	dy, err := pre.EncodeTarget(tb, all)
	if err != nil {
		return err
	}
	digits, err := data.NewDataset(dx, 64, dy)
	if err != nil {
		return err
	}
	cnnSpec := nn.Sequential(
		nn.Layer{Type: "conv2d", Out: 16, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(),
		nn.Layer{Type: "conv2d", Out: 32, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
		nn.Flatten(), nn.Dropout(0.25), nn.Linear(10),
	).WithInputShape(1, 8, 8)
	cnn, err := nn.BuildWithPrelude(cnnSpec, pre.Prelude(), 1)
	if err != nil {
		return err
	}
	defer cnn.Close()

	// The single-process rows (-rounds 0 leaves them out).
	single := func() error {
		py, err := testkit.PythonPath()
		if err != nil {
			return err
		}
		resnetPath := filepath.Join(tmp, "resnet.pt")
		cmd := exec.Command(py, filepath.Join(testkit.Root(), "bench", "train", "peer.py"), tab, fmt.Sprint(rows), fmt.Sprint(*threads), resnetPath)
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			return err
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("python peer: %w", err)
		}
		defer cmd.Wait()
		defer in.Close()
		p := &peer{in: in, out: bufio.NewScanner(stdout)}
		if !p.out.Scan() || strings.TrimSpace(p.out.Text()) != "ready" {
			return fmt.Errorf("python peer did not start: %v", p.out.Err())
		}
		kMLP, pMLP, err := compare(p, "mlp", mlp, mlpData, train.Config{BatchSize: 32, Seed: 1, Loss: train.Loss{Type: "mse"},
			Optimizer: train.Optimizer{Type: "sgd", LR: 0.01, Momentum: 0.9}, ProgressEvery: 1 << 30}, *rounds)
		if err != nil {
			return err
		}
		kCNN, pCNN, err := compare(p, "cnn", cnn, digits, train.Config{BatchSize: 64, Seed: 1, Loss: train.Loss{Type: "cross_entropy"},
			Optimizer: train.Optimizer{Type: "adamw", LR: 3e-3}, ProgressEvery: 1 << 30}, *rounds)
		if err != nil {
			return err
		}
		resnet, digits16, err := loadResNet(resnetPath, tb, all)
		if err != nil {
			return err
		}
		defer resnet.Close()
		kRes, pRes, err := compare(p, "resnet", resnet, digits16, train.Config{BatchSize: 64, Seed: 1, Loss: train.Loss{Type: "cross_entropy"},
			Optimizer: train.Optimizer{Type: "adamw", LR: 1e-3}, Freeze: []string{"conv1.", "bn1.", "layer1."},
			ParamGroups: []train.ParamGroup{{Prefix: "fc.", LR: 1e-2}}, ProgressEvery: 1 << 30}, max(*rounds/2, 1))
		if err != nil {
			return err
		}

		fmt.Printf("training throughput, fastest of %d alternating epochs per side, libtorch %s, %d intra-op thread(s), %d CPUs\n\n",
			*rounds, core.TorchVersion(), *threads, runtime.NumCPU())
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "workload\tkiln samples/s\tpytorch samples/s\tratio\tkiln samples/cpu-s\tpytorch samples/cpu-s\tratio\ttarget\t")
		row := func(name string, k, p rate, target string) {
			fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.2fx\t%.0f\t%.0f\t%.2fx\t%s\t\n", name, k.wall, p.wall, k.wall/p.wall, k.cpu, p.cpu, k.cpu/p.cpu, target)
		}
		row("(a) MLP 8-10-1, MSE, SGD, batch 32", kMLP, pMLP, ">= 2x")
		row("(b) digits CNN, CE, AdamW, batch 64", kCNN, pCNN, ">= 1.5x")
		row("(c) fine-tune scripted ResNet-like, 16x16 digits, batch 64", kRes, pRes, ">= 1x")
		return tw.Flush()
	}
	if *rounds > 0 {
		if err := single(); err != nil {
			return err
		}
	}
	if *distEpochs <= 0 {
		return nil
	}

	// Distributed rows: Kiln's two ranks (two goroutines of this process,
	// each a c10d Gloo rank over loopback, as Config.Workers runs them)
	// next to PyTorch DDP's two ranks (torchrun, gloo), same models, data,
	// per-rank batch and intra-op threads, epochs alternating.
	buildTwice := func(build func() (*nn.Net, error)) ([2]*nn.Net, error) {
		var nets [2]*nn.Net
		for r := range 2 {
			n, err := build()
			if err != nil {
				return nets, err
			}
			nets[r] = n
		}
		return nets, nil
	}
	mlpWork := &distWork{ds: mlpData, cfg: train.Config{BatchSize: 32, Seed: 1, Loss: train.Loss{Type: "mse"},
		Optimizer: train.Optimizer{Type: "sgd", LR: 0.01, Momentum: 0.9}, ProgressEvery: 1 << 30}}
	if mlpWork.nets, err = buildTwice(func() (*nn.Net, error) {
		return nn.Build(nn.Sequential(nn.Linear(10), nn.ReLU(), nn.Linear(1)), 8, 1)
	}); err != nil {
		return err
	}
	cnnWork := &distWork{ds: digits, cfg: train.Config{BatchSize: 64, Seed: 1, Loss: train.Loss{Type: "cross_entropy"},
		Optimizer: train.Optimizer{Type: "adamw", LR: 3e-3}, ProgressEvery: 1 << 30}}
	if cnnWork.nets, err = buildTwice(func() (*nn.Net, error) { return nn.BuildWithPrelude(cnnSpec, pre.Prelude(), 1) }); err != nil {
		return err
	}
	for _, w := range []*distWork{mlpWork, cnnWork} {
		for _, n := range w.nets {
			if n != nil {
				defer n.Close()
			}
		}
	}
	kr, err := newKilnRanks()
	if err != nil {
		return fmt.Errorf("kiln ranks: %w", err)
	}
	defer kr.close()
	peer, err := startDDPPeer(tab, rows, *threads, filepath.Join(tmp, "digits.csv"))
	if err != nil {
		return err
	}
	defer peer.close()
	k, pt, err := distCompare(kr, peer, mlpWork, cnnWork, *distEpochs, *distOnly)
	if err != nil {
		return err
	}
	fmt.Printf("\ndistributed: 2 ranks on this machine (Gloo over loopback), fastest of %d alternating epochs per side, global samples/s\n", *distEpochs)
	fmt.Printf("intra-op threads per rank: kiln %s, pytorch %s (OMP_NUM_THREADS: kiln %q, pytorch ranks %q); OPENBLAS_NUM_THREADS=%s both\n\n",
		k.threads, pt.threads, k.ompThreads, pt.ompThreads, os.Getenv("OPENBLAS_NUM_THREADS"))
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "workload\tkiln 2 ranks\tpytorch DDP 2 ranks\tratio\ttarget\t")
	drow := func(name string, k, p float64, unit, target string) {
		fmt.Fprintf(tw, "%s\t%.2f %s\t%.2f %s\t%.2fx\t%s\t\n", name, k, unit, p, unit, k/p, target)
	}
	drow("(a) MLP 8-10-1, SGD, batch 32/rank", k.mlp, pt.mlp, "samples/s", ">= 1.5x")
	drow("(b) digits CNN, AdamW, batch 64/rank", k.cnn, pt.cnn, "samples/s", ">= 1x")
	drow(fmt.Sprintf("all-reduce of a %d MiB float32 bucket", k.bytes>>20), k.allreduce, pt.allreduce, "GB/s", "")
	return tw.Flush()
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench/train:", err)
		os.Exit(1)
	}
}

// loadResNet adopts the scripted ResNet-like model peer.py wrote and
// returns it with the digits upsampled to 16×16 as resnet.py's digits16
// does (pixel/16, each pixel repeated 2×2), from the digits table.
func loadResNet(path string, tb *data.Table, rows []int) (*nn.Net, *data.Dataset, error) {
	pre, err := data.Fit(tb, rows, data.Options{Target: "digit", Task: data.Classification, Scale: "none"})
	if err != nil {
		return nil, nil, err
	}
	x8, err := pre.EncodeFeatures(tb, rows)
	if err != nil {
		return nil, nil, err
	}
	y, err := pre.EncodeTarget(tb, rows)
	if err != nil {
		return nil, nil, err
	}
	x := make([]float32, len(rows)*256)
	for i := range rows {
		for r := range 16 {
			for c := range 16 {
				x[i*256+r*16+c] = x8[i*64+(r/2)*8+c/2] / 16
			}
		}
	}
	ds, err := data.NewDataset(x, 256, y)
	if err != nil {
		return nil, nil, err
	}
	m, err := modelpkg.LoadModule(path)
	if err != nil {
		return nil, nil, err
	}
	net, err := nn.Adopt(m, []int64{1, 16, 16})
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	return net, ds, nil
}
