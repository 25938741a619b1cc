package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
)

// memCapBytes is the memory cap of TestServeUnderMemoryCap: 2 GiB, the
// issue's figure.
const memCapBytes = 2 << 30

// memCapFlags size `kiln serve`'s limits for a 2 GiB box. The defaults
// are sized for 24 GiB (package serving/limits): a message is read in
// full before it is admitted and decodes into several copies (wire
// buffers, the protobuf, the batch in C memory, the answer), so the worst
// case is a few times (in-flight bytes + streams and calls being read ×
// message size). Here: 16 MiB messages and decoded bodies, 128 MiB in
// flight and 16 streams; with kiln serve's Go memory limit (60% of the
// cgroup's) the worst requests below peak near 1.5 GiB.
var memCapFlags = []string{
	"--max-message-bytes", strconv.Itoa(16 << 20),
	"--max-decompressed-bytes", strconv.Itoa(16 << 20),
	"--max-inflight-bytes", strconv.Itoa(128 << 20),
	"--max-streams", "16",
}

// memCap confines one process to memCapBytes: a child cgroup (v2, else
// v1) of this process's own cgroup, or, where cgroups cannot be written,
// RLIMIT_AS with prlimit.
type memCap struct {
	kind string // "cgroup v2 DIR", "cgroup v1 DIR" or "prlimit --as"
	dir  string // the cgroup directory ("" with prlimit)
	v2   bool
}

// newMemCap makes a child cgroup limited to memCapBytes, or returns a
// prlimit cap with the reason cgroups were not used.
func newMemCap(t *testing.T) *memCap {
	t.Helper()
	if os.Getenv("KILN_MEMCAP_MODE") == "prlimit" {
		return &memCap{kind: "prlimit --as"}
	}
	raw, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Logf("no cgroups (%v): falling back to prlimit --as", err)
		return &memCap{kind: "prlimit --as"}
	}
	var v2path, v1path string
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			v2path = parts[2]
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "memory" {
				v1path = parts[2]
			}
		}
	}
	name := fmt.Sprintf("kiln-memcap-%d", os.Getpid())
	var why []string
	if ctrl, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers"); err == nil && v2path != "" && strings.Contains(string(ctrl), "memory") {
		parent := filepath.Join("/sys/fs/cgroup", v2path)
		dir := filepath.Join(parent, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			why = append(why, fmt.Sprintf("cgroup v2: %v", err))
		} else {
			if _, err := os.Stat(filepath.Join(dir, "memory.max")); err != nil {
				// Delegate the memory controller to children (refused when
				// the parent holds processes and is not the root).
				os.WriteFile(filepath.Join(parent, "cgroup.subtree_control"), []byte("+memory"), 0)
			}
			if err := os.WriteFile(filepath.Join(dir, "memory.max"), []byte(strconv.Itoa(memCapBytes)), 0); err == nil {
				os.WriteFile(filepath.Join(dir, "memory.swap.max"), []byte("0"), 0)
				return &memCap{kind: "cgroup v2 " + dir, dir: dir, v2: true}
			} else {
				why = append(why, fmt.Sprintf("cgroup v2 memory.max: %v", err))
			}
			os.Remove(dir)
		}
	}
	if v1path != "" {
		dir := filepath.Join("/sys/fs/cgroup/memory", v1path, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			why = append(why, fmt.Sprintf("cgroup v1: %v", err))
		} else if err := os.WriteFile(filepath.Join(dir, "memory.limit_in_bytes"), []byte(strconv.Itoa(memCapBytes)), 0); err != nil {
			why = append(why, fmt.Sprintf("cgroup v1 memory.limit_in_bytes: %v", err))
			os.Remove(dir)
		} else {
			// No swap either, where the kernel accounts it.
			os.WriteFile(filepath.Join(dir, "memory.memsw.limit_in_bytes"), []byte(strconv.Itoa(memCapBytes)), 0)
			return &memCap{kind: "cgroup v1 " + dir, dir: dir}
		}
	}
	t.Logf("no writable memory cgroup (%s): falling back to prlimit --as", strings.Join(why, "; "))
	return &memCap{kind: "prlimit --as"}
}

