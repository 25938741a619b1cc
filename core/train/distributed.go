package train

import (
	"context"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"

	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/dist"
	"github.com/kilnml/kiln/core/nn"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native/trainer"
)

// Data-parallel training (Config.Group set): every rank runs Fit on the
// same network spec, data and config; Fit then behaves as PyTorch's
// DistributedDataParallel with a DistributedSampler:
//
//   - the ranks check that they agree on the network, the data's schema and
//     size and the config, then take rank 0's parameters and buffers;
//   - each epoch's shuffle is the same on every rank (seeded by Seed and
//     drawn epoch by epoch, restored on resume); rank r trains on
//     positions r, r+W, r+2W, ... of it, padded by repeating its start so
//     that every rank runs the same number of steps;
//   - after each backward the gradients are averaged over the ranks in
//     buckets (native/trainer/dist.cc), so the weights stay equal;
//   - after each epoch the ranks take rank 0's buffers (batch-norm running
//     statistics, DDP's broadcast_buffers), evaluate disjoint parts of the
//     validation set and all-reduce the outputs and loss, so every rank
//     computes the same metrics and makes the same early-stopping
//     decision; time budgets are agreed on too (any rank's stop stops all);
//   - only rank 0 writes checkpoints; on resume every rank reads the
//     checkpoint (a shared directory), and the world size may differ from
//     the run that wrote it.

// joinGroup attaches the trainer to the group and checks that the ranks
// agree on what they train.
func (r *run) joinGroup() error {
	g := r.g
	if err := r.tr.SetGroup(g.Native(), g.Options().BucketBytes); err != nil {
		return fmt.Errorf("kiln: train: %w", err)
	}
	net := r.net
	if r.cfg.SyncBatchNorm {
		if err := r.syncBatchNorm(); err != nil {
			return err
		}
	}
	if err := g.Agree("network (spec, inputs, outputs)", hash64(net.Source, net.Inputs, net.Outputs, net.Params, net.Layers)); err != nil {
		return err
	}
	if err := g.Agree("data schema (feature count)", int64(r.trainSet.Features)); err != nil {
		return err
	}
	if err := g.Agree("training data (row count)", int64(r.trainSet.Len())); err != nil {
		return err
	}
	if err := g.Agree("training config", hash64(r.cfg.fingerprint(), r.cfg.Epochs)); err != nil {
		return err
	}
	return nil
}

// syncBatchNorm makes the trainer's batch-norm layers normalize with the
// statistics of every rank's batch (Config.SyncBatchNorm).
func (r *run) syncBatchNorm() error {
	if r.net.Source == "" {
		return core.Errorf(core.InvalidArgument, "kiln: train: sync_batchnorm needs a network Kiln built from a spec (this one has no forward source)")
	}
	src, n := nn.SyncBatchNormSource(r.net.Source)
	if n == 0 {
		slog.Info("kiln: train: sync_batchnorm: the network has no batch-norm layer; nothing to synchronize")
		return nil
	}
	if err := r.tr.SetSyncBatchNorm(r.g.Native(), src); err != nil {
		return fmt.Errorf("kiln: train: sync_batchnorm: %w", err)
	}
	return nil
}

// beginGroup runs after a resume: the ranks must start at the same epoch,
// and all take rank 0's parameters and buffers.
func (r *run) beginGroup() error {
	if err := r.g.Agree("resume epoch (is the checkpoint directory shared by every rank?)", int64(r.start)); err != nil {
		return err
	}
	if err := r.g.Native().Broadcast(r.net.Handle(), false); err != nil {
		return fmt.Errorf("kiln: train: broadcasting rank 0's weights: %w", r.explain(err))
	}
	return nil
}

// shardLen is the number of training samples each rank takes per epoch.
func (r *run) shardLen() int {
	n := r.trainSet.Len()
	if r.g == nil {
		return n
	}
	w := r.g.Size()
	return (n + w - 1) / w
}

