// Command rollout measures what a rollout's shadow traffic costs the
// clients of production: a `kiln serve` process serves the rollout-repo
// fixture's clf (16 → 4 scores plus a few hundred microseconds of matmuls
// per forward); closed-loop clients (-clients, default 8, unary gRPC, one
// row each) load it with no rollout, then with rollouts whose candidate
// (version 2, the same work) takes no traffic but receives each -shadow
// share of production's requests as shadow traffic (steps [0, 100], a
// window longer than the run). The table gives requests per second, the
// clients' p50 and p99 latency, p50 against the baseline, and how many
// requests were shadowed. Issue 14's target: shadow traffic adds at most
// 5% to production's p50 at concurrency 8.
//
//	make bench-rollout          # or:
//	go build -o bin/kiln ./cmd/kiln && go run ./bench/rollout -kiln bin/kiln
//
// Server and clients share the machine's CPUs; on 2 cores a shadowed
// request's candidate forward competes with production's, so the p50 cost
// grows with the share.
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
	"log"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnml/kiln/internal/loadgen"
	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/rollout"
)

func main() {
	kiln := flag.String("kiln", "bin/kiln", "the kiln binary (go build -o bin/kiln ./cmd/kiln)")
	clients := flag.Int("clients", 8, "concurrent closed-loop clients")
	warm := flag.Duration("warmup", 2*time.Second, "load before measuring, per row")
	dur := flag.Duration("duration", 5*time.Second, "measured load per row")
	threads := flag.Int("threads", 1, "libtorch intra-op threads of the server (KILN_NUM_THREADS)")
	shares := flag.String("shadow", "0.05,0.1,0.25,1", "shadow shares to measure, comma-separated")
	flag.Parse()
	if err := run(*kiln, *clients, *threads, *warm, *dur, *shares); err != nil {
		log.Fatal(err)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// server is a `kiln serve` child process on loopback.
type server struct {
	*testkit.Process
	grpc, http string
}

func startServer(kiln, repo, state string, threads int) (*server, error) {
	gp, err := freePort()
	if err != nil {
		return nil, err
	}
	hp, err := freePort()
	if err != nil {
		return nil, err
	}
	s := &server{grpc: fmt.Sprintf("127.0.0.1:%d", gp), http: fmt.Sprintf("http://127.0.0.1:%d", hp)}
	cmd := exec.Command(kiln, "serve", "--model-repository", repo, "--host", "127.0.0.1",
		"--grpc-port", strconv.Itoa(gp), "--http-port", strconv.Itoa(hp), "--metrics-port", "-1", "--flight-port", "-1",
		"--rollout-state", state)
	cmd.Env = append(os.Environ(), "KILN_NUM_THREADS="+strconv.Itoa(threads))
	if s.Process, err = testkit.StartProcess(cmd, s.http+"/v2/health/ready"); err != nil {
		return nil, err
	}
	return s, nil
}

// call posts to the rollout API and decodes the status.
func (s *server) call(path string, body any) (rollout.Status, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return rollout.Status{}, err
	}
	resp, err := http.Post(s.http+path, "application/json", bytes.NewReader(b))
	if err != nil {
		return rollout.Status{}, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		return rollout.Status{}, err
	}
	if resp.StatusCode != http.StatusOK {
		return rollout.Status{}, fmt.Errorf("POST %s: HTTP %d: %s", path, resp.StatusCode, out)
	}
	var st rollout.Status
	return st, json.Unmarshal(out, &st)
}

func (s *server) status() (rollout.Status, error) {
	resp, err := http.Get(s.http + "/v2/rollouts/clf")
	if err != nil {
		return rollout.Status{}, err
	}
	defer resp.Body.Close()
	var st rollout.Status
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

type row struct {
	shadow   float64
	res      loadgen.Result
	shadowed uint64
}

func run(kiln string, clients, threads int, warm, dur time.Duration, sharesFlag string) error {
	var shares []float64
	for _, f := range strings.Split(sharesFlag, ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || !(v > 0 && v <= 1) {
			return fmt.Errorf("-shadow %q: want shares in (0, 1]", f)
		}
		shares = append(shares, v)
	}
	tmp, err := os.MkdirTemp("", "kiln-bench-rollout-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	repo := filepath.Join(tmp, "repo")
	if err := testkit.MakeFixture("rollout-repo", repo); err != nil {
		return err
	}
	srv, err := startServer(kiln, repo, filepath.Join(tmp, "rollouts"), threads)
	if err != nil {
		return err
	}
	defer srv.Stop()
	conn, err := grpc.NewClient(srv.grpc, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	c := pb.NewGRPCInferenceServiceClient(conn)
	x := make([]byte, 4*16)
	for i := range 16 {
		binary.LittleEndian.PutUint32(x[4*i:], math.Float32bits(float32(i)/17))
	}
	req := &pb.ModelInferRequest{ModelName: "clf",
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 16}}},
		RawInputContents: [][]byte{x}}
	measure := func() loadgen.Result {
		return loadgen.Run(clients, warm, dur, func(int) error {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			resp, err := c.ModelInfer(ctx, req)
			if err == nil && resp.GetModelVersion() != "1" {
				err = fmt.Errorf("answered by version %s, not production", resp.GetModelVersion())
			}
			return err
		})
	}
	var rows []row
	fmt.Fprintf(os.Stderr, "baseline (no rollout), %d clients ...\n", clients)
	rows = append(rows, row{res: measure()})
	for _, sh := range shares {
		fmt.Fprintf(os.Stderr, "shadow %.0f%% ...\n", 100*sh)
		if _, err := srv.call("/v2/rollouts/clf/start", map[string]any{"candidate": 2, "steps": []float64{0, 100}, "window": "1h", "shadow": sh}); err != nil {
			return err
		}
		res := measure()
		st, err := srv.status()
		if err != nil {
			return err
		}
		var shadowed uint64
		if st.Live != nil {
			shadowed = st.Live.Shadowed
		}
		if _, err := srv.call("/v2/rollouts/clf/abort", map[string]string{"reason": "benchmark row done"}); err != nil {
			return err
		}
		rows = append(rows, row{shadow: sh, res: res, shadowed: shadowed})
	}
	fmt.Fprintf(os.Stderr, "baseline again (rollouts aborted) ...\n")
	rows = append(rows, row{shadow: -1, res: measure()})

	fmt.Printf("\nShadow traffic's cost to production (clf, %d closed-loop gRPC clients, one row per request, %s measured per row, server threads %d, %d CPUs)\n\n",
		clients, dur, threads, runtimeCPUs())
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "shadow share\treq/s\tp50 ms\tp99 ms\tp50 vs baseline\tshadowed\terrors\t")
	base := rows[0].res.Pct(0.5)
	var errs []error
	for _, r := range rows {
		name := "none (baseline)"
		if r.shadow < 0 {
			name = "none (after the rollouts)"
		}
		if r.shadow > 0 {
			name = fmt.Sprintf("%.0f%%", 100*r.shadow)
		}
		rel := "-"
		if r.shadow != 0 && base > 0 {
			rel = fmt.Sprintf("%+.1f%%", 100*(float64(r.res.Pct(0.5))/float64(base)-1))
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%.3f\t%.3f\t%s\t%d\t%d\t\n", name, r.res.RPS(), float64(r.res.Pct(0.5).Microseconds())/1000,
			float64(r.res.Pct(0.99).Microseconds())/1000, rel, r.shadowed, r.res.Errors)
		if r.res.FirstErr != nil {
			errs = append(errs, fmt.Errorf("shadow %v: %w", r.shadow, r.res.FirstErr))
		}
	}
	tw.Flush()
	return errors.Join(errs...)
}

func runtimeCPUs() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "processor\t:")
}
