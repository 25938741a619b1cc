package serving

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/metrics"
)

// soakDuration is KILN_SOAK_SECONDS: 60 s by default (the run `make test`
// makes once, in `go test ./...`); `make soak` runs 600 s.
func soakDuration(t *testing.T) time.Duration {
	s := os.Getenv("KILN_SOAK_SECONDS")
	if s == "" {
		return 60 * time.Second
	}
	f, err := strconv.ParseFloat(s, 64)
	require.NoError(t, err, "KILN_SOAK_SECONDS")
	require.Greater(t, f, 0.0, "KILN_SOAK_SECONDS")
	return time.Duration(f * float64(time.Second))
}

// soakMaxMessage is the soak server's message and body limit: small, so
// that over-limit requests are cheap to send; every valid request is far
// below it.
const soakMaxMessage = 1 << 20

// The soak's clients, by protocol: clients [0, 96) are gRPC ModelInfer,
// [96, 128) gRPC ModelStreamInfer, [128, 176) HTTP with the binary
// extension, [176, 208) HTTP JSON and [208, 256) Flight DoExchange (with a
// few Flight control calls).
const (
	soakClients = 256
	protoInfer  = "grpc ModelInfer"
	protoStream = "grpc ModelStreamInfer"
	protoBinary = "http binary"
	protoJSON   = "http json"
	protoFlight = "flight DoExchange"
	protoFlctl  = "flight control"
)

var soakProtocols = []string{protoInfer, protoStream, protoBinary, protoJSON, protoFlight, protoFlctl}

func soakProtocolOf(client int) string {
	switch {
	case client < 96:
		return protoInfer
	case client < 128:
		return protoStream
	case client < 176:
		return protoBinary
	case client < 208:
		return protoJSON
	}
	return protoFlight
}

// soakCounts counts the requests of one phase by protocol, case and the
// outcome (a gRPC code or an HTTP status), and keeps the first problems.
type soakCounts struct {
	mu       sync.Mutex
	n        map[[3]string]int64
	problems []string
	nProblem int
	total    atomic.Int64
}

func newSoakCounts() *soakCounts { return &soakCounts{n: map[[3]string]int64{}} }

// add counts one request of proto: kase is "valid" or the invalid case,
// outcome what it got.
func (c *soakCounts) add(proto, kase, outcome string) {
	c.total.Add(1)
	c.mu.Lock()
	c.n[[3]string{proto, kase, outcome}]++
	c.mu.Unlock()
}

func (c *soakCounts) problem(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nProblem++
	if len(c.problems) < 20 {
		c.problems = append(c.problems, fmt.Sprintf(format, args...))
	}
}

// byProtocol returns, per protocol, its request count and its counts by
// outcome.
func (c *soakCounts) byProtocol() (map[string]int64, map[string]map[string]int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	total := map[string]int64{}
	outcomes := map[string]map[string]int64{}
	for k, n := range c.n {
		total[k[0]] += n
		if outcomes[k[0]] == nil {
			outcomes[k[0]] = map[string]int64{}
		}
		outcomes[k[0]][k[2]] += n
	}
	return total, outcomes
}

// table is the phase's counts, one line per protocol, then one per
// (protocol, case, outcome).
func (c *soakCounts) table(dur time.Duration) string {
	total, outcomes := c.byProtocol()
	var b strings.Builder
	fmt.Fprintf(&b, "%-22s %10s %8s  outcomes\n", "protocol", "requests", "per s")
	var all int64
	for _, p := range soakProtocols {
		var outs []string
		for o, n := range outcomes[p] {
			outs = append(outs, fmt.Sprintf("%s %d", o, n))
		}
		slices.Sort(outs)
		fmt.Fprintf(&b, "%-22s %10d %8.0f  %s\n", p, total[p], float64(total[p])/dur.Seconds(), strings.Join(outs, ", "))
		all += total[p]
	}
	fmt.Fprintf(&b, "%-22s %10d %8.0f\n", "all", all, float64(all)/dur.Seconds())
	c.mu.Lock()
	keys := make([][3]string, 0, len(c.n))
	for k := range c.n {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b [3]string) int {
		return strings.Compare(a[0]+"\x00"+a[1]+"\x00"+a[2], b[0]+"\x00"+b[1]+"\x00"+b[2])
	})
	b.WriteString("by case:\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "  %-22s %-28s %-22s %9d\n", k[0], k[1], k[2], c.n[k])
	}
	c.mu.Unlock()
	return b.String()
}

// soakSample is the process's state at one moment: resident memory,
// goroutines, open file descriptors and live native tensors (the soak's
// clients and the server share the process), and the requests made so
// far in the phase.
type soakSample struct {
	label      string
	at         time.Duration
	rss        int64
	goroutines int
	fds        int
	tensors    int64
	requests   int64
}

