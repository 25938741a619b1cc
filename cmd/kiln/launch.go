package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/dist"
)

// distOptions are kiln train's flags for data-parallel training. They
// mirror torchrun's: --nproc-per-node local ranks on each of --nnodes
// nodes, this node being --node-rank, rank 0's node reachable at
// --master-addr:--master-port.
type distOptions struct {
	nprocPerNode int
	nnodes       int
	nodeRank     int
	masterAddr   string
	masterPort   int
	timeout      time.Duration
	backend      string
}

// launched reports whether a launcher (torchrun, a PyTorchJob, kiln train
// --nproc-per-node) has set this process's rank.
func launched(getenv func(string) string) bool { return getenv(dist.VarWorldSize) != "" }

// launchRanks starts o.nprocPerNode copies of this command as local ranks
// (the same arguments, with torchrun's variables set), streams their output
// and waits. When one fails the others are stopped (SIGTERM, then SIGKILL
// after 5 s) and the error names the first rank that failed and its exit
// status.
func launchRanks(ctx context.Context, stderr io.Writer, o distOptions) error {
	if o.nprocPerNode < 1 || o.nnodes < 1 || o.nodeRank < 0 || o.nodeRank >= o.nnodes {
		return core.Errorf(core.InvalidArgument, "kiln: train: --nproc-per-node %d, --nnodes %d, --node-rank %d: want nproc >= 1, nnodes >= 1, 0 <= node-rank < nnodes",
			o.nprocPerNode, o.nnodes, o.nodeRank)
	}
	if o.nnodes > 1 && o.masterAddr == "" {
		return core.Errorf(core.InvalidArgument, "kiln: train: --nnodes %d needs --master-addr (the address of node 0)", o.nnodes)
	}
	addr := o.masterAddr
	if addr == "" {
		addr = "127.0.0.1"
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("kiln: train: finding this executable: %w", err)
	}
	world := o.nnodes * o.nprocPerNode
	// As torchrun: several local ranks get one intra-op thread each unless
	// OMP_NUM_THREADS says otherwise, so that they do not oversubscribe
	// the cores (kiln honours OMP_NUM_THREADS; see setThreads).
	ompThreads := ""
	if o.nprocPerNode > 1 && os.Getenv("OMP_NUM_THREADS") == "" {
		ompThreads = "1"
		slog.Info("kiln: setting OMP_NUM_THREADS=1 for each local rank (set it, or KILN_NUM_THREADS, to tune)", "nproc_per_node", o.nprocPerNode)
	}
	type exit struct {
		rank int
		err  error
	}
	done := make(chan exit, o.nprocPerNode)
	cmds := make([]*exec.Cmd, o.nprocPerNode)
	var mu sync.Mutex // guards signalling cmds
	for i := range o.nprocPerNode {
		rank := o.nodeRank*o.nprocPerNode + i
		c := exec.Command(exe, os.Args[1:]...)
		c.Stdout, c.Stderr = os.Stdout, stderr
		if rank != 0 {
			c.Stdout = io.Discard // the report comes from rank 0
		}
		c.Env = append(os.Environ(),
			dist.VarMasterAddr+"="+addr, dist.VarMasterPort+"="+strconv.Itoa(o.masterPort),
			dist.VarRank+"="+strconv.Itoa(rank), dist.VarWorldSize+"="+strconv.Itoa(world),
			dist.VarLocalRank+"="+strconv.Itoa(i), dist.VarLocalWorldSize+"="+strconv.Itoa(o.nprocPerNode),
			dist.VarUseAgentStore+"=False")
		if ompThreads != "" {
			c.Env = append(c.Env, "OMP_NUM_THREADS="+ompThreads)
		}
		if err := c.Start(); err != nil {
			mu.Lock()
			for _, p := range cmds[:i] {
				p.Process.Kill()
			}
			mu.Unlock()
			return fmt.Errorf("kiln: train: starting rank %d: %w", rank, err)
		}
		cmds[i] = c
		go func() { done <- exit{rank, c.Wait()} }()
	}
	slog.Info("kiln: started local ranks", "nproc_per_node", o.nprocPerNode, "node_rank", o.nodeRank,
		"world_size", world, "master", fmt.Sprintf("%s:%d", addr, o.masterPort))
	stopAll := func(sig syscall.Signal) {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range cmds {
			c.Process.Signal(sig) // an error means it has exited already
		}
	}
	var first *exit
	for range o.nprocPerNode {
		var e exit
		select {
		case e = <-done:
		case <-ctx.Done():
			stopAll(syscall.SIGTERM)
			e = <-done
		}
		if e.err != nil && first == nil {
			first = &e
			stopAll(syscall.SIGTERM)
			time.AfterFunc(5*time.Second, func() { stopAll(syscall.SIGKILL) })
		}
	}
	if first != nil {
		return core.Errorf(core.Unavailable, "kiln: train: rank %d failed (%v); the other local ranks were stopped", first.rank, first.err)
	}
	return ctx.Err()
}
