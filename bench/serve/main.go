// Command serve benchmarks Kiln's model server: throughput, p50/p99 latency
// and CPU per request of one-row requests at concurrency 1, 8 and 64, for an
// MLP and a small CNN, over gRPC (ModelInfer, and ModelStreamInfer with one
// stream per worker) and HTTP, next to
//
//   - the ceiling: raw core.Module.Forward of the module optimized as the
//     server optimizes it (OptimizeForInference), no server and no load
//     generator, at the batch size the server's dynamic batcher formed on
//     average in that cell, on as many goroutines as the model has
//     instances, with the same intra-op threads, on the same CPUs;
//   - TorchServe (PyPI torchserve, build/torchserve-venv) serving the same
//     TorchScript files with its batching on (batchSize 64, maxBatchDelay
//     1 ms, 2 workers of 1 thread, like Kiln's 2 instances).
//   - MLServer (PyPI mlserver, build/mlserver-venv from
//     bench/serve/requirements-mlserver.txt), the second KServe V2 peer:
//     the same TorchScript files in a custom runtime
//     (bench/serve/mlserver_runtime.py), adaptive batching
//     (max_batch_size 64, max_batch_time 1 ms), 2 parallel workers of 1
//     thread, loaded over unary gRPC with the same ModelInfer messages as
//     Kiln's gRPC rows.
//   - the grpc-go floor (-servers floor, serveFloor): a plain grpc-go
//     server in its own child process that answers ModelInfer and
//     ModelStreamInfer with a prebuilt response and runs no model, so
//     that the table shows what grpc-go and protobuf alone cost per
//     request; Kiln's overhead cannot go under it.
//
// The load generator runs in this process; Kiln's server runs in a child
// process (this program again, with -serve-child: serving.New on loopback
// gRPC/HTTP), TorchServe and MLServer as child processes too, so that each server's CPU
// time is counted alone, from /proc/PID/stat (utime+stime of every thread,
// over the measured window), apart from the load generator's (getrusage of
// this process). The load generator reuses one request message (or body)
// per worker and shares one gRPC connection (-conns) so that its own cost
// per request stays low: on a small machine it competes with the server
// for the same cores. The table gives, per answered request, the server's
// CPU µs, the client's, and the server's overhead: its CPU µs less the
// forward's core-µs per row at the batch size the server formed (the
// ceiling row's figure). One run, one table.
//
//	go run ./bench/serve [-duration 5s] [-concurrency 1,8,64] [-models mlp,cnn]
//	    [-servers grpc,stream,http,single,floor,torchserve,mlserver] [-conns 1] [-torchserve DIR] [-mlserver DIR] [-cpuprofile FILE]
//
// "single" is ModelInfer over the HTTP port with serving.Config.SinglePort
// (gRPC through net/http's HTTP/2 server and grpc-go's ServeHTTP) next to
// "grpc" (grpc-go's own transport on the gRPC port).
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
	"github.com/kilnml/kiln/internal/loadgen"
	"github.com/kilnml/kiln/internal/testkit"
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
	loadgen.Result
	meanBatch float64       // Kiln only: rows per execution
	cpu       time.Duration // this process's (the client's) CPU time (user+system) in the measured window
	serverCPU time.Duration // the server processes' CPU time in the measured window
}

// cpuPerReq is the client's CPU time per answered request, in µs.
func (r result) cpuPerReq() float64 {
	if r.Requests == 0 {
		return 0
	}
	return float64(r.cpu.Microseconds()) / float64(r.Requests)
}

// serverPerReq is the server's CPU time per answered request, in µs.
func (r result) serverPerReq() float64 {
	if r.Requests == 0 {
		return 0
	}
	return float64(r.serverCPU.Microseconds()) / float64(r.Requests)
}

// pidCPU is the CPU time (user+system, all threads) of process pid so far,
// from /proc (in USER_HZ ticks, 10 ms on Linux).
func pidCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+st) * (time.Second / 100)
}