func rssBytes(t *testing.T) int64 {
	raw, err := os.ReadFile("/proc/self/status")
	require.NoError(t, err)
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			require.NoError(t, err, line)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents)
}

func sampleTable(samples []soakSample) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-10s %8s %9s %11s %6s %13s %10s\n", "sample", "at", "RSS MiB", "goroutines", "fds", "live tensors", "requests")
	for _, s := range samples {
		reqs := "-" // at rest
		if !strings.HasPrefix(s.label, "rest") {
			reqs = strconv.FormatInt(s.requests, 10)
		}
		fmt.Fprintf(&b, "%-10s %8s %9d %11d %6d %13d %10s\n", s.label, s.at.Round(time.Second), s.rss>>20, s.goroutines, s.fds, s.tensors, reqs)
	}
	return b.String()
}

// soak is the server under test and its clients' connections.
type soak struct {
	t        *testing.T
	srv      *Server
	base     string // http://host:port
	conns    []*grpc.ClientConn
	infer    []pb.GRPCInferenceServiceClient
	httpc    *http.Client
	flights  []flight.Client
	start    time.Time
	deadline time.Time
	counts   *soakCounts
}

func (s *soak) sample(label string, counts *soakCounts) soakSample {
	smp := soakSample{label: label, at: time.Since(s.start), rss: rssBytes(s.t), goroutines: runtime.NumGoroutine(),
		fds: openFDs(s.t), tensors: core.LiveTensors()}
	if counts != nil {
		smp.requests = counts.total.Load()
	}
	return smp
}

// run runs the 256 clients for dur, each sending requests one after the
// other, and samples the process every `every` (when not zero).
func (s *soak) run(dur, every time.Duration, samples *[]soakSample) *soakCounts {
	counts := newSoakCounts()
	s.counts, s.deadline = counts, time.Now().Add(dur)
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	if every > 0 {
		sampler.Go(func() {
			tick := time.NewTicker(every)
			defer tick.Stop()
			for i := 1; ; i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
					*samples = append(*samples, s.sample(fmt.Sprintf("load %d", i), counts))
				}
			}
		})
	}
	var wg sync.WaitGroup
	for client := range soakClients {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(client), uint64(s.start.UnixNano())))
			for seq := 0; time.Now().Before(s.deadline); seq++ {
				switch soakProtocolOf(client) {
				case protoInfer:
					s.grpcInfer(client, seq, rng)
				case protoStream:
					s.grpcStream(client, seq, rng)
				case protoBinary:
					s.httpBinary(client, seq, rng)
				case protoJSON:
					s.httpJSON(client, seq, rng)
				case protoFlight:
					if rng.IntN(10) == 0 {
						s.flightControl(rng)
					} else {
						s.flightExchange(client, seq, rng)
					}
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	sampler.Wait()
	return counts
}

// rest waits until the process is at rest after a phase (idle HTTP
// connections closed, every request's goroutines ended) and samples it:
// until goroutines, open files and live tensors stay the same for a
// second and done (when not nil) holds, or a minute passed (the
// assertions that follow judge the sample).
func (s *soak) rest(label string, done func(soakSample) bool) soakSample {
	s.httpc.CloseIdleConnections()
	deadline := time.Now().Add(time.Minute)
	var last soakSample
	for stable := 0; ; {
		runtime.GC()
		smp := s.sample(label, nil)
		if smp.goroutines == last.goroutines && smp.fds == last.fds && smp.tensors == last.tensors {
			stable++
		} else {
			stable = 0
		}
		if stable >= 5 && (done == nil || done(smp)) || time.Now().After(deadline) {
			return smp
		}
		last = smp
		time.Sleep(200 * time.Millisecond)
	}
}

// scrapeGauges returns the unlabelled samples of the metrics endpoint.
func (s *soak) scrapeGauges() map[string]float64 {
	t := s.t
	req, err := http.NewRequest("GET", "http://"+s.srv.MetricsAddr().String()+"/metrics", nil)
	require.NoError(t, err)
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || strings.Contains(line, "{") {
			continue
		}
		if name, val, ok := strings.Cut(line, " "); ok {
			if f, err := strconv.ParseFloat(val, 64); err == nil {
				out[name] = f
			}
		}
	}
	require.NoError(t, sc.Err())
	return out
}