// command returns the command running argv inside the cgroup: a shell
// moves itself into it, then execs argv, so that nothing runs outside.
func (m *memCap) command(argv ...string) *exec.Cmd {
	if m.dir == "" {
		return exec.Command(argv[0], argv[1:]...)
	}
	return exec.Command("sh", append([]string{"-c", `echo $$ > "$KILN_MEMCAP_CGROUP/cgroup.procs" && exec "$0" "$@"`}, argv...)...)
}

// started applies prlimit to a started process: RLIMIT_AS counts address
// space, not memory, and an idle kiln serve has already reserved a lot of
// it (libtorch's and the other libraries' mappings, thread stacks, malloc
// arenas), so the cap is its address space once started plus
// memCapBytes: what the requests make it map must stay within 2 GiB.
func (m *memCap) started(t *testing.T, pid int) {
	t.Helper()
	if m.dir != "" {
		return
	}
	vm := procStatusBytes(t, pid, "VmSize")
	out, err := exec.Command("prlimit", "--pid", strconv.Itoa(pid), fmt.Sprintf("--as=%d", vm+memCapBytes)).CombinedOutput()
	require.NoError(t, err, "prlimit: %s", out)
	m.kind = fmt.Sprintf("prlimit --as=%d (VmSize %d at start + %d)", vm+memCapBytes, vm, memCapBytes)
}

// read returns a cgroup file's contents ("" with prlimit or when absent).
func (m *memCap) read(name string) string {
	if m.dir == "" {
		return ""
	}
	b, _ := os.ReadFile(filepath.Join(m.dir, name))
	return string(b)
}

// peak returns the cgroup's peak memory use in bytes (0 when unknown).
func (m *memCap) peak() int64 {
	f := "memory.max_usage_in_bytes"
	if m.v2 {
		f = "memory.peak"
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(m.read(f)), 10, 64)
	return n
}

// oomKills returns the OOM kills in the cgroup (memory.events in v2,
// memory.oom_control in v1; 0 with prlimit).
func (m *memCap) oomKills() int64 {
	f := "memory.oom_control"
	if m.v2 {
		f = "memory.events"
	}
	for _, line := range strings.Split(m.read(f), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}

// remove deletes the cgroup (its process has exited).
func (m *memCap) remove(t *testing.T) {
	if m.dir == "" {
		return
	}
	for range 50 { // the kernel empties a cgroup shortly after its last process exits
		if err := os.Remove(m.dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("removing cgroup %s: it is not empty", m.dir)
}

// procStatusBytes reads a "NAME: N kB" line of /proc/PID/status.
func procStatusBytes(t *testing.T, pid int, name string) int64 {
	t.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			require.NoError(t, err, line)
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", name, pid)
	return 0
}

// servedAddrs are the addresses `kiln serve` prints once it is up.
type servedAddrs struct{ grpc, http, metrics, flight string }

// startKiln builds kiln, starts `kiln serve` on repo under m with
// memCapFlags, and returns the process, its addresses once it prints that
// it is ready, and a channel that receives its exit.
func startKiln(t *testing.T, m *memCap, repo string) (*exec.Cmd, servedAddrs, <-chan error) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "kiln")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = filepath.Join(testkit.Root(), "cmd", "kiln")
	out, err := build.CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	argv := append([]string{bin, "serve", "--model-repository", repo, "--host", "127.0.0.1",
		"--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--flight-port", "0",
		"--data-dir", t.TempDir(), "--threads", "1"}, memCapFlags...)
	cmd := m.command(argv...)
	// kiln serve sets its Go memory limit from the cgroup's (applyMemoryLimit).
	cmd.Env = append(slices.DeleteFunc(os.Environ(), func(e string) bool { return strings.HasPrefix(e, "GOMEMLIMIT=") }), "KILN_MEMCAP_CGROUP="+m.dir)
	if v := os.Getenv("KILN_MEMCAP_GOMEMLIMIT"); v != "" {
		// An experiment: "off" shows what the cap does to a server
		// without a Go memory limit.
		cmd.Env = append(cmd.Env, "GOMEMLIMIT="+v)
	} else if m.dir == "" {
		// No cgroup to read the cap from: the same share, by hand.
		share := goMemoryShare
		cmd.Env = append(cmd.Env, fmt.Sprintf("GOMEMLIMIT=%d", int64(memCapBytes*share)))
	}
	logs := &syncWriter{w: new(bytes.Buffer)}
	cmd.Stderr = logs
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	var waitOnce sync.Once
	wait := func() { waitOnce.Do(func() { exited <- cmd.Wait() }) }
	t.Cleanup(func() {
		cmd.Process.Kill() // a no-op once it has exited
		if t.Failed() {
			t.Logf("kiln serve's log:\n%s", lastLines(logs.String(), 40))
		}
	})
	var a servedAddrs
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		switch {
		case strings.HasPrefix(line, "kiln serve: gRPC"):
			a.grpc = fields[len(fields)-1]
		case strings.HasPrefix(line, "kiln serve: HTTP"):
			a.http = strings.TrimPrefix(strings.TrimSuffix(fields[len(fields)-1], "/v2"), "http://")
		case strings.HasPrefix(line, "kiln serve: metrics"):
			a.metrics = strings.TrimPrefix(strings.TrimSuffix(fields[len(fields)-1], "/metrics"), "http://")
		case strings.HasPrefix(line, "kiln serve: Flight"):
			a.flight = strings.TrimPrefix(fields[3], "grpc://")
		case strings.HasPrefix(line, "kiln serve: ready"):
			go func() {
				io.Copy(io.Discard, stdout)
				wait()
			}()
			m.started(t, cmd.Process.Pid)
			if m.dir != "" && os.Getenv("KILN_MEMCAP_GOMEMLIMIT") == "" {
				require.Contains(t, logs.String(), "Go memory limit set from the cgroup's", "kiln serve reads its cap")
			}
			t.Logf("kiln serve started: VmRSS %d MiB", procStatusBytes(t, cmd.Process.Pid, "VmRSS")>>20)
			return cmd, a, exited
		case strings.HasPrefix(line, "kiln serve: NOT ready"):
			t.Fatalf("kiln serve is not ready: %s", line)
		}
	}
	wait()
	t.Fatalf("kiln serve exited before it was ready: %v", <-exited)
	return nil, a, nil
}

