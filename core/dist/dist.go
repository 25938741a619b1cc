// Package dist is Kiln's data-parallel training group over PyTorch's own
// distributed engine, c10d: a TCPStore rendezvous and a Gloo process group
// (ProcessGroupGloo), joined under torchrun's launch contract.
//
// A process learns its place from the variables torchrun, Kubeflow's
// PyTorchJob and `kiln train --nproc-per-node` set (see EnvFrom):
// MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and
// LOCAL_WORLD_SIZE. Under torchrun's agent store
// (TORCHELASTIC_USE_AGENT_STORE=True) every rank connects to the agent's
// store as a client, under the key prefix /worker/attempt_N that
// torch.distributed uses; otherwise rank 0 hosts the store, as in a
// PyTorchJob.
//
// Failures carry a code: a rank that dies, hangs past the timeout or leaves
// makes the collectives of the others fail with Unavailable (or
// DeadlineExceeded) and a message naming the missing ranks (Group.Explain).
package dist

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native/trainer"
)

// DefaultTimeout bounds the rendezvous and every collective unless
// Options.Timeout says otherwise (libtorch's own default is 30 minutes).
const DefaultTimeout = 60 * time.Second

// DefaultBucketBytes is the size of a gradient bucket (PyTorch DDP's
// bucket_cap_mb=25).
const DefaultBucketBytes = 25 << 20

// Names of the launch variables (torchrun's contract).
const (
	VarMasterAddr     = "MASTER_ADDR"
	VarMasterPort     = "MASTER_PORT"
	VarRank           = "RANK"
	VarWorldSize      = "WORLD_SIZE"
	VarLocalRank      = "LOCAL_RANK"
	VarLocalWorldSize = "LOCAL_WORLD_SIZE"
	VarUseAgentStore  = "TORCHELASTIC_USE_AGENT_STORE"
	VarRestartCount   = "TORCHELASTIC_RESTART_COUNT"
	VarGlooIfName     = "GLOO_SOCKET_IFNAME"
)

// Env is a process's place in a distributed run, as the launcher set it.
type Env struct {
	MasterAddr     string // MASTER_ADDR: host of the rendezvous store
	MasterPort     int    // MASTER_PORT
	Rank           int    // RANK: global rank, in [0, WorldSize)
	WorldSize      int    // WORLD_SIZE: number of ranks
	LocalRank      int    // LOCAL_RANK: rank on this node (default Rank)
	LocalWorldSize int    // LOCAL_WORLD_SIZE: ranks on this node (default WorldSize)
	// AgentStore is TORCHELASTIC_USE_AGENT_STORE=True: torchrun's agent
	// hosts the store and StorePrefix is "/worker/attempt_<restart count>".
	AgentStore  bool
	StorePrefix string
	// IfName is GLOO_SOCKET_IFNAME: the interface Gloo binds ("": default).
	IfName string
}

// EnvFrom reads the launch variables through getenv (os.Getenv in a
// process, a map in a test). ok is false when none of MASTER_ADDR,
// MASTER_PORT, RANK and WORLD_SIZE is set (not a distributed run). When
// some are set, all four must be, well formed and consistent; the error
// (InvalidArgument) names the variable.
func EnvFrom(getenv func(string) string) (env Env, ok bool, err error) {
	req := []string{VarMasterAddr, VarMasterPort, VarRank, VarWorldSize}
	var set, missing []string
	for _, k := range req {
		if getenv(k) != "" {
			set = append(set, k)
		} else {
			missing = append(missing, k)
		}
	}
	if len(set) == 0 {
		return Env{}, false, nil
	}
	if len(missing) > 0 {
		return Env{}, false, core.Errorf(core.InvalidArgument,
			"kiln: distributed launch: %s set but %s missing (torchrun sets all of MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)",
			strings.Join(set, ", "), strings.Join(missing, ", "))
	}
	num := func(k string, lo, hi int) (int, error) {
		s := getenv(k)
		n, err := strconv.Atoi(s)
		if err != nil || n < lo || n > hi {
			return 0, core.Errorf(core.InvalidArgument, "kiln: distributed launch: %s=%q: want an integer in [%d, %d]", k, s, lo, hi)
		}
		return n, nil
	}
	env.MasterAddr = getenv(VarMasterAddr)
	if env.MasterPort, err = num(VarMasterPort, 1, 65535); err != nil {
		return Env{}, false, err
	}
	if env.WorldSize, err = num(VarWorldSize, 1, 1<<20); err != nil {
		return Env{}, false, err
	}
	if env.Rank, err = num(VarRank, 0, env.WorldSize-1); err != nil {
		return Env{}, false, err
	}
	env.LocalRank, env.LocalWorldSize = env.Rank, env.WorldSize
	if getenv(VarLocalWorldSize) != "" {
		if env.LocalWorldSize, err = num(VarLocalWorldSize, 1, env.WorldSize); err != nil {
			return Env{}, false, err
		}
	}
	if getenv(VarLocalRank) != "" {
		if env.LocalRank, err = num(VarLocalRank, 0, env.LocalWorldSize-1); err != nil {
			return Env{}, false, err
		}
	} else if env.LocalRank >= env.LocalWorldSize {
		return Env{}, false, core.Errorf(core.InvalidArgument, "kiln: distributed launch: LOCAL_WORLD_SIZE=%d set without LOCAL_RANK", env.LocalWorldSize)
	}
	// torch.distributed compares with str(True).
	if getenv(VarUseAgentStore) == "True" {
		env.AgentStore = true
		attempt := getenv(VarRestartCount)
		if attempt == "" {
			return Env{}, false, core.Errorf(core.InvalidArgument, "kiln: distributed launch: %s=True needs %s (torchrun sets both)", VarUseAgentStore, VarRestartCount)
		}
		if _, err := num(VarRestartCount, 0, 1<<30); err != nil {
			return Env{}, false, err
		}
		env.StorePrefix = "/worker/attempt_" + attempt
	}
	env.IfName = getenv(VarGlooIfName)
	return env, true, nil
}

