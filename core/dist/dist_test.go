package dist_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/dist"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/native/trainer"
)

func TestEnvFrom(t *testing.T) {
	get := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	_, ok, err := dist.EnvFrom(get(nil))
	require.NoError(t, err)
	assert.False(t, ok, "no variables: not a distributed run")

	env, ok, err := dist.EnvFrom(get(map[string]string{"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
		"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
		"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2", "GLOO_SOCKET_IFNAME": "eth1"}))
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, dist.Env{MasterAddr: "10.0.0.1", MasterPort: 29500, Rank: 3, WorldSize: 4, LocalRank: 1,
		LocalWorldSize: 2, AgentStore: true, StorePrefix: "/worker/attempt_2", IfName: "eth1"}, env)

	bad := []struct {
		vars map[string]string
		want string
	}{
		{map[string]string{"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT missing"},
		{map[string]string{"MASTER_ADDR": "h", "MASTER_PORT": "29500", "RANK": "2", "WORLD_SIZE": "2"}, "RANK=\"2\""},
		{map[string]string{"MASTER_ADDR": "h", "MASTER_PORT": "70000", "RANK": "0", "WORLD_SIZE": "2"}, "MASTER_PORT"},
		{map[string]string{"MASTER_ADDR": "h", "MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "x"}, "WORLD_SIZE"},
		{map[string]string{"MASTER_ADDR": "h", "MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "2",
			"TORCHELASTIC_USE_AGENT_STORE": "True"}, "TORCHELASTIC_RESTART_COUNT"},
		{map[string]string{"MASTER_ADDR": "h", "MASTER_PORT": "1", "RANK": "1", "WORLD_SIZE": "4",
			"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=\"2\""},
		{map[string]string{"MASTER_ADDR": "h", "MASTER_PORT": "1", "RANK": "1", "WORLD_SIZE": "4",
			"LOCAL_WORLD_SIZE": "5"}, "LOCAL_WORLD_SIZE=\"5\""},
		{map[string]string{"MASTER_ADDR": "h", "MASTER_PORT": "1", "RANK": "-1", "WORLD_SIZE": "2"}, "RANK=\"-1\""},
		{map[string]string{"MASTER_ADDR": "h", "MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=\"0\""},
		{map[string]string{"MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "1"}, "MASTER_ADDR missing"},
	}
	for _, b := range bad {
		_, _, err := dist.EnvFrom(get(b.vars))
		require.Error(t, err, "%v", b.vars)
		assert.Contains(t, err.Error(), b.want)
		assert.True(t, core.HasCode(err, core.InvalidArgument))
	}
}

// freePort is a TCP port nothing listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func localEnv(port, rank, world int) dist.Env {
	return dist.Env{MasterAddr: "127.0.0.1", MasterPort: port, Rank: rank, WorldSize: world,
		LocalRank: rank, LocalWorldSize: world, IfName: "lo"}
}

// ranks runs f for every rank of a fresh group of world ranks in this
// process (one goroutine per rank) and returns their errors.
func ranks(t *testing.T, world int, f func(g *dist.Group) error) []error {
	t.Helper()
	port := freePort(t)
	errs := make([]error, world)
	var wg sync.WaitGroup
	for r := range world {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g, err := dist.Init(localEnv(port, r, world), dist.Options{Timeout: 20 * time.Second})
			if err != nil {
				errs[r] = err
				return
			}
			defer g.Close()
			if errs[r] = f(g); errs[r] == nil {
				errs[r] = g.Barrier()
			}
		}()
	}
	wg.Wait()
	return errs
}

// regData is a regression data set of n rows of 8 features.
func regData(n int, seed uint64) *data.Dataset {
	rng := rand.New(rand.NewPCG(seed, 7))
	x := make([]float32, 8*n)
	y := make([]float32, n)
	for i := range n {
		s := 0.0
		for j := range 8 {
			v := rng.NormFloat64()
			x[8*i+j] = float32(v)
			s += float64(j+1) * v
		}
		y[i] = float32(math.Tanh(s/8) + 0.05*rng.NormFloat64())
	}
	d, _ := data.NewDataset(x, 8, y)
	return d
}

func mlp() nn.Spec {
	return nn.Sequential(nn.Linear(32), nn.ReLU(), nn.Linear(16), nn.Tanh(), nn.Linear(1))
}

func flat(t *testing.T, n *nn.Net) []float64 {
	t.Helper()
	h, err := trainer.FlatState(n.Handle())
	require.NoError(t, err)
	ft, err := core.AdoptTensor(h)
	require.NoError(t, err)
	defer ft.Close()
	v, err := core.Data[float64](ft)
	require.NoError(t, err)
	return append([]float64(nil), v...)
}

// Two ranks with batch 32 and one process with batch 64 take the same
// steps on the same samples: the weights must agree.
func TestTwoRanksEqualOneProcessWithDoubleBatch(t *testing.T) {
	trainSet, valSet := regData(512, 1), regData(96, 2)
	for _, opt := range []train.Optimizer{{Type: "sgd", LR: 0.05, Momentum: 0.9}, {Type: "adam", LR: 0.01}} {
		t.Run(opt.Type, func(t *testing.T) {
			cfg := train.Config{Epochs: 3, BatchSize: 64, Seed: 5, Loss: train.Loss{Type: "mse"}, Optimizer: opt}
			one, err := nn.Build(mlp(), 8, 11)
			require.NoError(t, err)
			defer one.Close()
			res1, err := train.Fit(context.Background(), one, trainSet, valSet, cfg, nil)
			require.NoError(t, err)
			want := flat(t, one)

			got := make([][]float64, 2)
			hist := make([][]train.EpochStats, 2)
			errs := ranks(t, 2, func(g *dist.Group) error {
				// Rank 1 starts from other weights: rank 0's are broadcast.
				n, err := nn.Build(mlp(), 8, 11+uint64(g.Rank()))
				if err != nil {
					return err
				}
				defer n.Close()
				c := cfg
				c.BatchSize, c.Group = 32, g
				res, err := train.Fit(context.Background(), n, trainSet, valSet, c, nil)
				if err != nil {
					return err
				}
				got[g.Rank()], hist[g.Rank()] = flat(t, n), res.History
				return nil
			})
			require.NoError(t, errs[0])
			require.NoError(t, errs[1])
			require.Equal(t, got[0], got[1], "the ranks' weights differ")
			require.Len(t, got[0], len(want))
			maxDiff := 0.0
			for i := range want {
				maxDiff = max(maxDiff, math.Abs(want[i]-got[0][i]))
			}
			assert.Less(t, maxDiff, 1e-5, "max |w_1proc - w_2ranks|")
			// The same through Config.Workers: two ranks in this process.
			w, err := nn.Build(mlp(), 8, 11)
			require.NoError(t, err)
			defer w.Close()
			cw := cfg
			cw.BatchSize, cw.Workers = 32, 2
			_, err = train.Fit(context.Background(), w, trainSet, valSet, cw, nil)
			require.NoError(t, err)
			assert.Equal(t, got[0], flat(t, w), "Workers: 2 trains as two ranks do")
			for e := range res1.History {
				assert.InDelta(t, res1.History[e].TrainLoss, hist[0][e].TrainLoss, 1e-5)
				assert.InDelta(t, res1.History[e].Val["mse"], hist[0][e].Val["mse"], 1e-5)
				assert.Equal(t, hist[0][e].Val, hist[1][e].Val, "validation metrics are all-reduced")
			}
		})
	}
}

// TestMain runs one rank of TestKilledRankIsNamed when the test binary is
// started as that rank's child process.
func TestMain(m *testing.M) {
	if os.Getenv("KILN_DIST_CHILD") != "" {
		os.Exit(childRank())
	}
	os.Exit(m.Run())
}

// childRank trains as rank 1 of the group the environment names, for many
// epochs: the parent kills it midway.
func childRank() int {
	env, ok, err := dist.EnvFrom(os.Getenv)
	if err != nil || !ok {
		fmt.Fprintln(os.Stderr, "child: no launch env:", err)
		return 2
	}
	if a := os.Getenv("KILN_DIST_CHILD_IFADDR"); a != "" {
		if env.IfName, err = ifaceWith(a); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			return 2
		}
	}
	if os.Getenv("KILN_DIST_CHILD_READY") != "" {
		// The parent waits for this line before its own Init, so that its
		// short rendezvous timeout does not also time this process's start
		// (exec and loading libtorch take seconds on a loaded machine).
		fmt.Println("ready")
	}
	epochs := 100000
	if e := os.Getenv("KILN_DIST_CHILD_EPOCHS"); e != "" {
		epochs, _ = strconv.Atoi(e)
	}
	g, err := dist.Init(env, dist.Options{Timeout: 20 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	defer g.Close()
	n, err := nn.Build(mlp(), 8, 11)
	if err != nil {
		return 1
	}
	defer n.Close()
	cfg := train.Config{Epochs: epochs, BatchSize: 32, Seed: 5, Loss: train.Loss{Type: "mse"},
		Optimizer: train.Optimizer{Type: "sgd", LR: 0.01}, Group: g}
	if _, err := train.Fit(context.Background(), n, regData(256, 1), nil, cfg, nil); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	if err := g.Barrier(); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	fmt.Println(flatSum(n))
	return 0
}

// Killing rank 1 makes rank 0's Fit fail with an error naming rank 1, found
// by the broken connection (Unavailable), not by waiting out the timeout;
// stopping it (a hang) makes rank 0 fail after the timeout
// (DeadlineExceeded), naming rank 1 too.
func TestDeadOrHungRankIsNamed(t *testing.T) {
	for _, c := range []struct {
		name string
		sig  syscall.Signal
		code core.Code
	}{{"killed", syscall.SIGKILL, core.Unavailable}, {"hung", syscall.SIGSTOP, core.DeadlineExceeded}} {
		t.Run(c.name, func(t *testing.T) {
			port := freePort(t)
			child := exec.Command(os.Args[0], "-test.run=^$")
			env := localEnv(port, 1, 2)
			child.Env = append(os.Environ(), "KILN_DIST_CHILD=1", "MASTER_ADDR=127.0.0.1", "MASTER_PORT="+strconv.Itoa(port),
				"RANK=1", "WORLD_SIZE=2", "GLOO_SOCKET_IFNAME="+env.IfName, "KILN_DIST_CHILD_READY=1")
			child.Stderr = os.Stderr
			out, err := child.StdoutPipe()
			require.NoError(t, err)
			require.NoError(t, child.Start())
			ready := make(chan string, 1)
			go func() {
				line, _ := bufio.NewReader(out).ReadString('\n')
				ready <- line
				io.Copy(io.Discard, out)
			}()
			waited := make(chan error, 1)
			go func() { waited <- child.Wait() }()
			defer func() {
				child.Process.Kill()
				<-waited
			}()
			select {
			case line := <-ready:
				require.Equal(t, "ready\n", line, "rank 1 did not start")
			case <-time.After(2 * time.Minute):
				t.Fatal("rank 1 did not start within 2 minutes")
			}

			g, err := dist.Init(localEnv(port, 0, 2), dist.Options{Timeout: 3 * time.Second})
			require.NoError(t, err)
			defer g.Close()
			n, err := nn.Build(mlp(), 8, 11)
			require.NoError(t, err)
			defer n.Close()
			cfg := train.Config{Epochs: 100000, BatchSize: 32, Seed: 5, Loss: train.Loss{Type: "mse"},
				Optimizer: train.Optimizer{Type: "sgd", LR: 0.01}, Group: g}
			signalled := false
			_, err = train.Fit(context.Background(), n, regData(256, 1), nil, cfg, func(e train.Event) {
				if e.Kind == "epoch" && e.Epoch == 2 && !signalled {
					signalled = true
					require.NoError(t, child.Process.Signal(c.sig))
				}
			})
			require.True(t, signalled, "training ended before the signal: %v", err)
			require.Error(t, err)
			t.Log(err)
			assert.Equal(t, []int{1}, dist.DeadRanks(err), "%v", err)
			assert.Contains(t, err.Error(), "rank(s) 1 died, hung or left")
			assert.True(t, core.HasCode(err, c.code), "%v", err)
		})
	}
}

// A rank whose WORLD_SIZE differs from the others', and a rendezvous that
// not every rank reaches, fail with errors naming the ranks.
func TestRendezvousErrors(t *testing.T) {
	port := freePort(t)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for r, ws := range []int{2, 3} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g, err := dist.Init(localEnv(port, r, ws), dist.Options{Timeout: 3 * time.Second})
			if err == nil {
				g.Close()
			}
			errs[r] = err
		}()
	}
	wg.Wait()
	require.Error(t, errs[0])
	assert.Contains(t, errs[0].Error(), "rank 1 has WORLD_SIZE=3 but rank 0 has WORLD_SIZE=2")
	assert.True(t, core.HasCode(errs[0], core.InvalidArgument), "%v", errs[0])
	require.Error(t, errs[1])

	// Rank 0 of 2 alone: rank 1 never arrives.
	_, err := dist.Init(localEnv(freePort(t), 0, 2), dist.Options{Timeout: time.Second})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "rank(s) 1 of WORLD_SIZE=2 did not arrive")
	assert.True(t, core.HasCode(err, core.DeadlineExceeded), "%v", err)
}

// Ranks with different networks or data schemas refuse to train; uneven
// data (101 rows on 2 ranks) does not hang: the shards are padded.
func TestRanksMustAgreeAndUnevenDataRuns(t *testing.T) {
	cfg := train.Config{Epochs: 2, BatchSize: 16, Seed: 1, Loss: train.Loss{Type: "mse"}, Optimizer: train.Optimizer{Type: "sgd", LR: 0.01}}
	errs := ranks(t, 2, func(g *dist.Group) error {
		spec := mlp()
		if g.Rank() == 1 {
			spec = nn.Sequential(nn.Linear(4), nn.ReLU(), nn.Linear(1))
		}
		n, err := nn.Build(spec, 8, 1)
		if err != nil {
			return err
		}
		defer n.Close()
		c := cfg
		c.Group = g
		_, err = train.Fit(context.Background(), n, regData(64, 1), nil, c, nil)
		return err
	})
	for r, err := range errs {
		require.Error(t, err, "rank %d", r)
		assert.Contains(t, err.Error(), "rank(s) 1 have a different network")
	}

	steps := make([]int64, 2)
	errs = ranks(t, 2, func(g *dist.Group) error {
		n, err := nn.Build(mlp(), 8, 1)
		if err != nil {
			return err
		}
		defer n.Close()
		c := cfg
		c.Group = g
		_, err = train.Fit(context.Background(), n, regData(101, 1), regData(31, 2), c, func(e train.Event) {
			if e.Kind == "epoch" {
				steps[g.Rank()] = e.Steps
			}
		})
		return err
	})
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	assert.Equal(t, []int64{4, 4}, steps, "51 samples per rank (101 padded to 102) in batches of 16")
}

// ifaceWith is the name of the network interface that has address addr.
func ifaceWith(addr string) (string, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return "", err
	}
	for _, i := range ifs {
		as, _ := i.Addrs()
		for _, a := range as {
			if p, ok := a.(*net.IPNet); ok && p.IP.String() == addr {
				return i.Name, nil
			}
		}
	}
	return "", fmt.Errorf("no interface has address %s", addr)
}

// flatSum is the sum of n's weights, printed with full precision.
func flatSum(n *nn.Net) string {
	h, err := trainer.FlatState(n.Handle())
	if err != nil {
		return err.Error()
	}
	ft, err := core.AdoptTensor(h)
	if err != nil {
		return err.Error()
	}
	defer ft.Close()
	v, _ := core.Data[float64](ft)
	s := 0.0
	for _, x := range v {
		s += x
	}
	return strconv.FormatFloat(s, 'g', -1, 64)
}

// Two hosts: rank 0 in the test's network namespace, rank 1 in another one
// joined by a veth pair; Gloo binds each end's interface
// (GLOO_SOCKET_IFNAME) and the two ranks finish with equal weights.
func TestTwoHostsOverVeth(t *testing.T) {
	ns := testkit.NewNetNS(t)
	port := freePort(t)
	hostIf, err := ifaceWith(ns.Host.String())
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	child := ns.Command(ctx, os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), "KILN_DIST_CHILD=1", "KILN_DIST_CHILD_EPOCHS=3",
		"KILN_DIST_CHILD_IFADDR="+ns.Peer.String(), "MASTER_ADDR="+ns.Host.String(),
		"MASTER_PORT="+strconv.Itoa(port), "RANK=1", "WORLD_SIZE=2")
	var childOut strings.Builder
	child.Stdout, child.Stderr = &childOut, &childOut
	require.NoError(t, child.Start())
	waited := make(chan error, 1)
	go func() { waited <- child.Wait() }()

	env := dist.Env{MasterAddr: ns.Host.String(), MasterPort: port, Rank: 0, WorldSize: 2, LocalRank: 0,
		LocalWorldSize: 1, IfName: hostIf}
	g, err := dist.Init(env, dist.Options{Timeout: 30 * time.Second})
	require.NoError(t, err)
	defer g.Close()
	n, err := nn.Build(mlp(), 8, 11)
	require.NoError(t, err)
	defer n.Close()
	cfg := train.Config{Epochs: 3, BatchSize: 32, Seed: 5, Loss: train.Loss{Type: "mse"},
		Optimizer: train.Optimizer{Type: "sgd", LR: 0.01}, Group: g}
	_, err = train.Fit(ctx, n, regData(256, 1), nil, cfg, nil)
	require.NoError(t, err)
	require.NoError(t, g.Barrier())
	require.NoError(t, <-waited, childOut.String())
	lines := strings.Split(strings.TrimSpace(childOut.String()), "\n")
	assert.Equal(t, flatSum(n), lines[len(lines)-1], "rank 1's weights (in the other namespace) equal rank 0's")
}

