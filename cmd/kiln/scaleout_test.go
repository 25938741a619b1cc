package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
)

// The scale-out test (issue 16): Kiln replicas, each `kiln serve` in its own
// network namespace (its own host, as pods are), behind a real nginx
// balancing REST (HTTP/1.1) and gRPC (HTTP/2), all serving one shared model
// repository in poll mode.

// Ports of every replica: each namespace has its own port space, so every
// replica listens on Kiln's default ports, as pods do.
const (
	replicaHTTPPort    = 8000
	replicaGRPCPort    = 8001
	replicaMetricsPort = 8002
)

// scaleOutPoll is the replicas' --repository-poll-secs.
const scaleOutPoll = time.Second

// affineConfig serves the newest version of affine only, so that a new
// version replaces the served one (atomically, in each replica).
const affineConfig = `max_batch_size: 8
inputs:
  - {name: x, datatype: FP32, dims: [4]}
outputs:
  - {name: y, datatype: FP32, dims: [4]}
  - {name: s, datatype: FP32, dims: []}
dynamic_batching:
  max_queue_delay_us: 500
instance_count: 1
version_policy: {latest: {num_versions: 1}}
`

// replica is one `kiln serve` process in a network namespace.
type replica struct {
	ns     *testkit.NetNS
	cmd    *exec.Cmd
	done   chan error
	stderr *bytes.Buffer
	mu     *sync.Mutex // guards stderr
}

func (r *replica) addr(port int) string {
	return net.JoinHostPort(r.ns.Peer.String(), strconv.Itoa(port))
}

// startReplica starts this test binary as `kiln serve` inside ns over
// repo, with the extra environment env; it is stopped (SIGTERM) in
// t.Cleanup unless the test killed it.
func startReplica(t *testing.T, ns *testkit.NetNS, repo string, env []string) *replica {
	t.Helper()
	r := &replica{ns: ns, done: make(chan error, 1), stderr: new(bytes.Buffer), mu: new(sync.Mutex)}
	r.cmd = ns.Command(context.Background(), os.Args[0], "serve",
		"--model-repository", repo, "--host", "0.0.0.0",
		"--http-port", strconv.Itoa(replicaHTTPPort), "--grpc-port", strconv.Itoa(replicaGRPCPort),
		"--metrics-port", strconv.Itoa(replicaMetricsPort), "--flight-port", "-1",
		"--model-control-mode", "poll", "--repository-poll-secs", strconv.FormatFloat(scaleOutPoll.Seconds(), 'f', -1, 64),
		"--shutdown-timeout", "10s")
	r.cmd.Env = append(append(os.Environ(), "KILN_TEST_MAIN=1", "KILN_NUM_THREADS=1"), env...)
	r.cmd.Stdout = io.Discard
	r.cmd.Stderr = lockedWriter{r.mu, r.stderr}
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, r.cmd.Start())
	go func() { r.done <- r.cmd.Wait() }()
	t.Cleanup(func() {
		select {
		case err := <-r.done: // killed by the test, or died
			r.done <- err
			return
		default:
		}
		_ = r.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-r.done:
			r.done <- err
			assert.NoError(t, err, "replica in %s did not exit cleanly on SIGTERM: %s", ns.Name, r.log())
		case <-time.After(30 * time.Second):
			_ = r.cmd.Process.Kill()
			t.Errorf("replica in %s did not stop within 30 s of SIGTERM", ns.Name)
		}
	})
	return r
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (r *replica) log() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stderr.String()
}

// waitReady waits until the replica's /v2/health/ready answers 200.
func (r *replica) waitReady(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	url := "http://" + r.addr(replicaHTTPPort) + "/v2/health/ready"
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case err := <-r.done:
			r.done <- err
			t.Fatalf("replica in %s exited (%v): %s", r.ns.Name, err, r.log())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica in %s not ready after %s: %s", r.ns.Name, timeout, r.log())
		}
	}
}

// servedVersion asks the replica directly (not through the balancer) which
// version of affine answers a request that names none: the output
// y = x*scale + 1 tells (version 1: scale 2, version 2: scale 3).
func (r *replica) servedVersion() (string, error) {
	v, _, err := restInfer(http.DefaultClient, "http://"+r.addr(replicaHTTPPort))
	return v, err
}

