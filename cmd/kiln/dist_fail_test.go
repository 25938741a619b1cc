package main

import (
	"bufio"
	"fmt"
	"io"
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

	"github.com/kilnml/kiln/native/trainer"
)

// distTimeout is the --dist-timeout of the failure tests: short, so that a
// hung rank is found quickly.
const distTimeout = 5 * time.Second

// rankProc is one `kiln train` process of a two-rank run started by the
// test, with its stderr collected and scanned for epoch lines.
type rankProc struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	stderr strings.Builder
	epochs chan int // epoch numbers as rank 0 reports them
	exited chan error
	at     time.Time // when it exited
}

func (p *rankProc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// startRank starts `kiln train args...` as one rank (RANK/WORLD_SIZE set,
// as torchrun or a PyTorchJob sets them).
func startRank(t *testing.T, rank, port int, args []string) *rankProc {
	t.Helper()
	c := exec.Command(os.Args[0], args...)
	c.Env = append(os.Environ(), "KILN_TEST_MAIN=1", "MASTER_ADDR=127.0.0.1", "MASTER_PORT="+strconv.Itoa(port),
		"RANK="+strconv.Itoa(rank), "WORLD_SIZE=2", "GLOO_SOCKET_IFNAME=lo")
	c.Stdout = io.Discard
	pipe, err := c.StderrPipe()
	require.NoError(t, err)
	p := &rankProc{cmd: c, epochs: make(chan int, 1<<16), exited: make(chan error, 1)}
	require.NoError(t, c.Start())
	go func() {
		sc := bufio.NewScanner(pipe)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.stderr.WriteString(line + "\n")
			p.mu.Unlock()
			var e, n int
			if _, err := fmt.Sscanf(line, "epoch %d/%d", &e, &n); err == nil {
				p.epochs <- e
			}
		}
		err := c.Wait()
		p.at = time.Now()
		p.exited <- err
	}()
	t.Cleanup(func() {
		c.Process.Signal(syscall.SIGCONT)
		c.Process.Kill()
	})
	return p
}

// waitEpoch waits until p has reported epoch e.
func waitEpoch(t *testing.T, p *rankProc, e int) {
	t.Helper()
	deadline := time.After(90 * time.Second)
	for {
		select {
		case got := <-p.epochs:
			if got >= e {
				return
			}
		case err := <-p.exited:
			t.Fatalf("the rank exited before epoch %d: %v\n%s", e, err, p.output())
		case <-deadline:
			t.Fatalf("no epoch %d within 90 s\n%s", e, p.output())
		}
	}
}

// A rank of `kiln train` that is killed (SIGKILL) or hangs (SIGSTOP)
// mid-training makes the other exit with a non-zero status within
// --dist-timeout (plus the short wait that names the ranks), with a
// message naming the dead rank, and without writing a package; a killed
// rank 0 (which hosts the rendezvous store) is named by rank 1 the same
// way.
func TestTrainRankKilledOrHung(t *testing.T) {
	for _, c := range []struct {
		name     string
		victim   int
		sig      syscall.Signal
		want     string
		deadline time.Duration
	}{
		{"rank1-killed", 1, syscall.SIGKILL, "rank(s) 1 died, hung or left", distTimeout},
		{"rank1-hung", 1, syscall.SIGSTOP, "rank(s) 1 died, hung or left", distTimeout + 10*time.Second},
		{"rank0-killed", 0, syscall.SIGKILL, "rank 0 (which hosts the rendezvous store) is gone", distTimeout + 10*time.Second},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "pkg")
			args := distJob(t, out)
			require.Equal(t, "--quiet", args[len(args)-1])
			args = append(args[:len(args)-1], "--epochs", "100000", "--dist-timeout", distTimeout.String()) // not quiet: rank 0 prints each epoch
			port := freePort(t)
			procs := []*rankProc{startRank(t, 0, port, args), startRank(t, 1, port, args)}
			waitEpoch(t, procs[0], 3)
			victim, other := procs[c.victim], procs[1-c.victim]
			t0 := time.Now()
			require.NoError(t, victim.cmd.Process.Signal(c.sig))
			var err error
			select {
			case err = <-other.exited:
			case <-time.After(c.deadline + 30*time.Second):
				t.Fatalf("rank %d still runs %s after rank %d got %v\n%s", 1-c.victim, c.deadline+30*time.Second, c.victim, c.sig, other.output())
			}
			took := other.at.Sub(t0)
			t.Logf("rank %d exited %.1fs after the signal: %v", 1-c.victim, took.Seconds(), err)
			require.Error(t, err, "rank %d must fail\n%s", 1-c.victim, other.output())
			var ee *exec.ExitError
			require.ErrorAs(t, err, &ee)
			assert.NotEqual(t, 0, ee.ExitCode())
			assert.Less(t, took, c.deadline, "exits within the timeout")
			assert.Contains(t, other.output(), c.want)
			assert.NoDirExists(t, out, "no package (not even a partial one) at --out")
		})
	}
}

// Two ranks of `kiln train` whose data have different schemas (rank 1's
// CSV has an extra feature column) refuse to train, both with an error
// naming rank 1, instead of hanging or training different networks.
func TestTrainRanksWithDifferentSchemas(t *testing.T) {
	out := filepath.Join(t.TempDir(), "pkg")
	args := append(distJob(t, out), "--dist-timeout", distTimeout.String())
	// Rank 1's data: the same rows with one more numeric column.
	raw, err := os.ReadFile(args[4])
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(raw)), "\n")
	for i := range lines {
		if i == 0 {
			lines[i] = "z," + lines[i]
		} else {
			lines[i] = strconv.Itoa(i%7) + "," + lines[i]
		}
	}
	other := filepath.Join(t.TempDir(), "wider.csv")
	require.NoError(t, os.WriteFile(other, []byte(strings.Join(lines, "\n")+"\n"), 0o644))
	args1 := append([]string(nil), args...)
	args1[4] = other
	port := freePort(t)
	procs := []*rankProc{startRank(t, 0, port, args), startRank(t, 1, port, args1)}
	for r, p := range procs {
		select {
		case err := <-p.exited:
			require.Error(t, err, "rank %d", r)
			assert.Contains(t, p.output(), "rank(s) 1 have a different network", "rank %d", r)
		case <-time.After(60 * time.Second):
			t.Fatalf("rank %d still runs\n%s", r, p.output())
		}
	}
	assert.NoDirExists(t, out)
}

// --backend nccl on a libtorch without CUDA fails at once with a clear
// error, before any rank starts; an unknown backend is refused too.
func TestTrainBackendNCCLWithoutCUDA(t *testing.T) {
	if trainer.HasNCCL() {
		t.Skip("this libtorch has CUDA and NCCL")
	}
	out := filepath.Join(t.TempDir(), "pkg")
	for _, c := range []struct{ backend, want string }{
		{"nccl", "backend nccl: the linked libtorch has no CUDA and no NCCL"},
		{"mpi", `unknown backend "mpi" (want gloo or nccl)`},
	} {
		args := append(distJob(t, out), "--nproc-per-node", "2", "--master-port", strconv.Itoa(freePort(t)), "--backend", c.backend)
		_, stderr, err := runAsKiln(t, os.Args[0], args...)
		require.Error(t, err)
		assert.Contains(t, stderr, c.want)
		assert.NotContains(t, stderr, "started local ranks")
	}
	assert.NoDirExists(t, out)
}