// syncWriter is a buffer that a process writes while the test reads it.
type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func (s *syncWriter) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.String()
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// rawCodec sends a mem.BufferSlice or []byte as the message, as is, and
// decodes into *[]byte: for messages that are not valid protobuf, and for
// a ~1.9 GiB message made of one 1 MiB buffer repeated (the client sends
// it without ever holding 1.9 GiB).
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if bs, ok := v.(mem.BufferSlice); ok {
		return bs, nil
	}
	return mem.BufferSlice{mem.SliceBuffer(v.([]byte))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*(v.(*[]byte)) = data.Materialize()
	return nil
}

// captureStream keeps the FlightData a flight.Writer sends.
type captureStream struct{ msgs []*flight.FlightData }

func (c *captureStream) Send(fd *flight.FlightData) error {
	c.msgs = append(c.msgs, fd)
	return nil
}

// hugeSchemaMessage is a FlightData whose IPC Schema message declares
// 0x7fffffff fields (it has one): arrow-go's reader used to allocate about
// 176 GiB for it.
func hugeSchemaMessage(t *testing.T, desc *flight.FlightDescriptor) *flight.FlightData {
	t.Helper()
	var c captureStream
	schema := arrow.NewSchema([]arrow.Field{{Name: "ids", Type: arrow.PrimitiveTypes.Int64}}, nil)
	w := flight.NewRecordWriter(&c, ipc.WithSchema(schema))
	w.SetFlightDescriptor(desc)
	require.NoError(t, w.Close())
	require.NotEmpty(t, c.msgs)
	fd := c.msgs[0]
	b := fd.DataHeader
	u32 := func(p int) int { return int(binary.LittleEndian.Uint32(b[p:])) }
	// field i of the flatbuffer table at pos: its position, by its vtable.
	field := func(pos, i int) int {
		vt := pos - int(int32(binary.LittleEndian.Uint32(b[pos:])))
		off := int(binary.LittleEndian.Uint16(b[vt+4+2*i:]))
		require.NotZero(t, off, "field %d of the table at %d is absent", i, pos)
		return pos + off
	}
	msg := u32(0)
	require.Equal(t, byte(1), b[field(msg, 1)], "a Schema message")
	hp := field(msg, 2)
	schemaPos := hp + u32(hp)
	fp := field(schemaPos, 1) // Schema.fields
	vec := fp + u32(fp)
	require.Equal(t, 1, u32(vec))
	binary.LittleEndian.PutUint32(b[vec:], 0x7fffffff)
	return fd
}

