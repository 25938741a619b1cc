/*
 * kiln_dist.h — Kiln's flat C ABI over PyTorch's c10d: a TCPStore
 * rendezvous and a Gloo process group (ProcessGroupGloo), the collectives
 * data-parallel training needs, and gradient all-reduce inside a trainer.
 *
 * The rules of kiln.h apply: no C++ exception escapes, errors carry a code
 * and are freed with kiln_error_free, every handle has one owner and a
 * *_free function. A collective that fails because a peer died, hung past
 * the timeout or left is KILN_ERROR_UNAVAILABLE (its message is Gloo's);
 * kiln_pg_alive then tells which ranks are still there.
 */
#ifndef KILN_DIST_H
#define KILN_DIST_H

#include "kiln_train.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kiln_pg kiln_pg;

/* How to join a process group (torchrun's contract). */
typedef struct {
  const char* master_addr; /* MASTER_ADDR: host of the TCPStore */
  int master_port;         /* MASTER_PORT */
  int rank;                /* RANK, in [0, world_size) */
  int world_size;          /* WORLD_SIZE, >= 1 */
  /* 1: this process hosts the TCPStore server (rank 0 without an agent
   * store); 0: it connects as a client (torchrun's agent store, ranks > 0). */
  int host_store;
  /* Key prefix over the store (torchrun's "/worker/attempt_N"), or NULL. */
  const char* prefix;
  /* Rendezvous and collective timeout in milliseconds (> 0). */
  int64_t timeout_ms;
  /* Network interface for Gloo (GLOO_SOCKET_IFNAME), or NULL/"" for the
   * default device (the address the host name resolves to). */
  const char* ifname;
  /* "gloo" (NULL or "": the default) or "nccl". nccl needs a libtorch
   * with CUDA and NCCL (kiln_dist_has_nccl); otherwise kiln_pg_new fails
   * with UNSUPPORTED before the rendezvous. */
  const char* backend;
} kiln_pg_options;

/* 1 when the nccl backend can be used: Kiln was compiled against a
 * libtorch with NCCL (USE_C10D_NCCL) and libtorch finds CUDA; else 0. */
int kiln_dist_has_nccl(void);

/* Why the nccl backend cannot be used (a static string). */
const char* kiln_dist_nccl_unavailable_reason(void);

/* Joins the group: connects to (or hosts) the store, checks that every
 * rank of [0, world_size) arrives once, within the timeout and with the
 * same world size (INVALID_ARGUMENT naming the ranks otherwise,
 * DEADLINE_EXCEEDED naming the missing ones), then builds the Gloo
 * process group. */
kiln_error kiln_pg_new(const kiln_pg_options* o, kiln_pg** out);
void kiln_pg_free(kiln_pg* pg);

int kiln_pg_rank(const kiln_pg* pg);
int kiln_pg_world_size(const kiln_pg* pg);

/* Reduction ops of kiln_pg_allreduce_f64. */
typedef enum {
  KILN_REDUCE_SUM = 0,
  KILN_REDUCE_MAX = 1,
  KILN_REDUCE_MIN = 2,
} kiln_reduce_op;

/* All-reduces v[0..n) (float64) in place across the group, blocking. v is
 * only read and written during the call. */
kiln_error kiln_pg_allreduce_f64(kiln_pg* pg, double* v, int64_t n, kiln_reduce_op op);

/* All-reduces (sums) tensor t in place, blocking. */
kiln_error kiln_pg_allreduce_tensor(kiln_pg* pg, kiln_tensor* t);

/* Gathers one int64 from every rank: out[r] = rank r's v (out holds
 * world_size values). */
kiln_error kiln_pg_allgather_i64(kiln_pg* pg, int64_t v, int64_t* out);

/* Copies rank 0's parameters and buffers into every rank's module m
 * (buffers_only: just the buffers, e.g. batch-norm running statistics).
 * All ranks must have modules of the same layout. */
kiln_error kiln_pg_broadcast_module(kiln_pg* pg, kiln_module* m, int buffers_only);

/* Blocks until every rank has called it. */
kiln_error kiln_pg_barrier(kiln_pg* pg);

/* After a failed collective: marks this rank alive in the store under
 * tag, then waits up to wait_ms for the others to do the same.
 * alive[r] (world_size values) is 1 for each rank seen. If the store is
 * unreachable (its host, rank 0 without an agent store, is gone) the call
 * returns UNAVAILABLE. */
kiln_error kiln_pg_alive(kiln_pg* pg, const char* tag, int64_t wait_ms, int* alive);

/* Makes trainer t average its gradients over pg in every step, in buckets
 * of about bucket_bytes (last parameters first, as PyTorch's DDP orders
 * them). Hooks on the parameters fill a bucket while backward runs and
 * start its all-reduce as soon as it is full, in bucket order on every
 * rank, overlapping communication with the rest of backward. pg may be
 * NULL to stop (removing the hooks). pg must outlive its use by t. */
kiln_error kiln_trainer_set_group(kiln_trainer* t, kiln_pg* pg, int64_t bucket_bytes);

/* Synchronized batch norm (torch.nn.SyncBatchNorm's semantics): makes
 * trainer t's training steps run `source` (TorchScript of a forward
 * method) over the very parameters and buffers of t's module, in which
 * batch-norm layers call kiln.sync_batch_norm(x, weight, bias,
 * running_mean, running_var, momentum, eps, self.kiln_sync_group): batch
 * statistics all-reduced over pg in forward, their gradients in backward.
 * Evaluation and saving keep the module's own forward. Every rank must
 * run the same layers in the same order. pg NULL turns it off. pg must
 * outlive its use by t. INVALID_ARGUMENT when source does not compile or
 * the module is not a flat Kiln network (attributes other than tensors). */
kiln_error kiln_trainer_set_sync_batchnorm(kiln_trainer* t, kiln_pg* pg, const char* source);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* KILN_DIST_H */
