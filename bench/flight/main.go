// Command flight benchmarks Kiln's Arrow Flight service on loopback: DoPut
// (stored durably: every batch fsync'd before its acknowledgement) and
// DoExchange (batch inference of a 16 -> 16 TorchScript MLP), next to the
// same operations against a pyarrow flight.FlightServerBase server
// (pyserver.py: the same IPC file, fsync per batch and temp-file rename for
// DoPut; the same TorchScript file run with Python torch for DoExchange),
// and next to the ceilings: a memcpy of the same bytes, and the raw
// write(+fsync) of the same bytes in the same batch sizes into the same
// directory. DoPut runs into -disk (a real file system, where fsync waits for
// the device) and into -tmpfs (memory, where the transport and the server's
// own work are the limit), each driven by two clients: arrow-go in this
// process (sharing its CPUs with Kiln's server) and pyarrow.flight (Arrow
// C++, pyclient.py) in its own process. Each figure is the best of -runs
// runs; -only selects rows, -cpuprofile profiles this process (the Go
// client and Kiln's server).
//
//	go run ./bench/flight [-mb 512] [-batch-mb 4] [-rows 1048576] [-runs 3] [-only DoPut,tmpfs,kiln]
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/internal/testkit"
	kflight "github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
)

var (
	totalMB  = flag.Int("mb", 512, "MiB sent per DoPut")
	batchMB  = flag.Int("batch-mb", 4, "MiB per DoPut record batch")
	rows     = flag.Int("rows", 1<<20, "rows per DoExchange (16 float32 features each)")
	exBatch  = flag.Int("exchange-batch", 65536, "rows per DoExchange record batch")
	runs     = flag.Int("runs", 3, "runs per measurement (the best is shown)")
	diskDir  = flag.String("disk", os.TempDir(), "directory on a real file system for DoPut")
	tmpfsDir = flag.String("tmpfs", "/dev/shm", "directory in memory for DoPut (skipped if missing)")
	cpuProf  = flag.String("cpuprofile", "", "write a CPU profile of the whole run (client and Kiln server) to this file")
	only     = flag.String("only", "", "run only the rows whose operation and server together contain each of these comma-separated words (e.g. \"DoPut,tmpfs,kiln\")")
)

func main() {
	flag.Parse()
	if *cpuProf != "" {
		f, err := os.Create(*cpuProf)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench/flight:", err)
			os.Exit(1)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "bench/flight:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	if err := run(); err != nil {
		pprof.StopCPUProfile()
		fmt.Fprintln(os.Stderr, "bench/flight:", err)
		os.Exit(1)
	}
}

func here() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(file)
}

// row is one line of the table.
type row struct {
	op, client, server string
	mbps, rowsS        float64
}

