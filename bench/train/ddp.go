package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/dist"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
)

// distRates are the distributed rows' figures: global samples per second
// of the fastest epoch of two ranks, and all-reduce bandwidth in GB/s.
type distRates struct {
	mlp, cnn  float64
	allreduce float64
	bytes     int64
}

// kilnDist trains net on ds with two data-parallel ranks (Config.Workers,
// in this process over loopback Gloo) for epochs+1 epochs, the first a
// warm-up, and returns the global samples/s of the fastest other epoch.
func kilnDist(net *nn.Net, ds *data.Dataset, cfg train.Config, epochs int) (float64, error) {
	cfg.Workers, cfg.Epochs = 2, epochs+1
	res, err := train.Fit(context.Background(), net, ds, nil, cfg, nil)
	if err != nil {
		return 0, err
	}
	best := 0.0
	for _, e := range res.History[1:] {
		best = max(best, float64(ds.Len())/e.Seconds)
	}
	return best, nil
}

// kilnAllReduce times Kiln's all-reduce of one 25 MiB float32 bucket
// between two ranks in this process (reps repetitions after one warm-up),
// in GB/s of the bucket's bytes (algorithm bandwidth, as the Python side).
func kilnAllReduce(reps int) (float64, int64, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, 0, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	const n = 25 << 18
	var gbs float64
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for r := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g, err := dist.Init(dist.Env{MasterAddr: "127.0.0.1", MasterPort: port, Rank: r, WorldSize: 2,
				LocalRank: r, LocalWorldSize: 2, IfName: "lo"}, dist.Options{})
			if err != nil {
				errs[r] = err
				return
			}
			defer g.Close()
			t, err := core.NewTensor(make([]float32, n))
			if err != nil {
				errs[r] = err
				return
			}
			defer t.Close()
			if errs[r] = g.Native().AllReduceTensor(t.Handle()); errs[r] != nil {
				return
			}
			if errs[r] = g.Barrier(); errs[r] != nil {
				return
			}
			t0 := time.Now()
			for range reps {
				if errs[r] = g.Native().AllReduceTensor(t.Handle()); errs[r] != nil {
					return
				}
			}
			if r == 0 {
				gbs = float64(n*4*reps) / time.Since(t0).Seconds() / 1e9
			}
			errs[r] = g.Barrier()
		}()
	}
	wg.Wait()
	for _, e := range errs {
		if e != nil {
			return 0, 0, e
		}
	}
	return gbs, n * 4, nil
}

// torchDDP runs ddp_peer.py under torchrun with two ranks (gloo) and
// parses rank 0's figures.
func torchDDP(tab string, rows, threads, epochs int, digits string) (distRates, error) {
	py, err := testkit.PythonPath()
	if err != nil {
		return distRates{}, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return distRates{}, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	// --redirects/--tee 2: Debian's torch 1.13 on Python 3.11 cannot parse
	// torchrun's default 0 (see cmd/kiln/dist_test.go).
	cmd := exec.Command(py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", strconv.Itoa(port),
		"--redirects", "2", "--tee", "2",
		filepath.Join(testkit.Root(), "bench", "train", "ddp_peer.py"), tab, strconv.Itoa(rows), strconv.Itoa(threads),
		strconv.Itoa(epochs), digits)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return distRates{}, fmt.Errorf("torchrun ddp_peer.py: %w", err)
	}
	var r distRates
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		// torchrun may prefix a rank tag ("[default0]:mlp ...").
		key := f[0][strings.LastIndex(f[0], ":")+1:]
		v, _ := strconv.ParseFloat(f[len(f)-1], 64)
		switch key {
		case "mlp":
			r.mlp = v
		case "cnn":
			r.cnn = v
		case "allreduce":
			r.allreduce = v
		}
	}
	if r.mlp == 0 || r.cnn == 0 || r.allreduce == 0 {
		return distRates{}, fmt.Errorf("ddp_peer.py printed no figures: %q", out)
	}
	return r, nil
}