// groupCPU is the CPU time (user+system) of the live processes in process
// group pgid (TorchServe's JVM and its Python workers), from /proc.
func groupCPU(pgid int) time.Duration {
	ents, _ := os.ReadDir("/proc")
	var ticks int64
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// Fields after the command (which may hold spaces) in ")":
		// state ppid pgrp session tty tpgid flags minflt cminflt majflt
		// cmajflt utime stime.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 13 {
			continue
		}
		if pg, _ := strconv.Atoi(f[2]); pg != pgid {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		ticks += u + st
	}
	return time.Duration(ticks) * (time.Second / 100) // USER_HZ is 100 on Linux
}

// processCPU is the CPU time (user+system) this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// load runs c workers calling do for warm (discarded), then for dur
// (loadgen.RunMarked).
//
// The result's cpu is this process's CPU time in the measured window, its
// serverCPU serverCPU's (the server's processes).
func load(c int, warm, dur time.Duration, serverCPU func() time.Duration, do func(worker int) error) result {
	var c0, s0, cpu, scpu time.Duration
	res := loadgen.RunMarked(c, warm, dur, func(begin bool) {
		if begin {
			c0, s0 = processCPU(), serverCPU()
			return
		}
		cpu, scpu = processCPU()-c0, serverCPU()-s0
	}, do)
	return result{Result: res, cpu: cpu, serverCPU: scpu}
}

func randomRow(m model, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, 4*m.rowElems())
	for i := 0; i < len(b); i += 4 {
		binary.LittleEndian.PutUint32(b[i:], math.Float32bits(rng.Float32()))
	}
	return b
}

// archive writes TorchServe archives of the models in out/repo (mlp and
// cnn, version 1) into out/store, with torchserve_handler.py as their
// handler and each model's input shape in shape.json.
func archive(archiver, out string) error {
	handler := filepath.Join(testkit.Root(), "bench", "serve", "torchserve_handler.py")
	for _, m := range models {
		work := filepath.Join(out, "ts-src", m.name)
		if err := os.MkdirAll(work, 0o755); err != nil {
			return err
		}
		shape, err := json.Marshal(m.row)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(work, "shape.json"), shape, 0o644); err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Join(out, "store"), 0o755); err != nil {
			return err
		}
		cmd := exec.Command(archiver, "--model-name", m.name, "--version", "1.0",
			"--serialized-file", filepath.Join(out, "repo", m.name, "1", "model.pt"),
			"--handler", handler, "--extra-files", filepath.Join(work, "shape.json"),
			"--export-path", filepath.Join(out, "store"), "--force")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("torch-model-archiver %s: %w", m.name, err)
		}
	}
	return nil
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench/serve:", err)
		os.Exit(1)
	}
}

// serveChild is the -serve-child mode: Kiln's server over repo on loopback
// ports; it prints "GRPC_ADDR HTTP_ADDR THREADS INSTANCES" on one line, then
// serves until its standard input closes.
func serveChild(repo, cpuProfile string, single bool) {
	cfg := serving.DefaultConfig()
	cfg.SinglePort = single
	cfg.ModelRepository = repo
	cfg.Host, cfg.GRPCPort, cfg.HTTPPort = "127.0.0.1", 0, 0
	cfg.MetricsPort, cfg.FlightPort = serving.PortOff, serving.PortOff
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	srv, err := serving.New(cfg)
	must(err)
	must(srv.Start(context.Background()))
	if cpuProfile != "" {
		f, err := os.Create(cpuProfile)
		must(err)
		must(pprof.StartCPUProfile(f))
	}
	v, err := srv.Manager().Acquire(models[0].name, "")
	must(err)
	instances := v.Config().Instances()
	v.Release()
	fmt.Printf("%s %s %d %d\n", srv.GRPCAddr(), srv.HTTPAddr(), core.NumThreads(), instances)
	io.Copy(io.Discard, os.Stdin)
	if cpuProfile != "" {
		pprof.StopCPUProfile()
	}
	must(srv.Shutdown(context.Background()))
}

// serverChild is a running -serve-child process: Kiln's server or the
// grpc-go floor.
type serverChild struct {
	cmd                *exec.Cmd
	stdin              io.WriteCloser
	grpcAddr, httpAddr string
	threads, instances int
}