func run() error {
	work, err := os.MkdirTemp(*diskDir, "kiln-bench-flight-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	repo := filepath.Join(work, "repo")
	if err := testkit.MakeFixture("bench-flight", repo); err != nil {
		return err
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	r, err := repository.Open(repo)
	if err != nil {
		return err
	}
	mgr := manager.New(r, manager.Options{Logger: quiet})
	defer mgr.Close()
	if err := mgr.Load("mlp"); err != nil {
		return err
	}

	type target struct{ name, dir string }
	targets := []target{{"disk", filepath.Join(work, "disk")}}
	if st, err := os.Stat(*tmpfsDir); err == nil && st.IsDir() {
		d, err := os.MkdirTemp(*tmpfsDir, "kiln-bench-flight-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		targets = append(targets, target{"tmpfs", d})
	}

	putRec := putBatch(*batchMB << 20)
	defer putRec.Release()
	nput := max(1, *totalMB / *batchMB)
	putBytes := float64(nput) * float64(bodyBytes(putRec))
	putRows := float64(nput) * float64(putRec.NumRows())
	exRecs := exchangeBatches(*rows, *exBatch)
	exBytes := float64(*rows) * 16 * 4

	var table []row
	var cpus []cpuRow
	for i, tg := range targets {
		kdir, pdir := filepath.Join(tg.dir, "kiln"), filepath.Join(tg.dir, "py")
		for _, d := range []string{kdir, pdir} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return err
			}
		}
		opts := kflight.Options{DataDir: kdir, Addr: "127.0.0.1:0", Logger: quiet}
		if i == 0 {
			opts.Models = kflight.ManagerModels(mgr)
		}
		ks, err := kflight.New(opts)
		if err != nil {
			return err
		}
		if err := ks.Start(context.Background()); err != nil {
			return err
		}
		py, err := startPy(pdir, filepath.Join(repo, "mlp", "1", "model.pt"))
		if err != nil {
			ks.Shutdown(context.Background())
			return err
		}
		kc, err := dial(ks.Addr().String())
		if err != nil {
			return err
		}
		pc, err := dial(py.addr)
		if err != nil {
			return err
		}
		op := "DoPut → " + tg.name + " (fsync/batch)"
		for _, s := range []struct {
			name string
			c    flight.Client
			addr string
		}{{"kiln", kc, ks.Addr().String()}, {"pyarrow", pc, py.addr}} {
			if want(op, "go", s.name) {
				d, err := best(func() (time.Duration, error) { return doPut(s.c, putRec, nput) })
				if err != nil {
					return fmt.Errorf("%s DoPut: %w", s.name, err)
				}
				table = append(table, row{op, "go", s.name, putBytes / d.Seconds() / 1e6, putRows / d.Seconds()})
			}
			if want(op, "pyarrow", s.name) {
				srv := selfCPU
				if s.name == "pyarrow" {
					srv = py.cpu
				}
				su0, ss0 := srv()
				d, cu, cs, err := pyPut(s.addr, nput)
				if err != nil {
					return fmt.Errorf("%s DoPut from pyarrow: %w", s.name, err)
				}
				su1, ss1 := srv()
				table = append(table, row{op, "pyarrow", s.name, putBytes / d.Seconds() / 1e6, putRows / d.Seconds()})
				gb := putBytes * float64(*runs) / 1e9
				cpus = append(cpus, cpuRow{tg.name, s.name, (su1 - su0) / gb, (ss1 - ss0) / gb, cu / gb, cs / gb})
			}
		}
		for _, c := range []struct {
			op      string
			perSync bool
		}{{"write+fsync per batch → " + tg.name, true}, {"write all, one fsync → " + tg.name, false}} {
			if !want(c.op, "", "(ceiling)") {
				continue
			}
			d, err := best(func() (time.Duration, error) { return rawWrite(kdir, putRec, nput, c.perSync) })
			if err != nil {
				return err
			}
			table = append(table, row{c.op, "", "(ceiling)", putBytes / d.Seconds() / 1e6, putRows / d.Seconds()})
		}
		if i == 0 {
			for _, s := range []struct {
				name string
				c    flight.Client
			}{{"kiln", kc}, {"pyarrow", pc}} {
				if !want("DoExchange", "go", s.name) {
					continue
				}
				d, err := best(func() (time.Duration, error) { return doExchange(s.c, exRecs) })
				if err != nil {
					return fmt.Errorf("%s DoExchange: %w", s.name, err)
				}
				table = append(table, row{"DoExchange mlp 16→16", "go", s.name, exBytes / d.Seconds() / 1e6, float64(*rows) / d.Seconds()})
			}
		}
		kc.Close()
		pc.Close()
		py.stop()
		if err := ks.Shutdown(context.Background()); err != nil {
			return err
		}
	}
	d, err := best(func() (time.Duration, error) { return memcpy(bodyBytes(putRec), nput), nil })
	if err != nil {
		return err
	}
	table = append(table, row{"memcpy same bytes", "", "(ceiling)", putBytes / d.Seconds() / 1e6, putRows / d.Seconds()})

	fmt.Printf("Arrow Flight on loopback, %d×%d MiB DoPut, %d-row DoExchange in %d-row batches, best of %d, %d CPUs\n",
		nput, *batchMB, *rows, *exBatch, *runs, runtime.NumCPU())
	fmt.Printf("disk = %s, tmpfs = %s; client go = arrow-go in this process (shares its CPUs with Kiln's server), pyarrow = pyarrow.flight (Arrow C++) in its own process\n\n", *diskDir, *tmpfsDir)
	fmt.Printf("%-36s %-8s %-10s %10s %14s\n", "operation", "client", "server", "MB/s", "rows/s")
	fmt.Println(strings.Repeat("-", 82))
	for _, r := range table {
		fmt.Printf("%-36s %-8s %-10s %10.0f %14.0f\n", r.op, r.client, r.server, r.mbps, r.rowsS)
	}
	if len(cpus) > 0 {
		fmt.Printf("\nWhere the CPU goes: CPU seconds per GB of DoPut from the pyarrow client (user / system, over all runs).\n")
		fmt.Printf("The bound is what %d CPUs allow client and server together: %d / (server + client seconds per GB).\n\n", runtime.NumCPU(), runtime.NumCPU())
		fmt.Printf("%-8s %-10s %18s %18s %14s\n", "into", "server", "server user/sys", "client user/sys", "bound MB/s")
		fmt.Println(strings.Repeat("-", 72))
		for _, c := range cpus {
			bound := float64(runtime.NumCPU()) / (c.su + c.ss + c.cu + c.cs) * 1e3
			fmt.Printf("%-8s %-10s %8.2f / %-7.2f %8.2f / %-7.2f %14.0f\n", c.into, c.server, c.su, c.ss, c.cu, c.cs, bound)
		}
	}
	return nil
}

// want reports whether -only selects the row of operation op from client
// to server.
func want(op, client, server string) bool {
	for _, w := range strings.Split(*only, ",") {
		if w != "" && !strings.Contains(op+" "+client+" "+server, w) {
			return false
		}
	}
	return true
}

func best(f func() (time.Duration, error)) (time.Duration, error) {
	var b time.Duration
	for i := 0; i < *runs; i++ {
		d, err := f()
		if err != nil {
			return 0, err
		}
		if b == 0 || d < b {
			b = d
		}
	}
	return b, nil
}

func dial(addr string) (flight.Client, error) {
	return flight.NewClientWithMiddleware(addr, nil, nil,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithReadBufferSize(1<<20), grpc.WithWriteBufferSize(1<<20),
		grpc.WithInitialWindowSize(32<<20), grpc.WithInitialConnWindowSize(64<<20),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30), grpc.MaxCallSendMsgSize(1<<30)))
}

