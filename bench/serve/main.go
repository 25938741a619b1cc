// Command serve benchmarks Kiln's model server: throughput and p50/p99
// latency of one-row requests at concurrency 1, 8 and 64, for an MLP and a
// small CNN, over gRPC and HTTP, next to
//
//   - the ceiling: raw core.Module.Forward, no server, at the batch size the
//     server's dynamic batcher formed on average in that run, on as many
//     goroutines as the model has instances, with the same intra-op threads;
//   - TorchServe (PyPI torchserve, build/torchserve-venv) serving the same
//     TorchScript files with its batching on (batchSize 64, maxBatchDelay
//     1 ms, 2 workers of 1 thread, like Kiln's 2 instances).
//
// The load generator runs in this process; Kiln's server too (loopback
// gRPC/HTTP), TorchServe as child processes. One run, one table.
//
//	go run ./bench/serve [-duration 5s] [-concurrency 1,8,64] [-torchserve DIR]
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// model is one benchmarked model: its name in the repository and the shape
// of one row.
type model struct {
	name string
	row  []int64
}

var models = []model{{"mlp", []int64{784}}, {"cnn", []int64{3, 32, 32}}}

func (m model) rowElems() int {
	n := 1
	for _, d := range m.row {
		n *= int(d)
	}
	return n
}

// result is one load run.
type result struct {
	requests  int
	errors    int
	firstErr  error
	elapsed   time.Duration
	latencies []time.Duration // sorted
	meanBatch float64         // Kiln only: rows per execution
}

func (r result) rps() float64 { return float64(r.requests) / r.elapsed.Seconds() }

func (r result) pct(p float64) time.Duration {
	if len(r.latencies) == 0 {
		return 0
	}
	return r.latencies[min(len(r.latencies)-1, int(p*float64(len(r.latencies))))]
}