// TestSoak runs 256 concurrent clients for KILN_SOAK_SECONDS (default
// 60 s; `make soak`: 600 s) of mixed valid and invalid traffic on every
// protocol, after a warm-up of the same traffic (10 s, or a sixth of a
// shorter run): gRPC ModelInfer (over 8 connections) and ModelStreamInfer,
// HTTP/REST JSON and binary extension, Arrow Flight DoExchange and Flight
// control calls (soak_clients_test.go says which requests).
//
// Every valid request carries values unique to its client and sequence
// number, and its answer must be exactly its own result (y = x·scale + 1,
// s = row sums: cross-talk between batched requests shows); the one error
// a valid request may get is RESOURCE_EXHAUSTED (HTTP 429) from "tight",
// a model whose queue holds 8. Every invalid request must get its own
// error code. The process (server and clients) is sampled at rest after
// the warm-up, every tenth of the run, and at rest after it; the test
// asserts that the process comes back flat:
//
//   - live native tensors at rest after the load equal the count at rest
//     before it, exactly: every request closes what it made;
//   - goroutines at rest come back within 16 of the count before: the
//     clients' connections are the same; the slack covers runtime and
//     gRPC goroutines that come and go, while a leak of one per request,
//     stream or connection would be thousands;
//   - open files at rest come back within 8 (idle HTTP connections are
//     closed at both rest points; a leaked connection per request or
//     stream would be thousands);
//   - RSS during the second half of the load, and at rest after it, stays
//     within 25% + 64 MiB of the sample at the middle of the load: the
//     allocators reach their working set in the first half, while a leak
//     of a kilobyte per request over the second half would be
//     hundreds of MiB.
//
// The endpoint's kiln_native_tensors_live gauge must equal the count.
func TestSoak(t *testing.T) {
	dur := soakDuration(t)
	warm := min(10*time.Second, dur/6)
	root := testkit.CopyFixture(t, "serving-repo")
	require.NoError(t, os.CopyFS(filepath.Join(root, "tight"), os.DirFS(filepath.Join(root, "affine"))))
	require.NoError(t, os.WriteFile(filepath.Join(root, "tight", "config.yaml"), []byte(`
max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}, {name: s, datatype: FP32, dims: []}]
dynamic_batching: {max_queue_delay_us: 1000, max_queue_size: 8}
version_policy: {all: true}
`), 0o644))
	cfg := testConfig(root, Config{MaxMessageBytes: soakMaxMessage})
	cfg.HTTPPort, cfg.MetricsPort, cfg.FlightPort, cfg.DataDir = 0, 0, 0, t.TempDir()
	srv, err := New(cfg)
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background()))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		assert.NoError(t, srv.Shutdown(ctx))
	})

	s := &soak{t: t, srv: srv, base: "http://" + srv.HTTPAddr().String(), start: time.Now(),
		httpc: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}}
	for range 8 {
		c, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		s.conns = append(s.conns, c)
		s.infer = append(s.infer, pb.NewGRPCInferenceServiceClient(c))
	}
	for range 4 {
		fc, err := flight.NewClientWithMiddleware(srv.FlightAddr().String(), nil, nil, grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		t.Cleanup(func() { fc.Close() })
		s.flights = append(s.flights, fc)
	}

	warmCounts := s.run(warm, 0, nil)
	base := s.rest("rest 0", nil)
	s.start, base.at = time.Now(), 0
	samples := []soakSample{base}
	counts := s.run(dur, max(dur/10, time.Second), &samples)
	loadEnd := len(samples)
	// At rest: back to the tensors and within the slack of the goroutines
	// and files of the first rest (or a minute passed).
	end := s.rest("rest end", func(smp soakSample) bool {
		return smp.tensors == base.tensors && smp.goroutines <= base.goroutines+16 && smp.fds <= base.fds+8
	})
	samples = append(samples, end)
	gauges := s.scrapeGauges()

	t.Logf("soak: %d clients, %v of load after %v of warm-up (%d requests)\n%s\n%s", soakClients, dur, warm,
		warmCounts.total.Load(), sampleTable(samples), counts.table(dur))
	for _, c := range []*soakCounts{warmCounts, counts} {
		assert.Zero(t, c.nProblem, "%d problems, the first: %s", c.nProblem, strings.Join(c.problems, "\n"))
	}
	total, outcomes := counts.byProtocol()
	for _, p := range soakProtocols {
		assert.Positive(t, outcomes[p]["OK"]+outcomes[p]["HTTP 200"], "%s: no request succeeded (%d made)", p, total[p])
	}

	assert.Equal(t, base.tensors, end.tensors, "live native tensors at rest")
	assert.LessOrEqual(t, end.goroutines, base.goroutines+16, "goroutines at rest")
	assert.LessOrEqual(t, end.fds, base.fds+8, "open files at rest")
	mid := samples[(loadEnd+1)/2] // the first sample of the second half
	bound := mid.rss + mid.rss/4 + 64<<20
	for _, smp := range samples[(loadEnd+1)/2:] {
		assert.LessOrEqual(t, smp.rss, bound, "RSS at %s: %d MiB, the middle of the load %d MiB", smp.label, smp.rss>>20, mid.rss>>20)
	}
	assert.Equal(t, float64(end.tensors), gauges[metrics.LiveTensorsName], "the metrics endpoint's %s", metrics.LiveTensorsName)
	for _, g := range []string{"go_goroutines", "process_open_fds", "process_resident_memory_bytes"} {
		assert.Contains(t, gauges, g)
	}
}
