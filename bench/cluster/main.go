// Command cluster measures Kiln's throughput as replicas are added behind
// a real load balancer: one `kiln serve` replica reached directly, one
// behind nginx, and three behind nginx, each replica in its own network
// namespace (its own host, as pods are), all serving the bench-serve
// repository's mlp (784 -> 512 -> 256 -> 10). Each setup runs the same
// closed-loop load of -clients workers over gRPC and over REST (binary
// tensor extension) for -duration after -warmup, and the command prints one
// table: requests per second, latency percentiles and errors.
//
//	make bench-cluster            # or:
//	go build -o bin/kiln ./cmd/kiln && go run ./bench/cluster -kiln bin/kiln
//
// It needs root (network namespaces), iproute2 and nginx (scripts/install-deps
// installs both). Replicas share this machine's CPUs, so three replicas
// scale only as far as the cores allow: on a 2-core machine the table shows
// the balancer's cost, not a speed-up.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
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
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnml/kiln/internal/loadgen"
	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
)

const (
	httpPort = 8000
	grpcPort = 8001
	rowElems = 784
)

// replica is one `kiln serve` in its own network namespace.
// replica is a `kiln serve` child process in a network namespace of its
// own.
type replica struct {
	*testkit.Process
	ns *testkit.NetNS
}

func (r *replica) addr(port int) string {
	return net.JoinHostPort(r.ns.Peer.String(), strconv.Itoa(port))
}

func startReplica(kiln, repo string, threads int) (*replica, error) {
	ns, err := testkit.CreateNetNS()
	if err != nil {
		return nil, err
	}
	r := &replica{ns: ns}
	cmd := ns.Command(context.Background(), kiln, "serve", "--model-repository", repo, "--host", "0.0.0.0",
		"--http-port", strconv.Itoa(httpPort), "--grpc-port", strconv.Itoa(grpcPort),
		"--metrics-port", "-1", "--flight-port", "-1")
	cmd.Env = append(os.Environ(), "KILN_NUM_THREADS="+strconv.Itoa(threads))
	if r.Process, err = testkit.StartProcess(cmd, "http://"+r.addr(httpPort)+"/v2/health/ready"); err != nil {
		return nil, errors.Join(fmt.Errorf("replica: %w", err), ns.Close())
	}
	return r, nil
}

func (r *replica) stop() {
	r.Stop()
	if err := r.ns.Close(); err != nil {
		log.Print(err)
	}
}

func row() []byte {
	b := make([]byte, 4*rowElems)
	for i := 0; i < rowElems; i++ {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(float32(i%17)/17))
	}
	return b
}

// grpcLoad runs the load over gRPC against addr (host:port).
func grpcLoad(addr string, clients int, warm, dur time.Duration) (loadgen.Result, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return loadgen.Result{}, err
	}
	defer conn.Close()
	c := pb.NewGRPCInferenceServiceClient(conn)
	req := &pb.ModelInferRequest{ModelName: "mlp",
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, rowElems}}},
		RawInputContents: [][]byte{row()}}
	return loadgen.Run(clients, warm, dur, func(int) error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		resp, err := c.ModelInfer(ctx, req)
		if err == nil && (len(resp.RawOutputContents) != 1 || len(resp.RawOutputContents[0]) != 40) {
			err = fmt.Errorf("unexpected answer: %v", resp)
		}
		return err
	}), nil
}

// restLoad runs the load over REST (KServe's binary tensor extension)
// against addr (host:port).
func restLoad(addr string, clients int, warm, dur time.Duration) loadgen.Result {
	header := fmt.Appendf(nil, `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,%d],"parameters":{"binary_data_size":%d}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}`,
		rowElems, 4*rowElems)
	body := append(append([]byte(nil), header...), row()...)
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	url := "http://" + addr + "/v2/models/mlp/infer"
	return loadgen.Run(clients, warm, dur, func(int) error {
		req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Inference-Header-Content-Length", strconv.Itoa(len(header)))
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("HTTP %d: %.200s", resp.StatusCode, b)
		}
		return nil
	})
}

func main() {
	kiln := flag.String("kiln", "bin/kiln", "the kiln binary (go build -o bin/kiln ./cmd/kiln)")
	clients := flag.Int("clients", 16, "concurrent closed-loop clients")
	warm := flag.Duration("warmup", 2*time.Second, "load before measuring, per run")
	dur := flag.Duration("duration", 5*time.Second, "measured load per run")
	threads := flag.Int("threads", 1, "libtorch intra-op threads per replica (KILN_NUM_THREADS)")
	flag.Parse()
	if err := run(*kiln, *clients, *threads, *warm, *dur); err != nil {
		log.Fatal(err)
	}
}