// load runs c workers calling do for warm (discarded), then for dur.
func load(c int, warm, dur time.Duration, do func(worker int) error) result {
	var mu sync.Mutex
	var res result
	var wg sync.WaitGroup
	start := time.Now()
	measureFrom, end := start.Add(warm), start.Add(warm+dur)
	for w := range c {
		wg.Go(func() {
			var lat []time.Duration
			var n, errs int
			var first error
			for {
				t0 := time.Now()
				if !t0.Before(end) {
					break
				}
				err := do(w)
				t1 := time.Now()
				if t0.Before(measureFrom) || t1.After(end) {
					continue
				}
				if err != nil {
					errs++
					if first == nil {
						first = err
					}
					continue
				}
				n++
				lat = append(lat, t1.Sub(t0))
			}
			mu.Lock()
			res.requests += n
			res.errors += errs
			if res.firstErr == nil {
				res.firstErr = first
			}
			res.latencies = append(res.latencies, lat...)
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = dur
	slices.Sort(res.latencies)
	return res
}

func randomRow(m model, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, 4*m.rowElems())
	for i := 0; i < len(b); i += 4 {
		binary.LittleEndian.PutUint32(b[i:], math.Float32bits(rng.Float32()))
	}
	return b
}

func python() string {
	if p := os.Getenv("KILN_PYTHON"); p != "" {
		return p
	}
	if _, err := os.Stat(".venv/bin/python"); err == nil {
		return ".venv/bin/python"
	}
	return "/usr/bin/python3"
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench/serve:", err)
		os.Exit(1)
	}
}

func main() {
	dur := flag.Duration("duration", 5*time.Second, "measured time per cell (after 1 s of warm-up)")
	concFlag := flag.String("concurrency", "1,8,64", "comma-separated client concurrencies")
	out := flag.String("out", "build/bench-serve", "work directory (models, TorchServe store and logs)")
	tsDir := flag.String("torchserve", "build/torchserve-venv", "virtualenv with torchserve and torch-model-archiver")
	install := flag.Bool("install-torchserve", true, "create the -torchserve virtualenv (Debian python3 with its torch, pip torchserve "+torchServeVersion+") when missing")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the Kiln runs to this file")
	flag.Parse()
	if abs, err := filepath.Abs(*tsDir); err == nil {
		*tsDir = abs
	}
	var concs []int
	for _, s := range strings.Split(*concFlag, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(s))
		must(err)
		concs = append(concs, c)
	}
	warm := time.Second

	archiver := filepath.Join(*tsDir, "bin", "torch-model-archiver")
	tsNote := ""
	if _, err := os.Stat(filepath.Join(*tsDir, "bin", "torchserve")); err != nil && *install {
		if err := installTorchServe(*tsDir); err != nil {
			tsNote = "not measured: installing it failed: " + err.Error()
		}
	}
	if _, err := os.Stat(filepath.Join(*tsDir, "bin", "torchserve")); err != nil && tsNote == "" {
		tsNote = fmt.Sprintf("not measured: no %s/bin/torchserve (run without -install-torchserve=false to install it)", *tsDir)
	}
	if tsNote != "" {
		archiver = ""
	}
	args := []string{"bench/serve/make_models.py", *out}
	if archiver != "" {
		args = append(args, archiver)
	}
	cmd := exec.Command(python(), args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	must(cmd.Run())

	type key struct {
		model, server string
		c             int
	}
	results := map[key]result{}
	ceilings := map[key]float64{}

	// Kiln.
	srv, err := serving.New(serving.Options{
		ModelRepository: filepath.Join(*out, "repo"), GRPCAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0",
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	must(err)
	must(srv.Start(context.Background()))
	threads := core.NumThreads()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		must(err)
		must(pprof.StartCPUProfile(f))
	}
	conns := make([]*grpc.ClientConn, 4)
	for i := range conns {
		conns[i], err = grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		must(err)
	}
	httpc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 256}}
	httpURL := "http://" + srv.HTTPAddr().String()
	instances := 0
	var modules []*core.Module
	for _, m := range models {
		v, err := srv.Manager().Acquire(m.name, "")
		must(err)
		instances = v.Config().Instances()
		v.Release()
		mod, err := core.LoadModule(filepath.Join(*out, "repo", m.name, "1", "model.pt"))
		must(err)
		modules = append(modules, mod)
		for _, c := range concs {
			for _, proto := range []string{"kiln gRPC", "kiln HTTP"} {
				v, err := srv.Manager().Acquire(m.name, "")
				must(err)
				before := v.Stats().Snapshot()
				var do func(int) error
				if proto == "kiln gRPC" {
					reqs := make([]*pb.ModelInferRequest, c)
					for w := range c {
						reqs[w] = &pb.ModelInferRequest{ModelName: m.name,
							Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: append([]int64{1}, m.row...)}},
							RawInputContents: [][]byte{randomRow(m, uint64(w))}}
					}
					do = func(w int) error {
						resp, err := pb.NewGRPCInferenceServiceClient(conns[w%len(conns)]).ModelInfer(context.Background(), reqs[w])
						if err != nil {
							return err
						}
						if len(resp.RawOutputContents) != 1 || len(resp.RawOutputContents[0]) != 40 {
							return errors.New("wrong output size")
						}
						return nil
					}
				} else {
					bodies := make([][]byte, c)
					hdrLen := ""
					for w := range c {
						shape := append([]int64{1}, m.row...)
						hdr, _ := json.Marshal(map[string]any{
							"inputs":  []any{map[string]any{"name": "x", "datatype": "FP32", "shape": shape, "parameters": map[string]any{"binary_data_size": 4 * m.rowElems()}}},
							"outputs": []any{map[string]any{"name": "y", "parameters": map[string]any{"binary_data": true}}}})
						hdrLen = strconv.Itoa(len(hdr))
						bodies[w] = append(hdr, randomRow(m, uint64(w))...)
					}
					url := httpURL + "/v2/models/" + m.name + "/infer"
					do = func(w int) error {
						req, _ := http.NewRequest("POST", url, bytes.NewReader(bodies[w]))
						req.Header.Set("Inference-Header-Content-Length", hdrLen)
						return httpDo(httpc, req)
					}
				}
				r := load(c, warm, *dur, do)
				after := v.Stats().Snapshot()
				v.Release()
				if ex := after.ExecutionCount - before.ExecutionCount; ex > 0 {
					r.meanBatch = float64(after.InferenceCount-before.InferenceCount) / float64(ex)
				}
				results[key{m.name, proto, c}] = r
				fmt.Fprintf(os.Stderr, "%s c=%d %s: %.0f req/s, mean batch %.1f, %d errors\n", m.name, c, proto, r.rps(), r.meanBatch, r.errors)
				if proto == "kiln gRPC" {
					// The ceiling right after, under the same machine load,
					// the server idle.
					b := max(1, int(math.Round(r.meanBatch)))
					ceilings[key{m.name, "", c}] = ceiling(mod, m, b, instances, *dur/2)
				}
			}
		}
	}
	for _, c := range conns {
		c.Close()
	}
	for _, m := range modules {
		m.Close()
	}
	must(srv.Shutdown(context.Background()))
	if *cpuProfile != "" {
		pprof.StopCPUProfile()
	}

	// TorchServe.
	if tsNote == "" {
		tsNote = runTorchServe(*tsDir, *out, concs, warm, *dur, func(m model, c int, r result) {
			results[key{m.name, "TorchServe", c}] = r
			fmt.Fprintf(os.Stderr, "%s c=%d TorchServe: %.0f req/s, %d errors\n", m.name, c, r.rps(), r.errors)
		})
	}

	// The table.
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "model\tconc\tserver\treq/s\tp50 ms\tp99 ms\tmean batch\tceiling rows/s\t% of ceiling\tvs TorchServe\terrors\t")
	for _, m := range models {
		for _, c := range concs {
			ceil := ceilings[key{m.name, "", c}]
			ts, haveTS := results[key{m.name, "TorchServe", c}]
			for _, server := range []string{"kiln gRPC", "kiln HTTP", "TorchServe"} {
				r, ok := results[key{m.name, server, c}]
				if !ok {
					continue
				}
				batch, ofCeil, vsTS := "-", "-", "-"
				if r.meanBatch > 0 {
					batch = fmt.Sprintf("%.1f", r.meanBatch)
				}
				if ceil > 0 {
					ofCeil = fmt.Sprintf("%.0f%%", 100*r.rps()/ceil)
				}
				if haveTS && ts.rps() > 0 && server != "TorchServe" {
					vsTS = fmt.Sprintf("%.1f×", r.rps()/ts.rps())
				}
				errs := strconv.Itoa(r.errors)
				if r.firstErr != nil {
					errs += " (" + firstLine(r.firstErr.Error()) + ")"
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%.0f\t%.2f\t%.2f\t%s\t%.0f\t%s\t%s\t%s\t\n", m.name, c, server, r.rps(),
					ms(r.pct(0.50)), ms(r.pct(0.99)), batch, ceil, ofCeil, vsTS, errs)
			}
		}
	}
	tw.Flush()
	fmt.Printf("\nOne-row FP32 requests; %v measured per cell after 1 s warm-up; load generator and Kiln in one process on %d CPUs (%s/%s), loopback.\n",
		*dur, runtime.NumCPU(), runtime.GOOS, runtime.GOARCH)
	fmt.Printf("Kiln: libtorch %s, %d instances × %d intra-op (and OpenBLAS) threads, dynamic batching max_batch_size 64, max_queue_delay_us 100.\n",
		core.TorchVersion(), instances, threads)
	fmt.Printf("ceiling: core.Module.Forward at the kiln gRPC run's mean batch size (rounded), %d goroutines, measured right after that run with the server idle, rows/s.\n", instances)
	fmt.Printf("mlp: 784-512-256-10 MLP; cnn: 3x32x32 conv16-pool-conv32-pool-fc128-fc10.\n")
	fmt.Println("TorchServe:", tsNote)
}