// Options tune a Group.
type Options struct {
	// Timeout bounds the rendezvous and each collective (0: DefaultTimeout).
	// A rank that dies makes the others fail at once; one that hangs makes
	// them fail after Timeout.
	Timeout time.Duration
	// BucketBytes is the size of a gradient bucket (0: DefaultBucketBytes).
	BucketBytes int64
	// Backend is the c10d backend: BackendGloo ("" too) or BackendNCCL,
	// which needs a libtorch with CUDA and NCCL (see CheckBackend).
	Backend string
}

// The c10d backends.
const (
	BackendGloo = "gloo"
	BackendNCCL = "nccl"
)

// CheckBackend checks that backend ("" for gloo) is known and usable with
// the linked libtorch: nccl only where it has CUDA and NCCL (Debian's
// libtorch 1.13 has neither), else Unsupported; an unknown name is
// InvalidArgument.
func CheckBackend(backend string) error {
	switch backend {
	case "", BackendGloo:
		return nil
	case BackendNCCL:
		if !trainer.HasNCCL() {
			return core.Errorf(core.Unsupported, "kiln: distributed: %s", trainer.NCCLUnavailable())
		}
		return nil
	}
	return core.Errorf(core.InvalidArgument, "kiln: distributed: unknown backend %q (want gloo or nccl)", backend)
}

// Group is this process's membership of a c10d Gloo process group. It owns
// the native group (and on rank 0 without an agent store the store server);
// Close releases it. Methods must be called in the same order on every rank
// (they are collectives), from one goroutine at a time.
type Group struct {
	g        trainer.Group
	env      Env
	opts     Options
	failures atomic.Int64
}

// Init joins the group env describes. Every rank of [0, WorldSize) must
// call it within opts.Timeout; an error names the ranks that did not come
// (DeadlineExceeded) or that disagree on WORLD_SIZE or RANK
// (InvalidArgument).
func Init(env Env, opts Options) (*Group, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.BucketBytes <= 0 {
		opts.BucketBytes = DefaultBucketBytes
	}
	if env.WorldSize < 1 || env.Rank < 0 || env.Rank >= env.WorldSize {
		return nil, core.Errorf(core.InvalidArgument, "kiln: distributed: RANK %d outside [0, WORLD_SIZE=%d)", env.Rank, env.WorldSize)
	}
	if opts.Backend == "" {
		opts.Backend = BackendGloo
	}
	if err := CheckBackend(opts.Backend); err != nil {
		return nil, err
	}
	t0 := time.Now()
	g, err := trainer.NewGroup(trainer.GroupOptions{
		MasterAddr: env.MasterAddr, MasterPort: env.MasterPort, Rank: env.Rank, WorldSize: env.WorldSize,
		HostStore: !env.AgentStore && env.Rank == 0, Prefix: env.StorePrefix, Timeout: opts.Timeout, IfName: env.IfName,
		Backend: opts.Backend,
	})
	if err != nil {
		return nil, fmt.Errorf("kiln: distributed: rank %d: %w", env.Rank, err)
	}
	slog.Info("kiln: joined the process group", "rank", env.Rank, "world_size", env.WorldSize, "backend", opts.Backend,
		"threads", core.NumThreads(),
		"store", fmt.Sprintf("%s:%d", env.MasterAddr, env.MasterPort), "agent_store", env.AgentStore,
		"seconds", time.Since(t0).Seconds())
	return &Group{g: g, env: env, opts: opts}, nil
}