// successes returns the replica's nv_inference_request_success of affine,
// all versions summed, from its /metrics.
func (r *replica) successes() (float64, error) {
	resp, err := http.Get("http://" + r.addr(replicaMetricsPort) + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, `nv_inference_request_success{model="affine"`) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, err
		}
		sum += v
	}
	return sum, sc.Err()
}

// affineInput is the input every load request sends; the expected output
// is x*scale + 1 for the version's scale.
var affineInput = []float32{1, 2, 3, 4}

// versionOf returns which version computed y from affineInput, or an error
// when y matches none.
func versionOf(y []float32) (string, error) {
	for _, c := range []struct {
		version string
		scale   float32
	}{{"1", 2}, {"2", 3}} {
		ok := len(y) == len(affineInput)
		for i := 0; ok && i < len(y); i++ {
			ok = math.Abs(float64(y[i]-(affineInput[i]*c.scale+1))) < 1e-5
		}
		if ok {
			return c.version, nil
		}
	}
	return "", fmt.Errorf("output %v is no version's answer to %v", y, affineInput)
}

// restInfer sends one REST inference of affine (no version named) to base
// and returns the version the answer came from (checked against the
// output) and the HTTP status.
func restInfer(c *http.Client, base string) (string, int, error) {
	body := fmt.Sprintf(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[%g,%g,%g,%g]}],"outputs":[{"name":"y"}]}`,
		affineInput[0], affineInput[1], affineInput[2], affineInput[3])
	resp, err := c.Post(base+"/v2/models/affine/infer", "application/json", strings.NewReader(body))
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", resp.StatusCode, err
	}
	if resp.StatusCode != http.StatusOK {
		return "", resp.StatusCode, fmt.Errorf("HTTP %d: %s", resp.StatusCode, b)
	}
	var out struct {
		ModelVersion string `json:"model_version"`
		Outputs      []struct {
			Name string    `json:"name"`
			Data []float32 `json:"data"`
		} `json:"outputs"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return "", resp.StatusCode, fmt.Errorf("%w: %s", err, b)
	}
	if len(out.Outputs) != 1 {
		return "", resp.StatusCode, fmt.Errorf("want output y only: %s", b)
	}
	v, err := versionOf(out.Outputs[0].Data)
	if err != nil {
		return "", resp.StatusCode, err
	}
	if v != out.ModelVersion {
		return "", resp.StatusCode, fmt.Errorf("model_version %q but the output is version %s's", out.ModelVersion, v)
	}
	return v, resp.StatusCode, nil
}

// grpcInfer sends one gRPC ModelInfer of affine and returns the version
// the answer came from.
func grpcInfer(ctx context.Context, c pb.GRPCInferenceServiceClient) (string, error) {
	raw := make([]byte, 4*len(affineInput))
	for i, v := range affineInput {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	resp, err := c.ModelInfer(ctx, &pb.ModelInferRequest{
		ModelName:        "affine",
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 4}}},
		Outputs:          []*pb.ModelInferRequest_InferRequestedOutputTensor{{Name: "y"}},
		RawInputContents: [][]byte{raw},
	})
	if err != nil {
		return "", err
	}
	if len(resp.RawOutputContents) != 1 || len(resp.RawOutputContents[0]) != 4*len(affineInput) {
		return "", fmt.Errorf("want output y only, %d bytes: %v", 4*len(affineInput), resp)
	}
	y := make([]float32, len(affineInput))
	for i := range y {
		y[i] = math.Float32frombits(binary.LittleEndian.Uint32(resp.RawOutputContents[0][4*i:]))
	}
	v, err := versionOf(y)
	if err != nil {
		return "", err
	}
	if v != resp.ModelVersion {
		return "", fmt.Errorf("model_version %q but the output is version %s's", resp.ModelVersion, v)
	}
	return v, nil
}

// loadResult is one request of the load.
type loadResult struct {
	proto      string // "rest" or "grpc"
	start, end time.Time
	version    string
	err        error
}