// shard is this rank's part of the epoch's order perm, as
// torch.utils.data.DistributedSampler makes it: perm padded with its own
// start to a multiple of the world size, then every W-th from the rank.
func (r *run) shard(perm []int64) []int64 {
	if r.g == nil {
		return perm
	}
	w, rank := r.g.Size(), r.g.Rank()
	per := r.shardLen()
	out := make([]int64, 0, per)
	for i := rank; i < per*w; i += w {
		out = append(out, perm[i%len(perm)])
	}
	return out
}

// writes reports whether this process writes checkpoints (rank 0 only).
func (r *run) writes() bool { return r.g == nil || r.g.Rank() == 0 }

// explain names the ranks behind a failed collective.
func (r *run) explain(err error) error {
	if r.g == nil {
		return err
	}
	return r.g.Explain(err)
}

// agreeStop makes every rank stop when any wants to (time budgets differ
// per rank; early stopping agrees already, since metrics are all-reduced).
func (r *run) agreeStop(stop bool) (bool, error) {
	v := []float64{0}
	if stop {
		v[0] = 1
	}
	if err := r.g.AllReduce(v, trainer.ReduceMax); err != nil {
		return false, fmt.Errorf("kiln: train: %w", err)
	}
	if v[0] > 0 && !stop {
		r.res.StopReason = "time_budget"
	}
	return v[0] > 0, nil
}

// evaluateGroup evaluates the validation set across the ranks: rank r
// scores rows [r*n/W, (r+1)*n/W), and the outputs and loss sums are
// all-reduced, so that every rank computes the metrics of the whole set.
func (r *run) evaluateGroup() (Metrics, error) {
	ds := r.valSet
	n := ds.Len()
	w, rank := r.g.Size(), r.g.Rank()
	lo, hi := rank*n/w, (rank+1)*n/w
	// Outputs per row.
	width := 1
	for _, d := range r.net.Outputs {
		width *= int(d)
	}
	buf := make([]float64, n*width+1)
	if hi > lo {
		rows := make([]int, hi-lo)
		for i := range rows {
			rows[i] = lo + i
		}
		part := ds.Subset(rows)
		x, y, err := tensors(part, r.net)
		if err != nil {
			return nil, err
		}
		out, loss, err := r.tr.Evaluate(x.Handle(), y.Handle(), int64(max(r.cfg.BatchSize, 256)))
		x.Close()
		y.Close()
		if err != nil {
			return nil, fmt.Errorf("kiln: evaluate: %w", err)
		}
		t, err := core.AdoptTensor(out)
		if err != nil {
			return nil, err
		}
		v, err := core.Data[float32](t)
		if err != nil {
			t.Close()
			return nil, err
		}
		if len(v) != (hi-lo)*width {
			t.Close()
			return nil, core.Errorf(core.Internal, "kiln: evaluate: %d outputs for %d rows of width %d", len(v), hi-lo, width)
		}
		for i, f := range v {
			buf[lo*width+i] = float64(f)
		}
		t.Close()
		buf[n*width] = loss * float64(hi-lo)
	}
	if err := r.g.AllReduce(buf, trainer.ReduceSum); err != nil {
		return nil, fmt.Errorf("kiln: evaluate: %w", err)
	}
	vals := make([]float32, n*width)
	for i := range vals {
		vals[i] = float32(buf[i])
	}
	m := scoreValues(vals, ds.Y, r.h)
	m["loss"] = buf[n*width] / float64(n)
	return m, nil
}

// hash64 is a hash of vs' printed forms, for Group.Agree.
func hash64(vs ...any) int64 {
	h := fnv.New64a()
	for _, v := range vs {
		fmt.Fprintf(h, "%v\x00", v)
	}
	return int64(h.Sum64())
}