// Rank is this process's global rank.
func (g *Group) Rank() int { return g.env.Rank }

// Size is the number of ranks (WORLD_SIZE).
func (g *Group) Size() int { return g.env.WorldSize }

// Env is the launch environment the group was made from.
func (g *Group) Env() Env { return g.env }

// Options are the group's options, with defaults filled in.
func (g *Group) Options() Options { return g.opts }

// Native is the native group, for core/train (valid until Close).
func (g *Group) Native() trainer.Group { return g.g }

// Close leaves the group. Call it on every rank; a rank hosting the store
// should close last (call Barrier first when the run succeeded).
func (g *Group) Close() {
	if g != nil && g.g.Valid() {
		g.g.Free()
		g.g = trainer.Group{}
	}
}

// AllReduce reduces v in place across the ranks (every rank passes the
// same length).
func (g *Group) AllReduce(v []float64, op trainer.ReduceOp) error {
	if err := g.g.AllReduce(v, op); err != nil {
		return g.Explain(err)
	}
	return nil
}

// Barrier waits for every rank.
func (g *Group) Barrier() error {
	if err := g.g.Barrier(); err != nil {
		return g.Explain(err)
	}
	return nil
}

// Agree checks that every rank passes the same v for what (e.g. a hash of
// the network spec or of the data schema); the InvalidArgument error names
// the ranks that differ from rank 0.
func (g *Group) Agree(what string, v int64) error {
	all, err := g.g.AllGather(v)
	if err != nil {
		return g.Explain(err)
	}
	var bad []string
	for r, x := range all {
		if x != all[0] {
			bad = append(bad, strconv.Itoa(r))
		}
	}
	if len(bad) > 0 {
		return core.Errorf(core.InvalidArgument, "kiln: distributed: rank(s) %s have a different %s than rank 0", strings.Join(bad, ", "), what)
	}
	return nil
}

// Explain turns a failed collective (Unavailable or DeadlineExceeded) into
// an error naming the ranks that are gone: this rank marks itself alive in
// the store and waits briefly for the others; those that do not answer
// died, hung or left. Other errors pass through unchanged.
func (g *Group) Explain(err error) error {
	if err == nil || !(core.HasCode(err, core.Unavailable) || core.HasCode(err, core.DeadlineExceeded)) {
		return err
	}
	var de *deadError
	if errors.As(err, &de) {
		return err
	}
	n := g.failures.Add(1)
	wait := min(g.opts.Timeout/4, 5*time.Second)
	alive, aerr := g.g.Alive("failure-"+strconv.FormatInt(n, 10), wait)
	if aerr != nil {
		if !g.env.AgentStore && g.env.Rank != 0 {
			return &deadError{ranks: []int{0}, code: core.Unavailable,
				msg: fmt.Sprintf("rank 0 (which hosts the rendezvous store) is gone: %v", err)}
		}
		return fmt.Errorf("kiln: distributed: rank %d: %w", g.env.Rank, err)
	}
	var gone []int
	for r, a := range alive {
		if !a {
			gone = append(gone, r)
		}
	}
	if len(gone) == 0 {
		return fmt.Errorf("kiln: distributed: rank %d: %w", g.env.Rank, err)
	}
	code := core.CodeOf(err)
	if strings.Contains(strings.ToLower(err.Error()), "timed out") {
		code = core.DeadlineExceeded // Gloo's timeout: the peer hung
	}
	return &deadError{ranks: gone, code: code,
		msg: fmt.Sprintf("rank(s) %s died, hung or left (no answer within %s): %v", joinInts(gone), wait, err)}
}

// deadError names ranks that are gone. Its code is Unavailable (a peer
// died) or DeadlineExceeded (a peer hung past the timeout).
type deadError struct {
	ranks []int
	code  core.Code
	msg   string
}

func (e *deadError) Error() string { return "kiln: distributed: " + e.msg }

// ErrorCode is the error's code.
func (e *deadError) ErrorCode() core.Code { return e.code }

// DeadRanks returns the ranks err names as gone (died, hung or left), or
// nil when err is not such an error.
func DeadRanks(err error) []int {
	var de *deadError
	if errors.As(err, &de) {
		return append([]int(nil), de.ranks...)
	}
	return nil
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ", ")
}