func startKiln(repo, cpuProfile string, single bool) (*serverChild, error) {
	return startChild("-serve-child", "-out", filepath.Dir(repo), "-cpuprofile", cpuProfile, "-servers", map[bool]string{true: "single", false: "grpc"}[single])
}

// startChild starts this program again with args and reads the line the
// child prints once it serves.
func startChild(args ...string) (*serverChild, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, args...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	k := &serverChild{cmd: cmd, stdin: stdin}
	if _, err := fmt.Fscan(stdout, &k.grpcAddr, &k.httpAddr, &k.threads, &k.instances); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("the server child %v did not start: %w", args, err)
	}
	return k, nil
}

func (k *serverChild) cpu() time.Duration { return pidCPU(k.cmd.Process.Pid) }

func (k *serverChild) stop() error {
	k.stdin.Close()
	return k.cmd.Wait()
}

// statistics returns a model's inference and execution counts from the
// server's ModelStatistics.
func statistics(c pb.GRPCInferenceServiceClient, name string) (inferences, executions uint64) {
	resp, err := c.ModelStatistics(context.Background(), &pb.ModelStatisticsRequest{Name: name})
	must(err)
	for _, s := range resp.ModelStats {
		inferences += s.InferenceCount
		executions += s.ExecutionCount
	}
	return inferences, executions
}