// putBatch returns a record batch of 16 random float32 columns of about n
// bytes.
func putBatch(n int) arrow.RecordBatch {
	rowsN := n / (16 * 4)
	fields := make([]arrow.Field, 16)
	cols := make([]arrow.Array, 16)
	rng := rand.New(rand.NewPCG(1, 2))
	for j := range cols {
		fields[j] = arrow.Field{Name: "c" + strconv.Itoa(j), Type: arrow.PrimitiveTypes.Float32}
		b := array.NewFloat32Builder(memory.DefaultAllocator)
		b.Reserve(rowsN)
		for i := 0; i < rowsN; i++ {
			b.UnsafeAppend(rng.Float32())
		}
		cols[j] = b.NewArray()
		b.Release()
	}
	rec := array.NewRecordBatch(arrow.NewSchema(fields, nil), cols, int64(rowsN))
	for _, c := range cols {
		c.Release()
	}
	return rec
}

func bodyBytes(rec arrow.RecordBatch) int {
	return int(rec.NumRows()) * int(rec.NumCols()) * 4
}

// exchangeBatches returns rows of 16 features as fixed_shape_tensor batches.
func exchangeBatches(rowsN, per int) []arrow.RecordBatch {
	typ, err := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float32, []int64{16})
	if err != nil {
		panic(err)
	}
	schema := arrow.NewSchema([]arrow.Field{{Name: "x", Type: typ}}, nil)
	rng := rand.New(rand.NewPCG(3, 4))
	var out []arrow.RecordBatch
	for lo := 0; lo < rowsN; lo += per {
		n := min(per, rowsN-lo)
		b := array.NewFloat32Builder(memory.DefaultAllocator)
		for i := 0; i < n*16; i++ {
			b.Append(rng.Float32()*2 - 1)
		}
		vals := b.NewArray()
		col, err := arrowio.NewFixedShapeTensorArray(typ, vals)
		if err != nil {
			panic(err)
		}
		vals.Release()
		out = append(out, array.NewRecordBatch(schema, []arrow.Array{col}, int64(n)))
		col.Release()
	}
	return out
}

func doPut(c flight.Client, rec arrow.RecordBatch, n int) (time.Duration, error) {
	ctx := context.Background()
	start := time.Now()
	stream, err := c.DoPut(ctx)
	if err != nil {
		return 0, err
	}
	w := flight.NewRecordWriter(stream, ipc.WithSchema(rec.Schema()))
	w.SetFlightDescriptor(&flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "bench"}})
	for i := 0; i < n; i++ {
		if err := w.Write(rec); err != nil {
			break // the status comes from Recv
		}
	}
	w.Close()
	stream.CloseSend()
	acks := 0
	for {
		_, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return 0, err
		}
		acks++
	}
	d := time.Since(start)
	if acks == 0 {
		return 0, errors.New("no acknowledgement")
	}
	return d, nil
}