// fitWorkers runs Fit as cfg.Workers data-parallel ranks in this process:
// rank 0 on the calling goroutine with net and onEvent, ranks 1.. on their
// own goroutines with deep copies of net, joined by a Gloo group over
// loopback (a TCPStore on a free port of 127.0.0.1). Each rank trains on
// its shard with batch size cfg.BatchSize, as torchrun's ranks would. The
// first error of any rank is returned (the others then fail too, naming
// it).
func fitWorkers(ctx context.Context, net *nn.Net, trainSet, valSet *data.Dataset, cfg Config, onEvent func(Event)) (*Result, error) {
	w := cfg.Workers
	port, err := freeLoopbackPort()
	if err != nil {
		return nil, fmt.Errorf("kiln: train: workers: %w", err)
	}
	env := func(rank int) dist.Env {
		return dist.Env{MasterAddr: "127.0.0.1", MasterPort: port, Rank: rank, WorldSize: w,
			LocalRank: rank, LocalWorldSize: w, IfName: loopbackIf()}
	}
	// rank runs one rank to the end; net is that rank's network.
	rank := func(r int, net *nn.Net, onEvent func(Event)) (*Result, error) {
		g, err := dist.Init(env(r), dist.Options{})
		if err != nil {
			return nil, err
		}
		defer g.Close()
		c := cfg
		c.Workers, c.Group = 0, g
		res, err := Fit(ctx, net, trainSet, valSet, c, onEvent)
		if err != nil {
			return nil, err
		}
		if err := g.Barrier(); err != nil {
			return nil, fmt.Errorf("kiln: train: %w", err)
		}
		return res, nil
	}
	// The workers' networks: net saved once and loaded per worker (a
	// deepcopy's parameters are not leaves and cannot be optimized); rank
	// 0's weights reach them by broadcast anyway.
	tmp, err := os.MkdirTemp("", "kiln-workers-")
	if err != nil {
		return nil, fmt.Errorf("kiln: train: workers: %w", err)
	}
	defer os.RemoveAll(tmp)
	saved := filepath.Join(tmp, "net.pt")
	if err := net.Save(saved); err != nil {
		return nil, fmt.Errorf("kiln: train: workers: %w", err)
	}
	errs := make([]error, w)
	var wg sync.WaitGroup
	for r := 1; r < w; r++ {
		m, err := core.LoadModule(saved)
		if err != nil {
			return nil, fmt.Errorf("kiln: train: workers: %w", err)
		}
		if err := trainer.RequireGrad(m.Handle()); err != nil {
			m.Close()
			return nil, fmt.Errorf("kiln: train: workers: %w", err)
		}
		cp := &nn.Net{Module: m, Layers: net.Layers, Params: net.Params, Inputs: net.Inputs,
			Outputs: net.Outputs, Source: net.Source, InputShape: net.InputShape}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer cp.Close()
			defer func() {
				if p := recover(); p != nil {
					errs[r] = core.Errorf(core.Internal, "kiln: train: worker %d: internal error: %v", r, p)
				}
			}()
			_, errs[r] = rank(r, cp, nil)
		}()
	}
	res, err := rank(0, net, onEvent)
	wg.Wait()
	// A worker's own failure explains rank 0's (which then names it gone).
	for r, e := range errs {
		if e != nil && dist.DeadRanks(e) == nil {
			return nil, fmt.Errorf("kiln: train: worker %d: %w", r, e)
		}
	}
	if err != nil {
		return res, err
	}
	for r, e := range errs {
		if e != nil {
			return nil, fmt.Errorf("kiln: train: worker %d: %w", r, e)
		}
	}
	return res, nil
}

// freeLoopbackPort is a TCP port of 127.0.0.1 nothing listens on now.
func freeLoopbackPort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// loopbackIf is the name of the loopback interface ("lo" on Linux).
func loopbackIf() string {
	ifs, err := net.Interfaces()
	if err == nil {
		for _, i := range ifs {
			if i.Flags&net.FlagLoopback != 0 {
				return i.Name
			}
		}
	}
	return "lo"
}
