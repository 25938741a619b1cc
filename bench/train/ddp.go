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
	"syscall"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/dist"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
)

// distWork is one workload of the distributed rows: a network per rank
// (rank 0's weights are broadcast when each epoch's Fit starts), the data
// and the config.
type distWork struct {
	nets [2]*nn.Net
	ds   *data.Dataset
	cfg  train.Config
}

// kilnRanks are Kiln's two data-parallel ranks, one goroutine each in this
// process, joined once by a c10d Gloo group over loopback and kept for the
// whole benchmark, so that Kiln's epochs can alternate with PyTorch's.
type kilnRanks struct {
	groups [2]*dist.Group
	bucket [2]*core.Tensor // one 25 MiB float32 gradient bucket per rank
}

func newKilnRanks() (*kilnRanks, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	k := &kilnRanks{}
	err = k.both(func(r int) error {
		g, err := dist.Init(dist.Env{MasterAddr: "127.0.0.1", MasterPort: port, Rank: r, WorldSize: 2,
			LocalRank: r, LocalWorldSize: 2, IfName: "lo"}, dist.Options{})
		if err != nil {
			return err
		}
		k.groups[r] = g
		k.bucket[r], err = core.NewTensor(make([]float32, 25<<18))
		return err
	})
	if err != nil {
		k.close()
		return nil, err
	}
	return k, nil
}

// both runs f(rank) for the two ranks concurrently (they meet in
// collectives) and returns the first error.
func (k *kilnRanks) both(f func(rank int) error) error {
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for r := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[r] = f(r)
		}()
	}
	wg.Wait()
	for r, e := range errs {
		if e != nil {
			return fmt.Errorf("kiln rank %d: %w", r, e)
		}
	}
	return nil
}

func (k *kilnRanks) close() {
	for r := range 2 {
		if k.bucket[r] != nil {
			k.bucket[r].Close()
		}
	}
	// Rank 1 first: rank 0 hosts the store.
	if k.groups[1] != nil {
		k.groups[1].Close()
	}
	if k.groups[0] != nil {
		k.groups[0].Close()
	}
}

// epoch trains one epoch of w on both ranks (Fit with Epochs 1 over the
// group: a fresh shuffle and optimizer each time, the networks kept) and
// returns the global samples/s of rank 0's epoch.
func (k *kilnRanks) epoch(w *distWork) (float64, error) {
	var secs float64
	err := k.both(func(r int) error {
		c := w.cfg
		c.Epochs, c.Group = 1, k.groups[r]
		res, err := train.Fit(context.Background(), w.nets[r], w.ds, nil, c, nil)
		if err != nil {
			return err
		}
		if r == 0 {
			secs = res.History[0].Seconds
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return float64(w.ds.Len()) / secs, nil
}

// allReduce times ten all-reduces of one 25 MiB float32 bucket, the call
// the gradient buckets make (kiln_pg_allreduce_tensor), after one warm-up;
// GB/s of the bucket's bytes (algorithm bandwidth, as the Python side).
func (k *kilnRanks) allReduce() (float64, int64, error) {
	const reps = 10
	var gbs float64
	err := k.both(func(r int) error {
		g, t := k.groups[r], k.bucket[r]
		if err := g.Native().AllReduceTensor(t.Handle()); err != nil {
			return err
		}
		if err := g.Barrier(); err != nil {
			return err
		}
		t0 := time.Now()
		for range reps {
			if err := g.Native().AllReduceTensor(t.Handle()); err != nil {
				return err
			}
		}
		if r == 0 {
			gbs = float64(k.bucket[0].NumBytes()*reps) / time.Since(t0).Seconds() / 1e9
		}
		return g.Barrier()
	})
	return gbs, k.bucket[0].NumBytes(), err
}

// ddpPeer is PyTorch DDP's side: ddp_peer.py's two ranks under torchrun
// (gloo), kept up and driven one command at a time over a loopback
// connection from its rank 0.
type ddpPeer struct {
	cmd  *exec.Cmd
	conn net.Conn
	rd   *bufio.Scanner
}

func startDDPPeer(tab string, rows, threads int, digits string) (*ddpPeer, error) {
	py, err := testkit.PythonPath()
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer l.Close()
	pl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	masterPort := pl.Addr().(*net.TCPAddr).Port
	pl.Close()
	// --redirects/--tee 2: Debian's torch 1.13 on Python 3.11 cannot parse
	// torchrun's default 0 (see cmd/kiln/dist_test.go). torchrun sets
	// OMP_NUM_THREADS=1 for each rank; ddp_peer.py sets -threads too.
	cmd := exec.Command(py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", strconv.Itoa(masterPort),
		"--redirects", "2", "--tee", "2",
		filepath.Join(testkit.Root(), "bench", "train", "ddp_peer.py"), tab, strconv.Itoa(rows), strconv.Itoa(threads),
		digits, strconv.Itoa(l.Addr().(*net.TCPAddr).Port))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	// Its own process group: torchrun's ranks are its children, and a rank
	// that outlives a killed torchrun would spin on its Gloo connections
	// (and hold this process's stderr) after the bench has ended.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("torchrun ddp_peer.py: %w", err)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			c = nil
		}
		accepted <- c
	}()
	p := &ddpPeer{cmd: cmd}
	select {
	case p.conn = <-accepted:
	case <-time.After(2 * time.Minute):
	}
	if p.conn == nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
		return nil, fmt.Errorf("torchrun ddp_peer.py: rank 0 did not connect")
	}
	p.rd = bufio.NewScanner(p.conn)
	if line, err := p.read(); err != nil || line != "ready" {
		p.close()
		return nil, fmt.Errorf("torchrun ddp_peer.py did not start: %q %v", line, err)
	}
	return p, nil
}