func doExchange(c flight.Client, recs []arrow.RecordBatch) (time.Duration, error) {
	ctx := context.Background()
	start := time.Now()
	stream, err := c.DoExchange(ctx)
	if err != nil {
		return 0, err
	}
	w := flight.NewRecordWriter(stream, ipc.WithSchema(recs[0].Schema()))
	w.SetFlightDescriptor(&flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"models", "mlp"}})
	go func() {
		for _, r := range recs {
			if err := w.Write(r); err != nil {
				break
			}
		}
		w.Close()
		stream.CloseSend()
	}()
	rdr, err := flight.NewRecordReader(stream)
	if err != nil {
		return 0, err
	}
	defer rdr.Release()
	got := 0
	for rdr.Next() {
		got += int(rdr.RecordBatch().NumRows())
	}
	if err := rdr.Err(); err != nil {
		return 0, err
	}
	d := time.Since(start)
	if got != *rows {
		return 0, fmt.Errorf("got %d rows back, sent %d", got, *rows)
	}
	return d, nil
}

// rawWrite writes the batch's bytes n times to a file in dir, fsync'ing
// after each when perSync (what a server that writes and syncs each batch in
// turn pays), else once at the end (the device's own write throughput, as
// dd conv=fdatasync measures it).
func rawWrite(dir string, rec arrow.RecordBatch, n int, perSync bool) (time.Duration, error) {
	buf := make([]byte, bodyBytes(rec))
	for i := range buf {
		buf[i] = byte(i)
	}
	f, err := os.CreateTemp(dir, "raw-")
	if err != nil {
		return 0, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	start := time.Now()
	for i := 0; i < n; i++ {
		if _, err := f.Write(buf); err != nil {
			return 0, err
		}
		if perSync {
			if err := f.Sync(); err != nil {
				return 0, err
			}
		}
	}
	if !perSync {
		if err := f.Sync(); err != nil {
			return 0, err
		}
	}
	return time.Since(start), nil
}

var sink byte

func memcpy(size, n int) time.Duration {
	src := make([]byte, size)
	dst := make([]byte, size)
	for i := range src {
		src[i] = byte(i)
	}
	start := time.Now()
	for i := 0; i < n; i++ {
		copy(dst, src)
		sink += dst[i%size]
	}
	return time.Since(start)
}

// cpuRow is the CPU time per GB of the DoPuts from the pyarrow client into
// a server: user and system seconds of the server and of the client.
type cpuRow struct {
	into, server   string
	su, ss, cu, cs float64
}

// selfCPU returns this process's user and system CPU seconds so far.
func selfCPU() (float64, float64) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, 0
	}
	return time.Duration(ru.Utime.Nano()).Seconds(), time.Duration(ru.Stime.Nano()).Seconds()
}

// pyPut runs pyclient.py: -runs DoPuts of n batches from pyarrow's client
// to addr. It returns the best time and the client's user and system CPU
// seconds over all runs.
func pyPut(addr string, n int) (time.Duration, float64, float64, error) {
	py, err := testkit.PythonPath()
	if err != nil {
		return 0, 0, 0, err
	}
	out, err := exec.Command(py, filepath.Join(here(), "pyclient.py"), "--addr", addr,
		"--batches", strconv.Itoa(n), "--batch-mb", strconv.Itoa(*batchMB), "--runs", strconv.Itoa(*runs)).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return 0, 0, 0, fmt.Errorf("pyclient.py: %w\n%s", err, ee.Stderr)
		}
		return 0, 0, 0, fmt.Errorf("pyclient.py: %w", err)
	}
	var secs, user, sys float64
	if _, err := fmt.Sscan(string(out), &secs, &user, &sys); err != nil {
		return 0, 0, 0, fmt.Errorf("pyclient.py printed %q: %w", out, err)
	}
	return time.Duration(secs * float64(time.Second)), user, sys, nil
}

// pyServer is a running pyserver.py.
type pyServer struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	addr  string
}

func startPy(data, model string) (*pyServer, error) {
	py, err := testkit.PythonPath()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(py, filepath.Join(here(), "pyserver.py"), "--data", data, "--model", model)
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
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("pyserver.py did not start: %w", err)
	}
	return &pyServer{cmd: cmd, stdin: stdin, addr: "127.0.0.1:" + strings.TrimSpace(line)}, nil
}

// cpu returns the server process's user and system CPU seconds so far,
// from /proc (zero where there is none).
func (p *pyServer) cpu() (float64, float64) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, 0
	}
	// Fields after the parenthesized command name: state is field 3,
	// utime and stime are fields 14 and 15, in clock ticks (100 per second
	// on Linux).
	s := string(raw)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return u / 100, st / 100
}

func (p *pyServer) stop() {
	p.stdin.Close()
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}