// torchServeVersion is the PyPI release of torchserve and
// torch-model-archiver the benchmark installs.
const torchServeVersion = "0.12.0"

// installTorchServe creates venv over /usr/bin/python3 (whose system
// packages hold the torch that matches Kiln's libtorch) and pip-installs
// torchserve and torch-model-archiver into it.
func installTorchServe(venv string) error {
	fmt.Fprintf(os.Stderr, "bench/serve: installing torchserve %s into %s\n", torchServeVersion, venv)
	steps := [][]string{
		{"/usr/bin/python3", "-m", "venv", "--system-site-packages", venv},
		{filepath.Join(venv, "bin", "pip"), "install", "-q", "torchserve==" + torchServeVersion, "torch-model-archiver==" + torchServeVersion},
		{filepath.Join(venv, "bin", "python"), "-c", "import torch, ts"},
	}
	for _, st := range steps {
		out, err := exec.Command(st[0], st[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(st, " "), err, firstLine(strings.TrimSpace(string(out))))
		}
	}
	return nil
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > 60 {
		s = s[:60] + "…"
	}
	return s
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func httpDo(c *http.Client, req *http.Request) error {
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("HTTP %d: %s", resp.StatusCode, body)
	}
	if n := len(body); n < 40 {
		return fmt.Errorf("short response (%d bytes)", n)
	}
	return nil
}