// A run checkpointed by two ranks (rank 0 writes) resumes in one process:
// the checkpoint does not depend on the world size.
func TestResumeWithAnotherWorldSize(t *testing.T) {
	dir := t.TempDir()
	cfg := train.Config{Epochs: 2, BatchSize: 32, Seed: 1, Loss: train.Loss{Type: "mse"},
		Optimizer: train.Optimizer{Type: "adam", LR: 0.01}, CheckpointDir: dir}
	errs := ranks(t, 2, func(g *dist.Group) error {
		n, err := nn.Build(mlp(), 8, 1)
		if err != nil {
			return err
		}
		defer n.Close()
		c := cfg
		c.Group = g
		_, err = train.Fit(context.Background(), n, regData(128, 1), nil, c, nil)
		return err
	})
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	_, epoch, err := train.LatestCheckpoint(dir)
	require.NoError(t, err)
	require.Equal(t, 2, epoch)

	n, err := nn.Build(mlp(), 8, 1)
	require.NoError(t, err)
	defer n.Close()
	c := cfg
	c.Epochs, c.Resume = 4, true // the same per-rank batch, one rank
	res, err := train.Fit(context.Background(), n, regData(128, 1), nil, c, nil)
	require.NoError(t, err)
	assert.Equal(t, 2, res.ResumedFrom)
	assert.Len(t, res.History, 4)
}