func run(kiln string, clients, threads int, warm, dur time.Duration) error {
	kiln, err := filepath.Abs(kiln)
	if err != nil {
		return err
	}
	if _, err := os.Stat(kiln); err != nil {
		return fmt.Errorf("%w (build it: go build -o bin/kiln ./cmd/kiln)", err)
	}
	tmp, err := os.MkdirTemp("", "kiln-bench-cluster-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	repo := filepath.Join(tmp, "repo")
	if err := testkit.MakeFixture("bench-serve", repo); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var replicas []*replica
	defer func() {
		for _, r := range replicas {
			r.stop()
		}
	}()
	for range 3 {
		r, err := startReplica(kiln, repo, threads)
		if err != nil {
			return err
		}
		replicas = append(replicas, r)
	}
	balancer := func(n int) (*testkit.Nginx, error) {
		var h, g []string
		for _, r := range replicas[:n] {
			h, g = append(h, r.addr(httpPort)), append(g, r.addr(grpcPort))
		}
		dir, err := os.MkdirTemp(tmp, "nginx-")
		if err != nil {
			return nil, err
		}
		return testkit.StartNginx(testkit.BalancerConfig{HTTPUpstreams: h, GRPCUpstreams: g}, dir)
	}

	type row struct {
		setup, proto string
		replicas     int
		res          loadgen.Result
	}
	var rows []row
	measure := func(setup string, n int, httpAddr, grpcAddr string) error {
		for _, proto := range []string{"gRPC", "REST"} {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var res loadgen.Result
			if proto == "gRPC" {
				if res, err = grpcLoad(grpcAddr, clients, warm, dur); err != nil {
					return err
				}
			} else {
				res = restLoad(httpAddr, clients, warm, dur)
			}
			rows = append(rows, row{setup, proto, n, res})
			fmt.Fprintf(os.Stderr, "  %-22s %-4s %8.0f req/s  errors %d\n", setup, proto, res.RPS(), res.Errors)
		}
		return nil
	}
	fmt.Fprintf(os.Stderr, "bench/cluster: mlp 784->512->256->10, %d clients, %s warm-up + %s per run, %d thread(s) per replica, %d CPUs\n",
		clients, warm, dur, threads, runtime.NumCPU())
	if err := measure("direct (no balancer)", 1, replicas[0].addr(httpPort), replicas[0].addr(grpcPort)); err != nil {
		return err
	}
	for _, n := range []int{1, 3} {
		lb, err := balancer(n)
		if err != nil {
			return err
		}
		err = measure("nginx", n, lb.HTTPAddr, lb.GRPCAddr)
		if serr := lb.Stop(); err == nil {
			err = serr
		}
		if err != nil {
			return err
		}
	}

	fmt.Printf("\nKiln replicas behind nginx (%s), mlp, %d closed-loop clients, %s per run, %d CPUs on this machine\n\n",
		nginxVersion(), clients, dur, runtime.NumCPU())
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "setup\tprotocol\treplicas\treq/s\tvs 1 replica\tp50 ms\tp99 ms\terrors\t")
	base := map[string]float64{}
	for _, r := range rows {
		if r.setup == "nginx" && r.replicas == 1 {
			base[r.proto] = r.res.RPS()
		}
	}
	for _, r := range rows {
		rel := "-"
		if r.setup == "nginx" && base[r.proto] > 0 {
			rel = fmt.Sprintf("%.2fx", r.res.RPS()/base[r.proto])
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.0f\t%s\t%.2f\t%.2f\t%d\t\n", r.setup, r.proto, r.replicas, r.res.RPS(), rel,
			float64(r.res.Pct(0.5).Microseconds())/1000, float64(r.res.Pct(0.99).Microseconds())/1000, r.res.Errors)
		if r.res.FirstErr != nil {
			log.Printf("%s %s x%d: first error: %v", r.setup, r.proto, r.replicas, r.res.FirstErr)
		}
	}
	return tw.Flush()
}

func nginxVersion() string {
	p, err := testkit.NginxPath()
	if err != nil {
		return "nginx ?"
	}
	out, _ := exec.Command(p, "-v").CombinedOutput()
	return string(bytes.TrimSpace(bytes.TrimPrefix(out, []byte("nginx version: "))))
}