func (p *ddpPeer) read() (string, error) {
	p.conn.SetReadDeadline(time.Now().Add(5 * time.Minute))
	if !p.rd.Scan() {
		return "", fmt.Errorf("ddp_peer.py ended: %v", p.rd.Err())
	}
	return strings.TrimSpace(p.rd.Text()), nil
}

// ask sends one command and returns the fields of the answer.
func (p *ddpPeer) ask(cmd string) ([]string, error) {
	if _, err := fmt.Fprintln(p.conn, cmd); err != nil {
		return nil, err
	}
	line, err := p.read()
	if err != nil {
		return nil, err
	}
	f := strings.Fields(line)
	if len(f) == 0 || f[0] == "error" {
		return nil, fmt.Errorf("ddp_peer.py %s: %q", cmd, line)
	}
	return f, nil
}

// rate asks for one epoch of workload name and returns its samples/s.
func (p *ddpPeer) rate(name string) (float64, error) {
	f, err := p.ask(name)
	if err != nil {
		return 0, err
	}
	return strconv.ParseFloat(f[0], 64)
}

func (p *ddpPeer) close() {
	if p.conn != nil {
		fmt.Fprintln(p.conn, "quit")
		p.conn.Close()
	}
	done := make(chan struct{})
	go func() {
		p.cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	// torchrun has ended; its ranks, whatever became of them, end too.
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
}

// distRates are the distributed rows' figures: global samples per second
// of each side's fastest epoch, all-reduce bandwidth in GB/s, and the
// intra-op threads each side's ranks run with.
type distRates struct {
	mlp, cnn            float64
	allreduce           float64
	bytes               int64
	threads, ompThreads string
}

// distCompare alternates Kiln's and PyTorch DDP's epochs of each workload,
// rounds times after one warm-up epoch each, then their all-reduces, and
// returns each side's best figures: on a shared machine both sides then
// see the same disturbances, and the fastest epoch is the least disturbed.
func distCompare(k *kilnRanks, p *ddpPeer, mlp, cnn *distWork, rounds int, only string) (kr, pr distRates, err error) {
	f, err := p.ask("threads")
	if err != nil {
		return kr, pr, err
	}
	pr.threads = f[0]
	if len(f) > 1 {
		pr.ompThreads = f[1]
	}
	kr.threads = fmt.Sprintf("%d,%d", core.NumThreads(), core.NumThreads())
	kr.ompThreads = os.Getenv("OMP_NUM_THREADS")
	for _, w := range []struct {
		name    string
		work    *distWork
		kd, pd  *float64
		warmups int
	}{{"mlp", mlp, &kr.mlp, &pr.mlp, 1}, {"cnn", cnn, &kr.cnn, &pr.cnn, 1}} {
		if only != "" && only != w.name {
			continue
		}
		for i := range w.warmups + rounds {
			kv, err := k.epoch(w.work)
			if err != nil {
				return kr, pr, fmt.Errorf("kiln %s: %w", w.name, err)
			}
			pv, err := p.rate(w.name)
			if err != nil {
				return kr, pr, fmt.Errorf("pytorch ddp %s: %w", w.name, err)
			}
			if i >= w.warmups {
				*w.kd, *w.pd = max(*w.kd, kv), max(*w.pd, pv)
			}
		}
	}
	for range 3 {
		if only != "" && only != "allreduce" {
			break
		}
		gbs, n, err := k.allReduce()
		if err != nil {
			return kr, pr, fmt.Errorf("kiln all-reduce: %w", err)
		}
		kr.allreduce, kr.bytes = max(kr.allreduce, gbs), n
		f, err := p.ask("allreduce")
		if err != nil {
			return kr, pr, err
		}
		if len(f) < 2 {
			return kr, pr, fmt.Errorf("ddp_peer.py allreduce: %q", f)
		}
		pb, _ := strconv.ParseInt(f[0], 10, 64)
		pg, _ := strconv.ParseFloat(f[1], 64)
		if pb != n {
			return kr, pr, fmt.Errorf("all-reduce sizes differ: kiln %d bytes, pytorch %d", n, pb)
		}
		pr.allreduce, pr.bytes = max(pr.allreduce, pg), pb
	}
	return kr, pr, nil
}