// ceiling returns the rows per second of Forward on batches of b rows,
// from `instances` goroutines at once, over about dur.
func ceiling(mod *core.Module, m model, b, instances int, dur time.Duration) float64 {
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	var elapsed time.Duration
	for g := range instances {
		wg.Go(func() {
			row := randomRow(m, uint64(g))
			data := make([]float32, 0, b*m.rowElems())
			for range b {
				for i := 0; i < len(row); i += 4 {
					data = append(data, math.Float32frombits(binary.LittleEndian.Uint32(row[i:])))
				}
			}
			x, err := core.NewTensor(data, append([]int64{int64(b)}, m.row...)...)
			must(err)
			defer x.Close()
			for range 20 { // warm-up
				outs, err := mod.Forward(x)
				must(err)
				core.CloseAll(outs)
			}
			n := 0
			t0 := time.Now()
			for time.Since(t0) < dur {
				outs, err := mod.Forward(x)
				must(err)
				core.CloseAll(outs)
				n++
			}
			el := time.Since(t0)
			mu.Lock()
			total += n * b
			elapsed = max(elapsed, el)
			mu.Unlock()
		})
	}
	wg.Wait()
	return float64(total) / elapsed.Seconds()
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// runTorchServe starts TorchServe on the archives make_models.py wrote,
// loads it like Kiln, and returns the table's footnote (its version and
// settings, or why it could not be measured).
func runTorchServe(venv, out string, concs []int, warm, dur time.Duration, record func(model, int, result)) string {
	dir, err := filepath.Abs(filepath.Join(out, "ts"))
	must(err)
	must(os.MkdirAll(dir, 0o755))
	store, err := filepath.Abs(filepath.Join(out, "store"))
	must(err)
	inf, mgmt, met := freePort(), freePort(), freePort()
	modelsJSON := map[string]any{}
	var mars []string
	for _, m := range models {
		mars = append(mars, m.name+".mar")
		modelsJSON[m.name] = map[string]any{"1.0": map[string]any{"defaultVersion": true, "marName": m.name + ".mar",
			"minWorkers": 2, "maxWorkers": 2, "batchSize": 64, "maxBatchDelay": 1, "responseTimeout": 120}}
	}
	mj, _ := json.Marshal(modelsJSON)
	cfg := fmt.Sprintf(`inference_address=http://127.0.0.1:%d
management_address=http://127.0.0.1:%d
metrics_address=http://127.0.0.1:%d
disable_token_authorization=true
default_workers_per_model=2
model_store=%s
load_models=%s
models=%s
`, inf, mgmt, met, store, strings.Join(mars, ","), mj)
	cfgPath := filepath.Join(dir, "config.properties")
	must(os.WriteFile(cfgPath, []byte(cfg), 0o644))
	logPath := filepath.Join(dir, "torchserve.log")
	logf, err := os.Create(logPath)
	must(err)
	defer logf.Close()
	ver, _ := exec.Command(filepath.Join(venv, "bin", "python"), "-c", "import ts.version as v; print(v.__version__)").Output()
	cmd := exec.Command(filepath.Join(venv, "bin", "torchserve"), "--foreground", "--ncs", "--ts-config", cfgPath, "--model-store", store)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// OPENBLAS_NUM_THREADS=1: torch.set_num_threads(1) in the handler does
	// not bound OpenBLAS's own pool, whose idle threads spin; Kiln bounds it
	// to its intra-op threads (1 here) the same way.
	cmd.Env = append(os.Environ(), "LOG_LOCATION="+dir, "METRICS_LOCATION="+dir, "OPENBLAS_NUM_THREADS=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Sprintf("not measured: starting %s: %v", cmd.Path, err)
	}
	defer func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) // torchserve, its JVM and Python workers
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	}()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 256}, Timeout: 120 * time.Second}
	post := func(m model, body []byte) error {
		req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/predictions/%s", inf, m.name), bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/octet-stream")
		return httpDo(client, req)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for _, m := range models {
		row := randomRow(m, 0)
		for {
			err := post(m, row)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Sprintf("not measured: model %s never answered (last error: %v); see %s", m.name, firstLine(err.Error()), logPath)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	for _, m := range models {
		for _, c := range concs {
			rows := make([][]byte, c)
			for w := range c {
				rows[w] = randomRow(m, uint64(w))
			}
			record(m, c, load(c, warm, dur, func(w int) error { return post(m, rows[w]) }))
		}
	}
	return fmt.Sprintf("torchserve %s (PyPI, JVM %s) over REST, same TorchScript files, handler bench/serve/make_models.py, 2 workers × 1 thread (OPENBLAS_NUM_THREADS=1), batchSize 64, maxBatchDelay 1 ms; log %s.",
		strings.TrimSpace(string(ver)), javaVersion(), logPath)
}

func javaVersion() string {
	out, err := exec.Command("java", "-version").CombinedOutput()
	if err != nil {
		return "unknown"
	}
	return firstLine(string(out))
}