// bnNet has a 2-D and a 1-D batch-norm layer (no dropout).
func bnNet() nn.Spec {
	return nn.Sequential(
		nn.Layer{Type: "conv2d", Out: 4, Kernel: 3, Padding: 1}, nn.BatchNorm2d(), nn.ReLU(),
		nn.Flatten(), nn.Linear(16), nn.BatchNorm1d(), nn.ReLU(), nn.Linear(1),
	).WithInputShape(1, 2, 4)
}

// maxAbsDiff is max |a[i] - b[i]|.
func maxAbsDiff(t *testing.T, a, b []float64) float64 {
	t.Helper()
	require.Len(t, b, len(a))
	d := 0.0
	for i := range a {
		d = max(d, math.Abs(a[i]-b[i]))
	}
	return d
}

// Synchronized batch norm: two ranks with batch 32 normalize with the
// statistics of both ranks' 64 samples, so they train exactly as one
// process with batch 64 (weights and running statistics); without the
// option each rank normalizes with its own 32 samples and the results
// differ. (SGD: Adam divides each gradient by its running magnitude, so
// the biases in front of a batch norm, whose true gradient is zero, take
// steps of ±lr from rounding noise alone, in both runs but not alike.)
func TestSyncBatchNorm(t *testing.T) {
	trainSet := regData(512, 1)
	for _, opt := range []train.Optimizer{{Type: "sgd", LR: 0.05, Momentum: 0.9}} {
		t.Run(opt.Type, func(t *testing.T) {
			cfg := train.Config{Epochs: 3, BatchSize: 64, Seed: 5, Loss: train.Loss{Type: "mse"}, Optimizer: opt}
			one, err := nn.Build(bnNet(), 8, 11)
			require.NoError(t, err)
			defer one.Close()
			_, err = train.Fit(context.Background(), one, trainSet, nil, cfg, nil)
			require.NoError(t, err)
			want := flat(t, one)

			twoRanks := func(sync bool) []float64 {
				n, err := nn.Build(bnNet(), 8, 11)
				require.NoError(t, err)
				defer n.Close()
				c := cfg
				c.BatchSize, c.Workers, c.SyncBatchNorm = 32, 2, sync
				_, err = train.Fit(context.Background(), n, trainSet, nil, c, nil)
				require.NoError(t, err)
				return flat(t, n)
			}
			assert.Less(t, maxAbsDiff(t, want, twoRanks(true)), 1e-5,
				"sync_batchnorm: 2 ranks x 32 equal 1 process x 64 (weights and running statistics)")
			assert.Greater(t, maxAbsDiff(t, want, twoRanks(false)), 1e-3,
				"per-rank statistics (DDP's default) train differently")
		})
	}
}