func main() {
	dur := flag.Duration("duration", 5*time.Second, "measured time per cell (after 1 s of warm-up)")
	concFlag := flag.String("concurrency", "1,8,64", "comma-separated client concurrencies")
	out := flag.String("out", "build/bench-serve", "work directory (models, TorchServe store and logs)")
	tsDir := flag.String("torchserve", "build/torchserve-venv", "virtualenv with torchserve and torch-model-archiver")
	install := flag.Bool("install-torchserve", true, "create the -torchserve virtualenv (Debian python3 with its torch, pip torchserve "+torchServeVersion+") when missing")
	mlsDir := flag.String("mlserver", "build/mlserver-venv", "virtualenv with mlserver")
	installMLS := flag.Bool("install-mlserver", true, "create the -mlserver virtualenv (Debian python3 with its torch, pip -r bench/serve/requirements-mlserver.txt) when missing")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the Kiln runs to this file")
	modelFlag := flag.String("models", "mlp,cnn", "comma-separated models to run (mlp, cnn)")
	serverFlag := flag.String("servers", "grpc,stream,http,floor,torchserve,mlserver", "comma-separated servers to run: grpc (Kiln ModelInfer), stream (Kiln ModelStreamInfer), http (Kiln REST), single (ModelInfer on the single port), floor (ModelInfer and ModelStreamInfer on a grpc-go server that answers without a model), torchserve, mlserver")
	nconns := flag.Int("conns", 1, "gRPC client connections the workers share (worker i uses connection i mod conns)")
	child := flag.Bool("serve-child", false, "internal: run only Kiln's server over -out/repo (see serveChild)")
	flag.Parse()
	if *child {
		if *serverFlag == "floor" {
			serveFloor()
			return
		}
		serveChild(filepath.Join(*out, "repo"), *cpuProfile, strings.Contains(*serverFlag, "single"))
		return
	}
	models = slices.DeleteFunc(models, func(m model) bool { return !slices.Contains(strings.Split(*modelFlag, ","), m.name) })
	servers := strings.Split(*serverFlag, ",")
	if abs, err := filepath.Abs(*tsDir); err == nil {
		*tsDir = abs
	}
	if abs, err := filepath.Abs(*mlsDir); err == nil {
		*mlsDir = abs
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
	must(testkit.MakeFixture("bench-serve", filepath.Join(*out, "repo")))
	if archiver != "" {
		must(archive(archiver, *out))
	}

	type key struct {
		model, server string
		c             int
	}
	results := map[key]result{}
	type ceil struct {
		rows      float64 // rows/s
		cpuPerRow float64 // CPU µs per row
		batch     int
	}
	ceilings := map[key]ceil{}

	// Kiln, in a child process (the profile, if any, is the server's).
	var err error
	if *cpuProfile != "" {
		*cpuProfile, err = filepath.Abs(*cpuProfile)
		must(err)
	}
	outAbs, err := filepath.Abs(*out)
	must(err)
	single := slices.Contains(servers, "single")
	kiln, err := startKiln(filepath.Join(outAbs, "repo"), *cpuProfile, single)
	must(err)
	threads, instances := kiln.threads, kiln.instances
	var floor *serverChild
	var floorConns []*grpc.ClientConn
	if slices.Contains(servers, "floor") {
		floor, err = startChild("-serve-child", "-servers", "floor")
		must(err)
		floorConns = make([]*grpc.ClientConn, *nconns)
		for i := range floorConns {
			floorConns[i], err = grpc.NewClient(floor.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			must(err)
		}
		servers = append(servers, "floor-stream")
	}
	must(core.SetNumThreads(threads)) // the ceiling's forward, like the server's
	conns := make([]*grpc.ClientConn, *nconns)
	for i := range conns {
		conns[i], err = grpc.NewClient(kiln.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		must(err)
	}
	singleConns := make([]*grpc.ClientConn, *nconns)
	if single {
		for i := range singleConns {
			singleConns[i], err = grpc.NewClient(kiln.httpAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			must(err)
		}
	}
	statsClient := pb.NewGRPCInferenceServiceClient(conns[0])
	httpc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 256}}
	httpURL := "http://" + kiln.httpAddr
	var modules []*core.Module
	protos := map[string]string{"grpc": "kiln gRPC", "stream": "kiln gRPC stream", "http": "kiln HTTP", "single": "kiln gRPC single port",
		"floor": "grpc-go floor", "floor-stream": "grpc-go floor stream"}
	for _, m := range models {
		mod, err := core.LoadModule(filepath.Join(*out, "repo", m.name, "1", "model.pt"))
		must(err)
		must(mod.OptimizeForInference()) // what the server runs (optimize_for_inference, its default)
		modules = append(modules, mod)
		for _, c := range concs {
			for _, s := range servers {
				proto, ok := protos[s]
				if !ok {
					continue
				}
				isFloor := strings.HasPrefix(s, "floor")
				var inf0, ex0 uint64
				if !isFloor {
					inf0, ex0 = statistics(statsClient, m.name)
				}
				var do func(int) error
				var cleanup func()
				serverCPU := kiln.cpu
				switch s {
				case "grpc", "stream", "single", "floor", "floor-stream":
					reqs := inferRequests(m, c)
					cs := conns
					switch {
					case s == "single":
						cs = singleConns
					case isFloor:
						cs, serverCPU = floorConns, floor.cpu
					}
					if s == "grpc" || s == "single" || s == "floor" {
						do = unaryDo(cs, reqs)
						break
					}
					// A ModelStreamInfer stream per worker, one request in
					// flight on each.
					ctx, cancel := context.WithCancel(context.Background())
					cleanup = cancel
					streams := make([]pb.GRPCInferenceService_ModelStreamInferClient, c)
					for w := range c {
						streams[w], err = pb.NewGRPCInferenceServiceClient(cs[w%len(cs)]).ModelStreamInfer(ctx)
						must(err)
					}
					do = func(w int) error {
						if err := streams[w].Send(reqs[w]); err != nil {
							return err
						}
						resp, err := streams[w].Recv()
						if err != nil {
							return err
						}
						if resp.ErrorMessage != "" {
							return errors.New(resp.ErrorMessage)
						}
						return checkResponse(resp.InferResponse)
					}
				case "http":
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
				r := load(c, warm, *dur, serverCPU, do)
				if cleanup != nil {
					cleanup()
				}
				if !isFloor {
					inf1, ex1 := statistics(statsClient, m.name)
					if ex := ex1 - ex0; ex > 0 {
						r.meanBatch = float64(inf1-inf0) / float64(ex)
					}
				}
				results[key{m.name, proto, c}] = r
				fmt.Fprintf(os.Stderr, "%s c=%d %s: %.0f req/s, mean batch %.1f, server %.0f µs CPU/req, client %.0f, %d errors\n", m.name, c, proto, r.RPS(), r.meanBatch, r.serverPerReq(), r.cpuPerReq(), r.Errors)
				if _, done := ceilings[key{m.name, "", c}]; !done && !isFloor {
					// The ceiling right after the first Kiln run of this
					// cell, at the batch size the server formed, the server
					// idle.
					b := max(1, int(math.Round(r.meanBatch)))
					rows, cpu := ceiling(mod, m, b, instances, *dur/2)
					ceilings[key{m.name, "", c}] = ceil{rows, cpu, b}
				}
			}
		}
	}
	for _, c := range slices.Concat(conns, singleConns, floorConns) {
		if c != nil {
			c.Close()
		}
	}
	if floor != nil {
		must(floor.stop())
	}
	for _, m := range modules {
		m.Close()
	}
	must(kiln.stop())

	// TorchServe.
	if !slices.Contains(servers, "torchserve") {
		tsNote = "not run (-servers)"
	} else if tsNote == "" {
		tsNote = runTorchServe(*tsDir, *out, concs, warm, *dur, func(m model, c int, r result) {
			results[key{m.name, "TorchServe", c}] = r
			fmt.Fprintf(os.Stderr, "%s c=%d TorchServe: %.0f req/s, %d errors\n", m.name, c, r.RPS(), r.Errors)
		})
	}

	// MLServer.
	mlsNote := ""
	if !slices.Contains(servers, "mlserver") {
		mlsNote = "not run (-servers)"
	} else {
		if _, err := os.Stat(filepath.Join(*mlsDir, "bin", "mlserver")); err != nil && *installMLS {
			if err := installMLServer(*mlsDir); err != nil {
				mlsNote = "not measured: installing it failed: " + err.Error()
			}
		}
		if _, err := os.Stat(filepath.Join(*mlsDir, "bin", "mlserver")); err != nil && mlsNote == "" {
			mlsNote = fmt.Sprintf("not measured: no %s/bin/mlserver (run without -install-mlserver=false to install it)", *mlsDir)
		}
		if mlsNote == "" {
			mlsNote = runMLServer(*mlsDir, *out, concs, warm, *dur, *nconns, func(m model, c int, r result) {
				results[key{m.name, "MLServer", c}] = r
				fmt.Fprintf(os.Stderr, "%s c=%d MLServer: %.0f req/s, server %.0f µs CPU/req, %d errors\n", m.name, c, r.RPS(), r.serverPerReq(), r.Errors)
			})
		}
	}

	// The table: per model and concurrency, each server, then the ceiling.
	// server / client CPU µs/req: the CPU time of the server's processes
	// (Kiln's child; TorchServe's JVM and Python workers) and of this
	// process (the load generator) per answered request; overhead µs/req:
	// the server's less the forward's CPU µs per row at the batch size
	// Kiln formed (the ceiling's server figure, which no server on these
	// CPUs can go under).
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "model\tconc\tserver\treq/s\tp50 ms\tp99 ms\tmean batch\tserver CPU µs/req\toverhead µs/req\tclient CPU µs/req\t% of ceiling\t× TorchServe\t× MLServer\terrors\t")
	for _, m := range models {
		for _, c := range concs {
			ceil, haveCeil := ceilings[key{m.name, "", c}]
			ts, haveTS := results[key{m.name, "TorchServe", c}]
			mls, haveMLS := results[key{m.name, "MLServer", c}]
			for _, server := range []string{"kiln gRPC", "kiln gRPC single port", "kiln gRPC stream", "kiln HTTP", "grpc-go floor", "grpc-go floor stream", "TorchServe", "MLServer"} {
				r, ok := results[key{m.name, server, c}]
				if !ok {
					continue
				}
				batch, ofCeil, vsTS, vsMLS, over := "-", "-", "-", "-", "-"
				if r.meanBatch > 0 {
					batch = fmt.Sprintf("%.1f", r.meanBatch)
				}
				if haveCeil && ceil.rows > 0 {
					ofCeil = fmt.Sprintf("%.0f%%", 100*r.RPS()/ceil.rows)
					if isKiln(server) {
						over = fmt.Sprintf("%.0f", r.serverPerReq()-ceil.cpuPerRow)
					}
				}
				if haveTS && ts.RPS() > 0 && isKiln(server) {
					vsTS = fmt.Sprintf("%.1f×", r.RPS()/ts.RPS())
				}
				if haveMLS && mls.RPS() > 0 && isKiln(server) {
					vsMLS = fmt.Sprintf("%.1f×", r.RPS()/mls.RPS())
				}
				errs := strconv.Itoa(r.Errors)
				if r.FirstErr != nil {
					errs += " (" + firstLine(r.FirstErr.Error()) + ")"
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%.0f\t%.2f\t%.2f\t%s\t%.0f\t%s\t%.0f\t%s\t%s\t%s\t%s\t\n", m.name, c, server, r.RPS(),
					ms(r.Pct(0.50)), ms(r.Pct(0.99)), batch, r.serverPerReq(), over, r.cpuPerReq(), ofCeil, vsTS, vsMLS, errs)
			}
			if haveCeil {
				vsTS, vsMLS := "-", "-"
				if haveTS && ts.RPS() > 0 {
					vsTS = fmt.Sprintf("%.1f×", ceil.rows/ts.RPS())
				}
				if haveMLS && mls.RPS() > 0 {
					vsMLS = fmt.Sprintf("%.1f×", ceil.rows/mls.RPS())
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%.0f\t-\t-\t%d\t%.1f\t0\t-\t100%%\t%s\t%s\t-\t\n", m.name, c, "ceiling", ceil.rows,
					ceil.batch, ceil.cpuPerRow, vsTS, vsMLS)
			}
		}
	}
	tw.Flush()
	fmt.Printf("\nOne-row FP32 requests; %v measured per cell after 1 s warm-up; the load generator in this process, Kiln's server in a child process, on the same %d CPUs (%s/%s, no pinning: each process's CPU time is counted apart, from /proc/PID/stat and getrusage), loopback; %d gRPC connection(s) shared by the workers; stream: one ModelStreamInfer stream per worker.\n",
		*dur, runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, *nconns)
	fmt.Printf("Kiln: libtorch %s, %d instances × %d intra-op (and OpenBLAS) threads, dynamic batching max_batch_size 64, max_queue_delay_us 100.\n",
		core.TorchVersion(), instances, threads)
	fmt.Printf("Kiln serves each model frozen and optimized for inference (config optimize_for_inference, on by default: torch.jit.optimize_for_inference(torch.jit.freeze(m)), oneDNN convolutions with weights reordered once); TorchServe and MLServer run the TorchScript files as they are, as their handlers do.\n")
	fmt.Printf("ceiling: raw core.Module.Forward of the optimized module, no server and no load generator, with the server's resources (%d goroutines × %d intra-op threads), at the batch size Kiln's first run of that cell formed (rounded), right after it; req/s = rows/s; server CPU µs/req = the process's CPU time per row forwarded.\n",
		instances, threads)
	fmt.Printf("server CPU µs/req: the server processes' CPU time (user+system) per answered request (Kiln: its child process; TorchServe: its JVM and Python workers; MLServer: its main process and parallel workers); overhead = server CPU less the ceiling's forward CPU per row; client CPU µs/req: the load generator's (this process).\n")
	fmt.Printf("grpc-go floor: a plain grpc.NewServer (default options, no interceptors) in its own child process whose ModelInfer and ModelStreamInfer answer every request with a prebuilt 10-float response and run no model: what grpc-go and protobuf alone cost per request, the part of Kiln's overhead that no serving code on top of grpc-go can remove.\n")
	fmt.Printf("mlp: 784-512-256-10 MLP; cnn: 3x32x32 conv16-pool-conv32-pool-fc128-fc10.\n")
	fmt.Println("TorchServe:", tsNote)
	fmt.Println("MLServer:", mlsNote)
}

// isPeer tells a peer's row (TorchServe, MLServer) from Kiln's.
func isPeer(server string) bool { return server == "TorchServe" || server == "MLServer" }

// isKiln tells Kiln's rows from the peers' and the grpc-go floor's.
func isKiln(server string) bool { return !isPeer(server) && !strings.HasPrefix(server, "grpc-go") }

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
// from `instances` goroutines at once, over about dur, and the CPU µs this
// process spent per row.
func ceiling(mod *core.Module, m model, b, instances int, dur time.Duration) (float64, float64) {
	var wg, warmed sync.WaitGroup
	var mu sync.Mutex
	total := 0
	var elapsed time.Duration
	start := make(chan struct{})
	warmed.Add(instances)
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
			warmed.Done()
			<-start
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
	warmed.Wait()
	cpu0 := processCPU()
	close(start)
	wg.Wait()
	cpu := processCPU() - cpu0
	return float64(total) / elapsed.Seconds(), float64(cpu.Microseconds()) / float64(total)
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// runTorchServe starts TorchServe on the archives archive wrote,
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
			record(m, c, load(c, warm, dur, func() time.Duration { return groupCPU(cmd.Process.Pid) }, func(w int) error { return post(m, rows[w]) }))
		}
	}
	return fmt.Sprintf("torchserve %s (PyPI, JVM %s) over REST, same TorchScript files, handler bench/serve/torchserve_handler.py, 2 workers × 1 thread (OPENBLAS_NUM_THREADS=1), batchSize 64, maxBatchDelay 1 ms; log %s.",
		strings.TrimSpace(string(ver)), javaVersion(), logPath)
}