// load sends requests through the balancer from several clients, REST and
// gRPC, until stop; it keeps every result.
type load struct {
	mu      sync.Mutex
	results []loadResult
	stop    chan struct{}
	wg      sync.WaitGroup
}

func startLoad(t *testing.T, lb *testkit.Nginx, clients int) *load {
	t.Helper()
	conn, err := grpc.NewClient(lb.GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	gc := pb.NewGRPCInferenceServiceClient(conn)
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	l := &load{stop: make(chan struct{})}
	for i := range clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for n := 0; ; n++ {
				select {
				case <-l.stop:
					return
				default:
				}
				r := loadResult{start: time.Now()}
				if i%2 == 0 {
					r.proto = "rest"
					r.version, _, r.err = restInfer(hc, "http://"+lb.HTTPAddr)
				} else {
					r.proto = "grpc"
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					r.version, r.err = grpcInfer(ctx, gc)
					cancel()
				}
				r.end = time.Now()
				l.mu.Lock()
				l.results = append(l.results, r)
				l.mu.Unlock()
			}
		}()
	}
	return l
}

// finish stops the load and returns every result.
func (l *load) finish() []loadResult {
	close(l.stop)
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.results
}

// snapshot returns the results so far.
func (l *load) snapshot() []loadResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]loadResult(nil), l.results...)
}

// failures returns the failed results among rs, with at most 5 examples.
func failures(rs []loadResult) (int, []string) {
	n, ex := 0, []string(nil)
	for _, r := range rs {
		if r.err != nil {
			n++
			if len(ex) < 5 {
				ex = append(ex, fmt.Sprintf("%s at %s: %v", r.proto, r.start.Format("15:04:05.000"), r.err))
			}
		}
	}
	return n, ex
}