// Bad launches fail with clear errors and do not hang: two processes with
// the same RANK, a store nobody hosts, ranks with different data or
// hyper-parameters, and the nccl backend on a libtorch without CUDA.
func TestBadLaunchesAreClear(t *testing.T) {
	t.Run("same-rank-twice", func(t *testing.T) {
		// Rank 0 and two processes that both say RANK=1: one of the
		// latter is refused, the other two form the group.
		port := freePort(t)
		errs := make([]error, 3)
		var wg, ones sync.WaitGroup
		ones.Add(2)
		for i, rank := range []int{0, 1, 1} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				g, err := dist.Init(localEnv(port, rank, 2), dist.Options{Timeout: 10 * time.Second})
				if err == nil {
					err = g.Barrier()
					if rank == 0 {
						ones.Wait() // the store (hosted here) stays up until both RANK=1 processes are done
					}
					g.Close()
				}
				errs[i] = err
				if rank == 1 {
					ones.Done()
				}
			}()
		}
		wg.Wait()
		require.NoError(t, errs[0])
		failed := 0
		for _, err := range errs[1:] {
			if err != nil {
				failed++
				assert.Contains(t, err.Error(), "two processes have RANK=1")
				assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
			}
		}
		assert.Equal(t, 1, failed, "exactly one of the two RANK=1 processes is refused: %v", errs)
	})
	t.Run("no-store", func(t *testing.T) {
		t0 := time.Now()
		_, err := dist.Init(localEnv(freePort(t), 1, 2), dist.Options{Timeout: 2 * time.Second})
		require.Error(t, err)
		assert.Contains(t, err.Error(), "cannot reach the store at 127.0.0.1:")
		assert.Less(t, time.Since(t0), 15*time.Second, "fails within the timeout")
	})
	t.Run("different-data-or-config", func(t *testing.T) {
		cfg := train.Config{Epochs: 1, BatchSize: 16, Seed: 1, Loss: train.Loss{Type: "mse"}, Optimizer: train.Optimizer{Type: "sgd", LR: 0.01}}
		for _, c := range []struct {
			name string
			rows int
			lr   float64
			want string
		}{{"rows", 80, 0.01, "rank(s) 1 have a different training data (row count)"},
			{"config", 64, 0.5, "rank(s) 1 have a different training config"}} {
			errs := ranks(t, 2, func(g *dist.Group) error {
				n, err := nn.Build(mlp(), 8, 1)
				if err != nil {
					return err
				}
				defer n.Close()
				cc, rows := cfg, 64
				cc.Group = g
				if g.Rank() == 1 {
					rows, cc.Optimizer.LR = c.rows, c.lr
				}
				_, err = train.Fit(context.Background(), n, regData(rows, 1), nil, cc, nil)
				return err
			})
			for r, err := range errs {
				require.Error(t, err, "%s: rank %d", c.name, r)
				assert.Contains(t, err.Error(), c.want)
				assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
			}
		}
	})
	t.Run("nccl-without-cuda", func(t *testing.T) {
		if trainer.HasNCCL() {
			t.Skip("this libtorch has CUDA and NCCL")
		}
		t0 := time.Now()
		_, err := dist.Init(localEnv(freePort(t), 0, 2), dist.Options{Timeout: 20 * time.Second, Backend: dist.BackendNCCL})
		require.Error(t, err)
		assert.True(t, core.HasCode(err, core.Unsupported), "%v", err)
		assert.Contains(t, err.Error(), "backend nccl: the linked libtorch has no CUDA")
		assert.Contains(t, err.Error(), "use the gloo backend")
		assert.Less(t, time.Since(t0), 5*time.Second, "fails before the rendezvous")
		err = dist.CheckBackend("mpi")
		assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
		require.NoError(t, dist.CheckBackend(""))
		require.NoError(t, dist.CheckBackend("gloo"))
	})
}