// intOps is a request to int_ops (INT64 ids[-1]) of n zeros from data.
func intOps(n int, data []byte) *pb.ModelInferRequest {
	return &pb.ModelInferRequest{
		ModelName:        "int_ops",
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "ids", Datatype: "INT64", Shape: []int64{int64(n)}}},
		RawInputContents: [][]byte{data[:n*8]},
	}
}

// intOpsRecord is a record batch of n zeros in column ids.
func intOpsRecord(n int) arrow.RecordBatch {
	d := array.NewData(arrow.PrimitiveTypes.Int64, n, []*memory.Buffer{nil, memory.NewBufferBytes(make([]byte, n*8))}, nil, 0, 0)
	defer d.Release()
	col := array.NewInt64Data(d)
	defer col.Release()
	return array.NewRecordBatch(arrow.NewSchema([]arrow.Field{{Name: "ids", Type: arrow.PrimitiveTypes.Int64}}, nil), []arrow.Array{col}, int64(n))
}

// exchange sends recs to a DoExchange with int_ops and reads the answers
// until the stream ends; it returns the stream's status.
func exchange(ctx context.Context, fc flight.Client, recs ...arrow.RecordBatch) error {
	stream, err := fc.DoExchange(ctx)
	if err != nil {
		return err
	}
	w := flight.NewRecordWriter(stream, ipc.WithSchema(recs[0].Schema()))
	w.SetFlightDescriptor(&flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"models", "int_ops"}})
	go func() {
		for _, r := range recs {
			if w.Write(r) != nil {
				break
			}
		}
		w.Close()
		stream.CloseSend()
	}()
	for {
		if _, err := stream.Recv(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// httpStatus sends head (request line and headers, without the blank
// line) and body on a new connection and returns the status line, or ""
// when none comes within wait.
func httpStatus(addr, head string, body []byte, wait time.Duration) string {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return ""
	}
	defer c.Close()
	go func() {
		c.Write([]byte(head + "\r\n"))
		c.Write(body)
	}()
	c.SetReadDeadline(time.Now().Add(wait))
	line, _ := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line)
}

