package trainer

/*
#include <stdlib.h>
#include "kiln_dist.h"
*/
import "C"

import (
	"time"
	"unsafe"

	"github.com/kilnml/kiln/native"
)

// GroupOptions mirrors kiln_pg_options: how a process joins a c10d process
// group (torchrun's contract: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
type GroupOptions struct {
	MasterAddr string
	MasterPort int
	Rank       int
	WorldSize  int
	// HostStore makes this process host the TCPStore server (rank 0
	// without torchrun's agent store); otherwise it connects as a client.
	HostStore bool
	// Prefix is the key prefix over the store ("/worker/attempt_N" under
	// torchrun's agent store), or "".
	Prefix string
	// Timeout bounds the rendezvous and every collective.
	Timeout time.Duration
	// IfName is the network interface Gloo uses (GLOO_SOCKET_IFNAME), or ""
	// for the default device.
	IfName string
	// Backend is "gloo" ("" too) or "nccl" (needs HasNCCL).
	Backend string
}

// HasNCCL reports whether the nccl backend can be used: Kiln was compiled
// against a libtorch with NCCL and libtorch finds CUDA.
func HasNCCL() bool { return C.kiln_dist_has_nccl() != 0 }

// NCCLUnavailable says why the nccl backend cannot be used.
func NCCLUnavailable() string { return C.GoString(C.kiln_dist_nccl_unavailable_reason()) }

// Group is a raw handle to a kiln_pg (TCPStore + ProcessGroupGloo); Free
// it exactly once.
type Group struct{ p *C.kiln_pg }

// Valid reports whether g refers to a process group.
func (g Group) Valid() bool { return g.p != nil }

// NewGroup joins the process group described by o; see kiln_pg_new for the
// errors (INVALID_ARGUMENT for inconsistent ranks or world sizes,
// DEADLINE_EXCEEDED naming ranks that never arrived, UNAVAILABLE when the
// store cannot be reached).
func NewGroup(o GroupOptions) (Group, error) {
	addr := C.CString(o.MasterAddr)
	defer C.free(unsafe.Pointer(addr))
	var prefix, ifname, backend *C.char
	if o.Backend != "" {
		backend = C.CString(o.Backend)
		defer C.free(unsafe.Pointer(backend))
	}
	if o.Prefix != "" {
		prefix = C.CString(o.Prefix)
		defer C.free(unsafe.Pointer(prefix))
	}
	if o.IfName != "" {
		ifname = C.CString(o.IfName)
		defer C.free(unsafe.Pointer(ifname))
	}
	co := C.kiln_pg_options{
		master_addr: addr, master_port: C.int(o.MasterPort), rank: C.int(o.Rank),
		world_size: C.int(o.WorldSize), host_store: cbool(o.HostStore), prefix: prefix,
		timeout_ms: C.int64_t(o.Timeout.Milliseconds()), ifname: ifname, backend: backend,
	}
	var out *C.kiln_pg
	if err := takeErr(C.kiln_pg_new(&co, &out)); err != nil {
		return Group{}, err
	}
	return Group{out}, nil
}

// Free releases the group (and, on the rank hosting it, the store server).
func (g Group) Free() { C.kiln_pg_free(g.p) }

// Rank is this process's rank.
func (g Group) Rank() int { return int(C.kiln_pg_rank(g.p)) }

// WorldSize is the number of ranks.
func (g Group) WorldSize() int { return int(C.kiln_pg_world_size(g.p)) }

// ReduceOp mirrors kiln_reduce_op.
type ReduceOp int32

// Reduction ops.
const (
	ReduceSum ReduceOp = C.KILN_REDUCE_SUM
	ReduceMax ReduceOp = C.KILN_REDUCE_MAX
	ReduceMin ReduceOp = C.KILN_REDUCE_MIN
)

// AllReduce reduces v in place across the group (every rank passes a slice
// of the same length). v is lent to C for the call only.
func (g Group) AllReduce(v []float64, op ReduceOp) error {
	if len(v) == 0 {
		return nil
	}
	return takeErr(C.kiln_pg_allreduce_f64(g.p, (*C.double)(unsafe.Pointer(&v[0])), C.int64_t(len(v)), C.kiln_reduce_op(op)))
}

// AllReduceTensor sums the contiguous tensor t in place across the group.
func (g Group) AllReduceTensor(t native.Tensor) error {
	return takeErr(C.kiln_pg_allreduce_tensor(g.p, ten(t)))
}

// AllGather returns every rank's v, indexed by rank.
func (g Group) AllGather(v int64) ([]int64, error) {
	out := make([]int64, g.WorldSize())
	err := takeErr(C.kiln_pg_allgather_i64(g.p, C.int64_t(v), (*C.int64_t)(unsafe.Pointer(&out[0]))))
	return out, err
}

// Broadcast copies rank 0's parameters and buffers (only buffers with
// buffersOnly) into m on every rank.
func (g Group) Broadcast(m native.Module, buffersOnly bool) error {
	return takeErr(C.kiln_pg_broadcast_module(g.p, mod(m), cbool(buffersOnly)))
}

// Barrier blocks until every rank has reached it.
func (g Group) Barrier() error { return takeErr(C.kiln_pg_barrier(g.p)) }

// Alive marks this rank alive under tag in the store and waits up to wait
// for the other ranks to do so; alive[r] tells whether rank r did.
func (g Group) Alive(tag string, wait time.Duration) ([]bool, error) {
	ct := C.CString(tag)
	defer C.free(unsafe.Pointer(ct))
	n := g.WorldSize()
	buf := make([]C.int, n)
	if err := takeErr(C.kiln_pg_alive(g.p, ct, C.int64_t(wait.Milliseconds()), &buf[0])); err != nil {
		return nil, err
	}
	out := make([]bool, n)
	for i, a := range buf {
		out[i] = a != 0
	}
	return out, nil
}

// SetGroup makes t average its gradients over g after every backward, in
// buckets of about bucketBytes; a zero Group stops that. g must stay open
// while t trains.
func (t Trainer) SetGroup(g Group, bucketBytes int64) error {
	return takeErr(C.kiln_trainer_set_group(t.p, g.p, C.int64_t(bucketBytes)))
}

// SetSyncBatchNorm makes t's training steps run source, a forward over
// t's module's own parameters and buffers whose batch-norm layers call
// kiln.sync_batch_norm (see core/nn.SyncBatchNormSource): batch
// statistics all-reduced over g. A zero Group turns it off. g must stay
// open while t trains.
func (t Trainer) SetSyncBatchNorm(g Group, source string) error {
	var cs *C.char
	if g.p != nil {
		cs = C.CString(source)
		defer C.free(unsafe.Pointer(cs))
	}
	return takeErr(C.kiln_trainer_set_sync_batchnorm(t.p, g.p, cs))
}