func javaVersion() string {
	out, err := exec.Command("java", "-version").CombinedOutput()
	if err != nil {
		return "unknown"
	}
	return firstLine(string(out))
}

// inferRequests returns one one-row ModelInferRequest of model m per
// worker, built once and reused: the client's cost is the call, not
// building requests.
func inferRequests(m model, c int) []*pb.ModelInferRequest {
	reqs := make([]*pb.ModelInferRequest, c)
	for w := range c {
		reqs[w] = &pb.ModelInferRequest{ModelName: m.name,
			Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: append([]int64{1}, m.row...)}},
			RawInputContents: [][]byte{randomRow(m, uint64(w))}}
	}
	return reqs
}

// checkResponse checks that an answer holds the one raw 10-float output.
func checkResponse(resp *pb.ModelInferResponse) error {
	if len(resp.RawOutputContents) != 1 || len(resp.RawOutputContents[0]) != 40 {
		return errors.New("wrong output size")
	}
	return nil
}

// unaryDo returns a load worker's call: ModelInfer of worker w's request
// over connection w mod len(conns).
func unaryDo(conns []*grpc.ClientConn, reqs []*pb.ModelInferRequest) func(int) error {
	clients := make([]pb.GRPCInferenceServiceClient, len(conns))
	for i, cc := range conns {
		clients[i] = pb.NewGRPCInferenceServiceClient(cc)
	}
	return func(w int) error {
		resp, err := clients[w%len(clients)].ModelInfer(context.Background(), reqs[w])
		if err != nil {
			return err
		}
		return checkResponse(resp)
	}
}