// TestServeUnderMemoryCap is issue 12's memory-bounded test: `kiln serve`
// (built here) runs under a 2 GiB memory cap (a child cgroup, else
// prlimit) with limits sized for it (memCapFlags), receives the worst
// request of each kind at once, and stays up: it is alive, ready, and a
// valid inference succeeds on gRPC, REST and Flight; the cgroup saw no
// OOM kill. Each worst request must be answered with its own error code.
// KILN_MEMCAP_GOMEMLIMIT, when set, is kiln serve's GOMEMLIMIT ("off":
// the server without the Go memory limit it takes from the cgroup);
// KILN_MEMCAP_MODE=prlimit uses the fallback where cgroups work.
func TestServeUnderMemoryCap(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("memory caps are Linux cgroups or prlimit")
	}
	if testing.Short() {
		t.Skip("-short: builds kiln and sends several GiB")
	}
	repo := testkit.CopyFixture(t, "serving-repo")
	require.NoError(t, os.RemoveAll(filepath.Join(repo, "corrupt"))) // ready needs every model
	mc := newMemCap(t)
	t.Cleanup(func() { mc.remove(t) }) // after the process is killed (cleanups run last first)
	cmd, addrs, exited := startKiln(t, mc, repo)
	t.Logf("kiln serve (pid %d) under %s", cmd.Process.Pid, mc.kind)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dial := func() *grpc.ClientConn {
		conn, err := grpc.NewClient(addrs.grpc, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(math.MaxInt32)))
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	conns := []*grpc.ClientConn{dial(), dial(), dial(), dial()}
	kc := pb.NewGRPCInferenceServiceClient(conns[0])
	fc, err := flight.NewClientWithMiddleware(addrs.flight, nil, nil, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	require.NoError(t, err)
	defer fc.Close()

	const big = 10 << 20 / 8 // int_ops elements of a 10 MiB message (its answer is 15 MiB, under the 16 MiB limit)
	data := make([]byte, big*8)
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := map[string]map[string]int{} // kind → code → count
	record := func(kind string, err error) {
		mu.Lock()
		defer mu.Unlock()
		if got[kind] == nil {
			got[kind] = map[string]int{}
		}
		got[kind][status.Code(err).String()]++
	}
	run := func(kind string, n int, f func(i int) error) {
		for i := range n {
			wg.Go(func() { record(kind, f(i)) })
		}
	}

	// (1) A shape of 8589934592 FP32 elements and no contents.
	run("shape 2^33 FP32, no data", 1, func(int) error {
		_, err := kc.ModelInfer(ctx, &pb.ModelInferRequest{ModelName: "int_ops",
			Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "ids", Datatype: "FP32", Shape: []int64{8589934592}}}})
		return err
	})
	// (2) DoPut and DoExchange whose first message is a Schema of 0x7fffffff fields.
	run("DoPut schema of 0x7fffffff fields", 1, func(int) error {
		s, err := fc.DoPut(ctx)
		if err != nil {
			return err
		}
		if err := s.Send(hugeSchemaMessage(t, &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "huge"}})); err != nil {
			return err
		}
		s.CloseSend()
		_, err = s.Recv()
		return err
	})
	run("DoExchange schema of 0x7fffffff fields", 1, func(int) error {
		s, err := fc.DoExchange(ctx)
		if err != nil {
			return err
		}
		if err := s.Send(hugeSchemaMessage(t, &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"models", "int_ops"}})); err != nil {
			return err
		}
		s.CloseSend()
		_, err = s.Recv()
		return err
	})
	// (3) REST: Content-Length 2147483647 and no body, on 64 connections.
	httpRun := func(kind string, n int, f func() string) {
		for range n {
			wg.Go(func() {
				line := f()
				if len(line) > 120 {
					line = line[:120] + "..."
				}
				mu.Lock()
				defer mu.Unlock()
				if got[kind] == nil {
					got[kind] = map[string]int{}
				}
				got[kind][line]++
			})
		}
	}
	httpRun("REST Content-Length 2147483647, no body", 64, func() string {
		return httpStatus(addrs.http, "POST /v2/models/int_ops/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2147483647\r\n", []byte(`{"inputs":`), time.Minute)
	})
	// A 76 MiB JSON body of zeros, declared, and the same chunked.
	zeros := []byte(`{"inputs":[{"name":"ids","shape":[39845888],"datatype":"INT64","data":[` + strings.Repeat("0,", 39845887) + `0]}]}`)
	httpRun("REST 76 MiB JSON of zeros", 1, func() string {
		return httpStatus(addrs.http, fmt.Sprintf("POST /v2/models/int_ops/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", len(zeros)), zeros, time.Minute)
	})
	httpRun("REST 76 MiB JSON of zeros, chunked", 1, func() string {
		resp, err := http.Post("http://"+addrs.http+"/v2/models/int_ops/infer", "application/json", io.MultiReader(bytes.NewReader(zeros)))
		if err != nil {
			return "error: " + err.Error()
		}
		resp.Body.Close()
		return resp.Status
	})
	// A 1 MiB gzip bomb (1 GiB of zeros once decoded).
	var bomb bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&bomb, gzip.BestCompression)
	chunk := make([]byte, 1<<20)
	for range 1024 {
		zw.Write(chunk)
	}
	require.NoError(t, zw.Close())
	httpRun(fmt.Sprintf("REST gzip bomb of %d bytes", bomb.Len()), 4, func() string {
		return httpStatus(addrs.http, fmt.Sprintf("POST /v2/models/int_ops/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n", bomb.Len()), bomb.Bytes(), time.Minute)
	})
	// A ~1.9 GiB gRPC message: one 1 MiB buffer, 1900 times.
	run("gRPC message of 1.9 GiB", 1, func(int) error {
		one := mem.SliceBuffer(make([]byte, 1<<20))
		msg := make(mem.BufferSlice, 1900)
		for i := range msg {
			msg[i] = one
		}
		var out []byte
		return conns[1].Invoke(ctx, "/inference.GRPCInferenceService/ModelInfer", msg, &out, grpc.ForceCodecV2(rawCodec{}))
	})
	// Many large messages at once: 24 × 10 MiB over four connections,
	// 240 MiB against 128 MiB in flight.
	run("24 ModelInfer of 10 MiB at once", 24, func(i int) error {
		_, err := pb.NewGRPCInferenceServiceClient(conns[i%len(conns)]).ModelInfer(ctx, intOps(big, data))
		return err
	})
	// (4) 10,000 loads of missing model names.
	run("10,000 loads of missing models", 8, func(i int) error {
		var first error
		for j := range 1250 {
			_, err := kc.RepositoryModelLoad(ctx, &pb.RepositoryModelLoadRequest{ModelName: fmt.Sprintf("missing-%d-%d", i, j)})
			if status.Code(err) != codes.NotFound {
				return fmt.Errorf("load %d: %w", j, err)
			}
			first = err
		}
		return first
	})
	// (9) A 20,000-character model name, on gRPC and REST, and a 100 KB ticket.
	long := strings.Repeat("m", 20000)
	run("gRPC model name of 20,000 characters", 1, func(int) error {
		_, err := kc.ModelInfer(ctx, &pb.ModelInferRequest{ModelName: long})
		return err
	})
	httpRun("REST model name of 20,000 characters", 1, func() string {
		resp, err := http.Get("http://" + addrs.http + "/v2/models/" + long)
		if err != nil {
			return "error: " + err.Error()
		}
		resp.Body.Close()
		return resp.Status
	})
	run("Flight ticket of 100 KB", 1, func(int) error {
		s, err := fc.DoGet(ctx, &flight.Ticket{Ticket: []byte("datasets/" + strings.Repeat("t", 100_000))})
		if err == nil {
			_, err = s.Recv()
		}
		return err
	})
	// (11) Malformed protobuf, unary and streaming.
	garbage := []byte{0x0a, 0x64, 'a', 'b'} // model_name claims 100 bytes; 2 follow
	run("malformed protobuf, unary", 1, func(int) error {
		var out []byte
		return conns[2].Invoke(ctx, "/inference.GRPCInferenceService/ModelInfer", garbage, &out, grpc.ForceCodecV2(rawCodec{}))
	})
	run("malformed protobuf, stream", 1, func(int) error {
		s, err := conns[2].NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true},
			"/inference.GRPCInferenceService/ModelStreamInfer", grpc.ForceCodecV2(rawCodec{}))
		if err != nil {
			return err
		}
		if err := s.SendMsg(garbage); err != nil {
			return err
		}
		var out []byte
		return s.RecvMsg(&out)
	})
	// Stream floods: 32 ModelStreamInfer streams of 4 × 10 MiB (the
	// limit is 16 streams) and 8 DoExchange streams of 4 × 8 MiB batches.
	run("ModelStreamInfer flood (32 streams of 4 × 10 MiB)", 32, func(i int) error {
		s, err := pb.NewGRPCInferenceServiceClient(conns[i%len(conns)]).ModelStreamInfer(ctx)
		if err != nil {
			return err
		}
		for range 4 {
			if err := s.Send(intOps(big, data)); err != nil {
				break
			}
		}
		s.CloseSend()
		var busy error
		for {
			resp, err := s.Recv()
			if errors.Is(err, io.EOF) {
				return busy
			}
			if err != nil {
				return err
			}
			if resp.ErrorMessage != "" {
				if !strings.Contains(resp.ErrorMessage, "server busy") {
					return errors.New(resp.ErrorMessage)
				}
				busy = status.Error(codes.ResourceExhausted, resp.ErrorMessage)
			}
		}
	})
	rec := intOpsRecord(1 << 20) // 8 MiB
	defer rec.Release()
	run("DoExchange flood (8 streams of 4 × 8 MiB)", 8, func(int) error {
		return exchange(ctx, fc, rec, rec, rec, rec)
	})
	wg.Wait()

	// What each kind was answered.
	want := map[string][]string{
		"shape 2^33 FP32, no data":                          {"InvalidArgument"},
		"DoPut schema of 0x7fffffff fields":                 {"InvalidArgument"},
		"DoExchange schema of 0x7fffffff fields":            {"InvalidArgument"},
		"gRPC message of 1.9 GiB":                           {"ResourceExhausted"},
		"24 ModelInfer of 10 MiB at once":                   {"OK", "ResourceExhausted"},
		"10,000 loads of missing models":                    {"NotFound"},
		"gRPC model name of 20,000 characters":              {"NotFound"},
		"Flight ticket of 100 KB":                           {"NotFound", "InvalidArgument"},
		"malformed protobuf, unary":                         {"InvalidArgument"},
		"malformed protobuf, stream":                        {"InvalidArgument", "ResourceExhausted"}, // refused at open while the flood holds every stream
		"ModelStreamInfer flood (32 streams of 4 × 10 MiB)": {"OK", "ResourceExhausted"},
		"DoExchange flood (8 streams of 4 × 8 MiB)":         {"OK", "ResourceExhausted"},
		"REST Content-Length 2147483647, no body":           {"HTTP/1.1 413 Request Entity Too Large"},
		"REST 76 MiB JSON of zeros":                         {"HTTP/1.1 413 Request Entity Too Large"},
		"REST 76 MiB JSON of zeros, chunked":                {"413 Request Entity Too Large"},
		"REST model name of 20,000 characters":              {"404 Not Found"},
	}
	for kind, codes := range got {
		t.Logf("%-52s %v", kind, codes)
		allowed, ok := want[kind]
		if strings.HasPrefix(kind, "REST gzip bomb") {
			allowed, ok = []string{"HTTP/1.1 413 Request Entity Too Large"}, true
		}
		require.True(t, ok, "no expectation for %q", kind)
		for code := range codes {
			assert.Contains(t, allowed, code, "%s answered %s", kind, code)
		}
	}
	require.Len(t, got, len(want)+1, "every kind was sent")

	// The server is up, ready, and serves each protocol.
	select {
	case err := <-exited:
		t.Fatalf("kiln serve exited: %v (OOM kills in the cgroup: %d)", err, mc.oomKills())
	default:
	}
	resp, err := http.Get("http://" + addrs.http + "/v2/health/ready")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "/v2/health/ready")
	small := make([]byte, 8*4)
	ans, err := kc.ModelInfer(ctx, intOps(4, small))
	require.NoError(t, err, "gRPC inference")
	require.Len(t, ans.RawOutputContents, 2)
	resp, err = http.Post("http://"+addrs.http+"/v2/models/int_ops/infer", "application/json",
		strings.NewReader(`{"inputs":[{"name":"ids","shape":[3],"datatype":"INT64","data":[1,2,3]}]}`))
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "REST inference: %s", body)
	require.Contains(t, string(body), `"data":[2,4,6]`)
	one := intOpsRecord(3)
	defer one.Release()
	require.NoError(t, exchange(ctx, fc, one), "Flight inference")

	// The admission metrics: what was admitted at once stayed within the
	// budget (one message larger than it may be admitted alone).
	resp, err = http.Get("http://" + addrs.metrics + "/metrics")
	require.NoError(t, err)
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	metric := func(name string) float64 {
		m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindSubmatch(metrics)
		require.NotNil(t, m, "metric %s", name)
		v, err := strconv.ParseFloat(string(m[1]), 64)
		require.NoError(t, err)
		return v
	}
	peakInflight, limit := metric("kiln_inflight_request_bytes_peak"), metric("kiln_inflight_request_bytes_limit")
	assert.LessOrEqual(t, peakInflight, limit)
	assert.LessOrEqual(t, metric("kiln_open_streams_peak"), metric("kiln_open_streams_limit"))
	hwm := procStatusBytes(t, cmd.Process.Pid, "VmHWM")
	t.Logf("peak in flight %.0f of %.0f bytes, streams peak %.0f of %.0f, refused %s; VmHWM %d MiB, cgroup peak %d MiB, OOM kills %d",
		peakInflight, limit, metric("kiln_open_streams_peak"), metric("kiln_open_streams_limit"),
		regexp.MustCompile(`(?m)^kiln_admission_refused_total\{reason="(\w+)"\} (\S+)$`).FindAll(metrics, -1),
		hwm>>20, mc.peak()>>20, mc.oomKills())
	assert.Zero(t, mc.oomKills(), "OOM kills in the cgroup")

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-exited:
		require.NoError(t, err, "kiln serve stops cleanly")
	case <-time.After(time.Minute):
		t.Fatal("kiln serve did not stop within a minute of SIGTERM")
	}
}