// TestScaleOut runs three replicas behind nginx over one repository:
//
//  1. the balancer spreads REST and gRPC requests over all three;
//  2. a new version put into the repository under load reaches every
//     replica within the poll interval (plus its load time), and not one
//     request fails while the replicas switch;
//  3. one replica killed (SIGKILL) under load loses at most the requests
//     it had in flight (and the gRPC ones nginx sent it before marking it
//     down): nginx fails over to the other two, which serve everything
//     after.
func TestScaleOut(t *testing.T) {
	if _, err := testkit.NginxPath(); err != nil && os.Getenv("CI") == "" {
		t.Skip(err)
	}
	nss := []*testkit.NetNS{testkit.NewNetNS(t), testkit.NewNetNS(t), testkit.NewNetNS(t)}
	repo := newScaleOutRepo(t, nss)
	fixture := testkit.Fixture(t, "serving-repo")
	repo.putModel(t, "affine", affineConfig, map[int]string{1: filepath.Join(fixture, "affine", "1")})

	replicas := make([]*replica, len(nss))
	for i, ns := range nss {
		replicas[i] = startReplica(t, ns, repo.uri(i), repo.env(i))
	}
	for _, r := range replicas {
		r.waitReady(t, 60*time.Second)
	}
	var httpUp, grpcUp []string
	for _, r := range replicas {
		httpUp = append(httpUp, r.addr(replicaHTTPPort))
		grpcUp = append(grpcUp, r.addr(replicaGRPCPort))
	}
	lb := testkit.NewNginx(t, testkit.BalancerConfig{HTTPUpstreams: httpUp, GRPCUpstreams: grpcUp})
	t.Logf("nginx: REST %s, gRPC %s over %v / %v", lb.HTTPAddr, lb.GRPCAddr, httpUp, grpcUp)

	ld := startLoad(t, lb, 8)
	stopped := false
	defer func() {
		if !stopped {
			ld.finish()
		}
	}()

	// 1. Every replica serves its share.
	time.Sleep(2 * time.Second)
	for i, r := range replicas {
		n, err := r.successes()
		require.NoError(t, err)
		assert.Positive(t, n, "replica %d (%s) got no request through the balancer", i, r.ns.Peer)
		t.Logf("replica %d (%s): %g requests so far", i, r.ns.Peer, n)
	}
	n, ex := failures(ld.snapshot())
	require.Zero(t, n, "failed requests before any change: %v\nnginx: %s", ex, lb.ErrorLog())

	// 2. Version 2 rolls out under load.
	put := time.Now()
	repo.putVersion(t, "affine", 2, filepath.Join(fixture, "affine", "2"))
	putDone := time.Now()
	switched := make([]time.Duration, len(replicas))
	deadline := putDone.Add(scaleOutPoll + 30*time.Second)
	for i, r := range replicas {
		for {
			v, err := r.servedVersion()
			require.NoError(t, err, "replica %d during the rollout: %s", i, r.log())
			if v == "2" {
				switched[i] = time.Since(putDone)
				break
			}
			require.True(t, time.Now().Before(deadline), "replica %d still serves version %s %s after the upload: %s",
				i, v, time.Since(putDone), r.log())
			time.Sleep(20 * time.Millisecond)
		}
	}
	allSwitched := time.Now()
	t.Logf("upload took %s; version 2 served by the replicas %v after it (poll interval %s)",
		putDone.Sub(put).Round(time.Millisecond), switched, scaleOutPoll)
	time.Sleep(time.Second)
	rs := ld.snapshot()
	n, ex = failures(rs)
	require.Zero(t, n, "failed requests during the rollout: %v\nnginx: %s", ex, lb.ErrorLog())
	var afterV1 int
	for _, r := range rs {
		if r.start.After(allSwitched) && r.version != "2" {
			afterV1++
		}
	}
	assert.Zero(t, afterV1, "answers from version 1 once every replica served version 2")

	// 3. One replica dies under load.
	before := len(ld.snapshot())
	base := make([]float64, 2)
	for i, r := range replicas[1:] {
		base[i], _ = r.successes()
	}
	kill := time.Now()
	require.NoError(t, replicas[0].cmd.Process.Kill())
	replicas[0].done <- <-replicas[0].done
	time.Sleep(3 * time.Second)
	rs = ld.finish()
	stopped = true
	// A request fails only if it was in flight at the kill or was sent to
	// the dead replica before nginx marked it down (its failover window):
	// nginx replays REST requests on another replica (it buffered their
	// bodies) but not gRPC ones (it streams their bodies upstream), which
	// end UNAVAILABLE; after the window every request succeeds.
	const failoverWindow = time.Second
	var inflight, lost, inWindow, late, lateFailed int
	var lostEx []string
	for _, r := range rs[before:] {
		atKill := r.start.Before(kill) && r.end.After(kill)
		window := !r.start.Before(kill) && r.start.Before(kill.Add(failoverWindow))
		if atKill {
			inflight++
		}
		if r.start.After(kill.Add(failoverWindow)) {
			late++
		}
		if r.err == nil {
			continue
		}
		switch {
		case atKill:
			lost++
		case window:
			inWindow++
		default:
			lateFailed++
		}
		if len(lostEx) < 5 {
			lostEx = append(lostEx, fmt.Sprintf("%s %s..%s: %.160v", r.proto, r.start.Format("15:04:05.000"), r.end.Format("15:04:05.000"), r.err))
		}
		if st, ok := status.FromError(r.err); r.proto == "grpc" && ok {
			assert.Equal(t, codes.Unavailable, st.Code(), "a request lost to the dead replica ends UNAVAILABLE (retryable): %v", r.err)
		}
	}
	t.Logf("killed replica 0 at %s with %d requests in flight over the cluster: %d of them failed, %d sent within %s after the kill failed, %d of the %d sent later failed %v",
		kill.Format("15:04:05.000"), inflight, lost, inWindow, failoverWindow, lateFailed, late, lostEx)
	assert.Positive(t, late, "no request after the failover")
	assert.Zero(t, lateFailed, "requests sent after the failover window failed: %v\nnginx: %s", lostEx, lb.ErrorLog())
	for i, r := range replicas[1:] {
		n, err := r.successes()
		require.NoError(t, err)
		assert.Greater(t, n, base[i], "replica %d served nothing after the failover", i+1)
	}
}