// mlserverVersion is the PyPI release of MLServer the benchmark installs
// (bench/serve/requirements-mlserver.txt pins it and its closure).
const mlserverVersion = "1.7.1"

// installMLServer creates venv over /usr/bin/python3 (whose system
// packages hold the torch that matches Kiln's libtorch) and pip-installs
// bench/serve/requirements-mlserver.txt into it.
func installMLServer(venv string) error {
	fmt.Fprintf(os.Stderr, "bench/serve: installing mlserver %s into %s\n", mlserverVersion, venv)
	reqs := filepath.Join(testkit.Root(), "bench", "serve", "requirements-mlserver.txt")
	steps := [][]string{
		{"/usr/bin/python3", "-m", "venv", "--system-site-packages", venv},
		{filepath.Join(venv, "bin", "pip"), "install", "-q", "-r", reqs},
		{filepath.Join(venv, "bin", "python"), "-c", "import torch, mlserver"},
	}
	for _, st := range steps {
		out, err := exec.Command(st[0], st[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(st, " "), err, firstLine(strings.TrimSpace(string(out))))
		}
	}
	return nil
}

// runMLServer starts MLServer (venv's mlserver start) on the TorchScript
// files of out/repo with bench/serve/mlserver_runtime.py, adaptive batching
// and 2 parallel workers of 1 thread, loads it over unary gRPC ModelInfer
// with the same V2 messages as Kiln's gRPC rows (nconns connections shared
// by the workers), records each cell and returns the table's footnote (its
// settings, or why it could not be measured).
func runMLServer(venv, out string, concs []int, warm, dur time.Duration, nconns int, record func(model, int, result)) string {
	dir, err := filepath.Abs(filepath.Join(out, "mlserver"))
	must(err)
	must(os.RemoveAll(dir))
	must(os.MkdirAll(dir, 0o755))
	runtimeSrc, err := os.ReadFile(filepath.Join(testkit.Root(), "bench", "serve", "mlserver_runtime.py"))
	must(err)
	must(os.WriteFile(filepath.Join(dir, "mlserver_runtime.py"), runtimeSrc, 0o644))
	httpPort, grpcPort := freePort(), freePort()
	const maxBatchSize, maxBatchTime, workers = 64, 0.001, 2
	writeJSON := func(path string, v any) {
		b, err := json.MarshalIndent(v, "", "  ")
		must(err)
		must(os.MkdirAll(filepath.Dir(path), 0o755))
		must(os.WriteFile(path, b, 0o644))
	}
	writeJSON(filepath.Join(dir, "settings.json"), map[string]any{
		"debug": false, "host": "127.0.0.1", "http_port": httpPort, "grpc_port": grpcPort,
		"metrics_endpoint": nil, "parallel_workers": workers, "model_repository_root": dir,
		"load_models_at_startup": true})
	for _, m := range models {
		model, err := filepath.Abs(filepath.Join(out, "repo", m.name, "1", "model.pt"))
		must(err)
		writeJSON(filepath.Join(dir, "models", m.name, "model-settings.json"), map[string]any{
			"name": m.name, "implementation": "mlserver_runtime.TorchScriptModel",
			"max_batch_size": maxBatchSize, "max_batch_time": maxBatchTime,
			"parameters": map[string]any{"uri": model}})
	}
	logPath := filepath.Join(dir, "mlserver.log")
	logf, err := os.Create(logPath)
	must(err)
	defer logf.Close()
	cmd := exec.Command(filepath.Join(venv, "bin", "mlserver"), "start", dir)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// One intra-op (and OpenBLAS/OpenMP) thread per worker process, like
	// Kiln's instances and TorchServe's workers.
	cmd.Env = append(os.Environ(), "PYTHONPATH="+dir, "OMP_NUM_THREADS=1", "OPENBLAS_NUM_THREADS=1", "MKL_NUM_THREADS=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Sprintf("not measured: starting %s: %v", cmd.Path, err)
	}
	defer func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) // mlserver and its worker processes
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	}()
	addr := fmt.Sprintf("127.0.0.1:%d", grpcPort)
	conns := make([]*grpc.ClientConn, nconns)
	for i := range conns {
		conns[i], err = grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		must(err)
		defer conns[i].Close()
	}
	deadline := time.Now().Add(3 * time.Minute)
	for _, m := range models {
		do := unaryDo(conns, inferRequests(m, 1))
		for {
			err := do(0)
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
			record(m, c, load(c, warm, dur, func() time.Duration { return groupCPU(cmd.Process.Pid) }, unaryDo(conns, inferRequests(m, c))))
		}
	}
	return fmt.Sprintf("mlserver %s (PyPI) over unary gRPC ModelInfer (the same V2 messages as kiln gRPC), same TorchScript files, runtime bench/serve/mlserver_runtime.py, %d parallel workers × 1 thread (OMP/OPENBLAS_NUM_THREADS=1), adaptive batching max_batch_size %d, max_batch_time %g s; log %s.",
		mlserverVersion, workers, maxBatchSize, maxBatchTime, logPath)
}
