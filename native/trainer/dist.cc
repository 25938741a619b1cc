// dist.cc — PyTorch's c10d (TCPStore, PrefixStore, ProcessGroupGloo)
// behind the C ABI in kiln_dist.h, and the bucketed gradient all-reduce of
// data-parallel training. Compiled with USE_C10D_GLOO (the cgo directives
// of package trainer define it), against libgloo-dev's headers.
#ifndef USE_C10D_GLOO
#error "dist.cc needs USE_C10D_GLOO (c10d's ProcessGroupGloo)"
#endif

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <ATen/Context.h>
#include <gloo/allreduce.h>
#include <gloo/allreduce_halving_doubling.h>
#include <gloo/allreduce_ring.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../internal.h"
#include "kiln_dist.h"
#include "trainer_internal.h"

struct kiln_pg {
  c10::intrusive_ptr<c10d::Store> tcp;    // the TCPStore (server or client)
  c10::intrusive_ptr<c10d::Store> store;  // kiln's keys: <prefix>/kiln/
  c10::intrusive_ptr<c10d::ProcessGroup> pg;  // Gloo, or NCCL where built with it
  int rank = 0;
  int world = 1;
  std::chrono::milliseconds timeout{60000};
  std::string where;  // "MASTER_ADDR:MASTER_PORT", for messages
  // A Gloo context of its own (own connections, Gloo backend only) for
  // the blocking all-reduces of batch-norm statistics inside forward and
  // backward (synchronized batch norm), run on the calling thread: they
  // never wait behind the gradient buckets queued on the process group.
  std::shared_ptr<::gloo::Context> direct;
  uint32_t direct_tag = 0;
  // A third Gloo context (own connections, Gloo backend, world > 1) whose
  // pairs are in Gloo's synchronous mode: the calling thread writes and
  // reads the sockets itself, without the hand-offs of the asynchronous
  // path (the process group's worker thread, Gloo's event-loop thread and
  // the rendezvous messages of unbound buffers). The last gradient bucket
  // of each step is all-reduced over it (see Buckets); for small networks
  // that all-reduce's latency is most of a step.
  std::shared_ptr<::gloo::Context> grads;

  // All-reduces (sums) the contiguous float32/float64 tensor t in place,
  // blocking, over `direct` (else through the process group). Throws.
  void allreduce_now(at::Tensor& t) {
    if (direct && t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)) {
      ::gloo::AllreduceOptions o(direct);
      if (t.scalar_type() == at::kFloat) {
        o.setOutput(t.data_ptr<float>(), static_cast<size_t>(t.numel()));
        o.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&::gloo::sum<float>));
      } else {
        o.setOutput(t.data_ptr<double>(), static_cast<size_t>(t.numel()));
        o.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&::gloo::sum<double>));
      }
      o.setTag(direct_tag++);
      o.setTimeout(timeout);
      ::gloo::allreduce(o);
      return;
    }
    std::vector<at::Tensor> ts{t};
    pg->allreduce(ts)->wait();
  }
};

namespace {

using ms = std::chrono::milliseconds;

std::vector<uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }
std::string text(const std::vector<uint8_t>& b) { return {b.begin(), b.end()}; }

std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); i++) {
    if (i) s += ", ";
    s += std::to_string(ranks[i]);
  }
  return s;
}

// Waits until every rank has published its world size under "world/<r>",
// failing fast when one disagrees and with a deadline error naming the
// ranks that never came.
kiln_error check_arrivals(kiln_pg* p, int world) {
  auto deadline = std::chrono::steady_clock::now() + p->timeout;
  std::vector<bool> seen(world, false);
  seen[p->rank] = true;
  for (;;) {
    std::vector<int> missing;
    for (int r = 0; r < world; r++) {
      if (seen[r]) continue;
      std::string key = "world/" + std::to_string(r);
      if (!p->store->check({key})) {
        missing.push_back(r);
        continue;
      }
      seen[r] = true;
      std::string v = text(p->store->get(key));
      if (v != std::to_string(world)) {
        return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT,
                                "rendezvous at " + p->where + ": rank " + std::to_string(r) +
                                    " has WORLD_SIZE=" + v + " but rank " +
                                    std::to_string(p->rank) + " has WORLD_SIZE=" +
                                    std::to_string(world));
      }
    }
    if (missing.empty()) return nullptr;
    if (std::chrono::steady_clock::now() >= deadline) {
      return kiln::make_error(
          KILN_ERROR_DEADLINE_EXCEEDED,
          "rendezvous at " + p->where + ": rank(s) " + rank_list(missing) + " of WORLD_SIZE=" +
              std::to_string(world) + " did not arrive within " +
              std::to_string(p->timeout.count() / 1000.0).substr(0, 5) +
              " s (fewer processes than WORLD_SIZE, or a wrong MASTER_ADDR/MASTER_PORT)");
    }
    std::this_thread::sleep_for(ms(20));
  }
}

// The gradient buckets of one trainer: parameters in reverse registration
// order (the order backward produces their gradients, as DDP buckets
// them), grouped by dtype into flat buffers of about cap bytes.
//
// Overlap with backward: a hook on each parameter (a pre-hook of its
// gradient accumulator) copies the gradient into its bucket as soon as
// autograd computes it; a bucket whose gradients are all in starts its
// all-reduce at once, while backward goes on. Buckets start strictly in
// index order on every rank (a ready bucket waits for the ones before it),
// so the ranks' collectives match. After backward, parameters that got no
// gradient contribute zeros (as in DDP), the remaining buckets start, and
// each is waited for, divided by the world size (Gloo has no AVG) and its
// slices become the parameters' gradients.
//
// The last bucket (the first layers' gradients, the last that backward
// completes) is waited for right after backward in any case, so it does
// not go through the process group's worker thread: with the Gloo backend
// it is all-reduced on the calling thread over kiln_pg::grads, Gloo's
// synchronous-mode connections (gloo::AllreduceRing for two ranks, which
// leaves both with the same sums, gloo::AllreduceHalvingDoubling for
// more), built at the first step. For a network whose gradients fit one
// bucket that is the only all-reduce of a step.
struct Buckets {
  struct Bucket {
    std::vector<size_t> idx;
    std::vector<int64_t> off;
    at::Tensor flat;
    size_t pending = 0;
    c10::intrusive_ptr<c10d::Work> work;
    bool direct = false;  // the last bucket, all-reduced over kiln_pg::grads
    std::unique_ptr<::gloo::Algorithm> algo;  // its all-reduce, built at the first step
  };
  std::vector<Bucket> b;
  std::vector<std::pair<size_t, size_t>> where;  // parameter -> (bucket, slot)
  std::vector<bool> got;                         // parameter has its gradient this step
  std::vector<at::Tensor> params;
  std::vector<unsigned> hooks;
  kiln_pg* pg = nullptr;
  size_t next = 0;      // the next bucket to start
  bool active = false;  // between prepare and finish
  std::string error;    // the first failure to start an all-reduce

  Buckets(const std::vector<at::Tensor>& ps, int64_t cap, kiln_pg* g) : params(ps), pg(g) {
    Bucket cur;
    int64_t size = 0, bytes = 0;
    at::ScalarType st = at::kFloat;
    where.resize(ps.size());
    got.resize(ps.size());
    auto close = [&] {
      if (cur.idx.empty()) return;
      cur.flat = at::zeros({size}, at::TensorOptions().dtype(st));
      b.push_back(std::move(cur));
      cur = Bucket{};
      size = bytes = 0;
    };
    for (size_t k = ps.size(); k-- > 0;) {
      const at::Tensor& p = ps[k];
      if (!cur.idx.empty() && (p.scalar_type() != st || bytes >= cap)) close();
      st = p.scalar_type();
      where[k] = {b.size(), cur.idx.size()};
      cur.idx.push_back(k);
      cur.off.push_back(size);
      size += p.numel();
      bytes += p.numel() * static_cast<int64_t>(p.element_size());
    }
    close();
    if (pg->grads && !b.empty()) {
      const at::Tensor& f = b.back().flat;
      b.back().direct = (f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble) &&
                        f.numel() <= std::numeric_limits<int>::max();
    }
  }

  // All-reduces (sums) bucket bk over kiln_pg::grads on this thread. Throws.
  void allreduce_direct(Bucket& bk) {
    if (!bk.algo) {
      const auto& ctx = pg->grads;
      const int n = static_cast<int>(bk.flat.numel());
      if (bk.flat.scalar_type() == at::kFloat) {
        std::vector<float*> ptrs{bk.flat.data_ptr<float>()};
        if (pg->world == 2) {
          bk.algo = std::make_unique<::gloo::AllreduceRing<float>>(ctx, ptrs, n);
        } else {
          bk.algo = std::make_unique<::gloo::AllreduceHalvingDoubling<float>>(ctx, ptrs, n);
        }
      } else {
        std::vector<double*> ptrs{bk.flat.data_ptr<double>()};
        if (pg->world == 2) {
          bk.algo = std::make_unique<::gloo::AllreduceRing<double>>(ctx, ptrs, n);
        } else {
          bk.algo = std::make_unique<::gloo::AllreduceHalvingDoubling<double>>(ctx, ptrs, n);
        }
      }
    }
    bk.algo->run();
  }

  ~Buckets() {
    for (size_t k = 0; k < hooks.size(); k++) {
      try {
        params[k].remove_hook(hooks[k]);
      } catch (...) {
      }
    }
  }

  // Starts every ready bucket from next on, in order, up to the direct one
  // (finish runs that).
  void launch_ready() {
    while (next < b.size() && b[next].pending == 0 && !b[next].direct) {
      Bucket& bk = b[next++];
      if (!error.empty()) continue;
      try {
        std::vector<at::Tensor> ts{bk.flat};
        bk.work = pg->pg->allreduce(ts);
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
  }

  // Takes parameter k's gradient g (autograd hook; never throws).
  void take(size_t k, const at::Tensor& g) {
    if (!active || got[k]) return;
    try {
      auto [bi, j] = where[k];
      Bucket& bk = b[bi];
      at::NoGradGuard ng;
      bk.flat.narrow(0, bk.off[j], params[k].numel()).copy_(g.reshape({-1}));
      got[k] = true;
      bk.pending--;
      launch_ready();
    } catch (const std::exception& e) {
      if (error.empty()) error = e.what();
    }
  }

  void prepare() {
    for (auto& bk : b) {
      bk.pending = bk.idx.size();
      bk.work.reset();
    }
    std::fill(got.begin(), got.end(), false);
    next = 0;
    error.clear();
    active = true;
  }

  void finish(kiln_trainer* t) {
    active = false;
    at::NoGradGuard ng;
    for (size_t k = 0; k < params.size(); k++) {
      if (got[k]) continue;
      auto [bi, j] = where[k];
      Bucket& bk = b[bi];
      const at::Tensor& g = params[k].grad();
      at::Tensor dst = bk.flat.narrow(0, bk.off[j], params[k].numel());
      if (g.defined()) {
        dst.copy_(g.reshape({-1}));
      } else {
        dst.zero_();  // unused in this step: contributes zero, as in DDP
      }
      got[k] = true;
      bk.pending--;
    }
    launch_ready();
    if (next < b.size() && b[next].direct) {
      // Every earlier bucket has started (on the process group's thread).
      if (error.empty()) {
        try {
          allreduce_direct(b[next]);
        } catch (const std::exception& e) {
          error = e.what();
          // Gloo's socket timeout ("Read timeout"), worded as the process
          // group words its own (a peer hung: DEADLINE_EXCEEDED upstream).
          if (error.find("timeout") != std::string::npos) {
            error = "timed out after " + std::to_string(pg->timeout.count()) + " ms: " + error;
          }
        }
      }
      next++;
    }
    const double inv = 1.0 / pg->world;
    for (auto& bk : b) {
      if (error.empty() && bk.work) {
        try {
          bk.work->wait();
        } catch (const std::exception& e) {
          error = e.what();
        }
      }
      if (!error.empty()) continue;
      bk.flat.mul_(inv);
      for (size_t j = 0; j < bk.idx.size(); j++) {
        at::Tensor& prm = t->params[bk.idx[j]];
        prm.mutable_grad() = bk.flat.narrow(0, bk.off[j], prm.numel()).view(prm.sizes());
      }
    }
    for (auto& bk : b) {
      if (bk.work && !error.empty()) {
        try {
          bk.work->wait();  // a started all-reduce must end before its buffer is reused
        } catch (...) {
        }
      }
      bk.work.reset();
    }
    if (!error.empty()) throw kiln::dist_error("all-reduce of gradients: " + error);
  }
};

// Every tensor attribute (parameters and buffers) of m, or only buffers.
std::vector<at::Tensor> state_tensors(kiln_module* m, bool buffers_only) {
  std::vector<at::Tensor> out;
  if (buffers_only) {
    for (const at::Tensor& b : m->m.buffers(/*recurse=*/true)) out.push_back(b.detach());
  } else {
    for (const auto& a : m->m.named_attributes(/*recurse=*/true)) {
      if (a.value.isTensor()) out.push_back(a.value.toTensor().detach());
    }
  }
  return out;
}

// The error for a failed collective (inside a catch block).
kiln_error collective_error(const char* what) noexcept {
  try {
    throw;
  } catch (const std::exception& e) {
    return kiln::make_error(KILN_ERROR_UNAVAILABLE, std::string(what) + ": " + e.what());
  } catch (...) {
    return kiln::make_error(KILN_ERROR_UNAVAILABLE, std::string(what) + ": unknown error");
  }
}

// Synchronized batch norm (torch.nn.SyncBatchNorm's semantics, on the
// CPU and Gloo). In training, a batch-norm layer's statistics are those of
// the whole global batch: each rank sums its batch's values and squares
// per channel (in float64) and counts its values, one all-reduce adds them
// up over the ranks, and every rank normalizes with the global mean and
// biased variance; the running statistics take the global mean and the
// unbiased variance (count N / (N - 1)). Backward goes through the same
// sums: the all-reduce's gradient is the all-reduce (sum) of the ranks'
// gradients, which is SyncBatchNorm's backward (its all-reduced sum_dy and
// sum_dy_xmu are exactly these gradients of the global sums). The weight
// and bias gradients stay per rank, averaged by the gradient buckets as
// every other parameter's.
//
// TorchScript reaches it as kiln.sync_batch_norm(x, weight,
// bias, running_mean, running_var, momentum, eps, group), group being the
// id under which kiln_trainer_set_sync_batchnorm registered the process
// group (the training module's kiln_sync_group attribute).
namespace syncbn {

std::mutex mu;
std::map<int64_t, kiln_pg*> groups;
int64_t next_id = 1;

kiln_pg* lookup(int64_t id) {
  std::lock_guard<std::mutex> l(mu);
  auto it = groups.find(id);
  if (it == groups.end()) {
    throw std::runtime_error("sync_batch_norm: no process group " + std::to_string(id) +
                             " (synchronized batch norm outside a data-parallel trainer)");
  }
  return it->second;
}

// Sums t (contiguous) in place over the group, blocking; a failure is
// recorded for the trainer (kiln::dist_failure) and thrown.
void allreduce_sum(kiln_pg* pg, at::Tensor& t) {
  try {
    pg->allreduce_now(t);
  } catch (const std::exception& e) {
    kiln::dist_failure = std::string("all-reduce of batch-norm statistics: ") + e.what();
    throw kiln::dist_error(kiln::dist_failure);
  }
}

// y = sum over ranks of x, with backward dx = sum over ranks of dy.
struct AllReduceSum : torch::autograd::Function<AllReduceSum> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            int64_t group) {
    ctx->saved_data["group"] = group;
    at::Tensor y = x.detach().clone(at::MemoryFormat::Contiguous);
    allreduce_sum(lookup(group), y);
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor g = grads[0].detach().clone(at::MemoryFormat::Contiguous);
    allreduce_sum(lookup(ctx->saved_data["group"].toInt()), g);
    return {g, at::Tensor()};
  }
};

at::Tensor sync_batch_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, at::Tensor running_mean,
                           at::Tensor running_var, double momentum, double eps, int64_t group) {
  TORCH_CHECK(x.dim() >= 2, "sync_batch_norm: input must be [N, C, ...], got ", x.dim(), " dims");
  const int64_t c = x.size(1);
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); d++) dims.push_back(d);
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = c;
  at::Tensor xd = x.to(at::kDouble);
  at::Tensor local = at::cat({xd.sum(dims), (xd * xd).sum(dims),
                              at::full({1}, static_cast<double>(x.numel() / std::max<int64_t>(c, 1)),
                                       at::TensorOptions().dtype(at::kDouble))});
  at::Tensor global = AllReduceSum::apply(local, group);
  at::Tensor n = global.narrow(0, 2 * c, 1);
  at::Tensor mean = global.narrow(0, 0, c) / n;
  at::Tensor var = (global.narrow(0, c, c) / n - mean * mean).clamp_min(0);
  {
    at::NoGradGuard ng;
    double count = n.item<double>();
    TORCH_CHECK(count > 1, "sync_batch_norm: expected more than 1 value per channel over all ranks in training, got ",
                count);
    if (running_mean.defined()) {
      running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.scalar_type()), momentum);
    }
    if (running_var.defined()) {
      running_var.mul_(1 - momentum)
          .add_((var.detach() * (count / (count - 1))).to(running_var.scalar_type()), momentum);
    }
  }
  at::Tensor invstd = (var + eps).rsqrt();
  at::Tensor scale = invstd.to(x.scalar_type());
  at::Tensor shift = (-mean * invstd).to(x.scalar_type());
  if (weight.has_value() && weight->defined()) {
    scale = scale * *weight;
    shift = shift * *weight;
  }
  if (bias.has_value() && bias->defined()) shift = shift + *bias;
  return x * scale.view(shape) + shift.view(shape);
}

// Resolves `kiln` in TorchScript compiled from C++ to Kiln's operators
// (kiln.sync_batch_norm is kiln::sync_batch_norm), besides `torch`.
struct Resolver : torch::jit::NativeResolver {
  std::shared_ptr<torch::jit::SugaredValue> resolveValue(const std::string& name,
                                                         torch::jit::GraphFunction& m,
                                                         const torch::jit::SourceRange& loc) override {
    if (name == "kiln") return std::make_shared<torch::jit::BuiltinModule>("kiln");
    return torch::jit::NativeResolver::resolveValue(name, m, loc);
  }
};

// Registers pg for the training module's forward; the token unregisters it.
std::shared_ptr<void> register_group(kiln_pg* pg, int64_t* id) {
  std::lock_guard<std::mutex> l(mu);
  int64_t k = next_id++;
  groups[k] = pg;
  *id = k;
  return std::shared_ptr<void>(nullptr, [k](void*) {
    std::lock_guard<std::mutex> l2(mu);
    groups.erase(k);
  });
}

}  // namespace syncbn

}  // namespace

extern "C" {

kiln_error kiln_pg_new(const kiln_pg_options* o, kiln_pg** out) {
  KILN_CHECK_ARG(o != nullptr && out != nullptr, "NULL argument");
  KILN_CHECK_ARG(o->master_addr != nullptr && o->master_addr[0] != '\0', "MASTER_ADDR is empty");
  KILN_CHECK_ARG(o->master_port > 0 && o->master_port < 65536,
                 "MASTER_PORT " + std::to_string(o->master_port) + " outside 1..65535");
  KILN_CHECK_ARG(o->world_size >= 1, "WORLD_SIZE must be >= 1, got " + std::to_string(o->world_size));
  KILN_CHECK_ARG(o->rank >= 0 && o->rank < o->world_size,
                 "RANK " + std::to_string(o->rank) + " outside [0, WORLD_SIZE=" +
                     std::to_string(o->world_size) + ")");
  KILN_CHECK_ARG(o->timeout_ms > 0, "timeout must be > 0");
  const std::string backend = o->backend != nullptr && o->backend[0] != '\0' ? o->backend : "gloo";
  KILN_CHECK_ARG(backend == "gloo" || backend == "nccl",
                 "unknown backend '" + backend + "' (want gloo or nccl)");
  KILN_GUARD_BEGIN
  // Checked before the rendezvous, so that every rank fails at once.
  if (backend == "nccl" && kiln_dist_has_nccl() == 0) {
    return kiln::make_error(KILN_ERROR_UNSUPPORTED, kiln_dist_nccl_unavailable_reason());
  }
  auto p = std::make_unique<kiln_pg>();
  p->rank = o->rank;
  p->world = o->world_size;
  p->timeout = ms(o->timeout_ms);
  p->where = std::string(o->master_addr) + ":" + std::to_string(o->master_port);
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(o->master_port);
    so.isServer = o->host_store != 0;
    so.waitWorkers = false;  // arrivals are checked below, naming the missing ranks
    so.timeout = p->timeout;
    p->tcp = c10::make_intrusive<c10d::TCPStore>(o->master_addr, so);
  } catch (...) {
    return collective_error(("rendezvous: cannot " + std::string(o->host_store ? "host" : "reach") +
                             " the store at " + p->where)
                                .c_str());
  }
  c10::intrusive_ptr<c10d::Store> base = p->tcp;
  if (o->prefix != nullptr && o->prefix[0] != '\0') {
    base = c10::make_intrusive<c10d::PrefixStore>(o->prefix, base);
  }
  p->store = c10::make_intrusive<c10d::PrefixStore>("kiln", base);
  try {
    std::string rk = std::to_string(p->rank);
    if (p->store->add("rank/" + rk, 1) > 1) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT,
                              "rendezvous at " + p->where + ": two processes have RANK=" + rk);
    }
    p->store->set("world/" + rk, bytes(std::to_string(p->world)));
  } catch (...) {
    return collective_error(("rendezvous at " + p->where).c_str());
  }
  try {
    if (kiln_error e = check_arrivals(p.get(), p->world)) return e;
  } catch (...) {
    return collective_error(("rendezvous at " + p->where).c_str());
  }
#ifdef USE_C10D_NCCL
  if (backend == "nccl") {
    try {
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = p->timeout;
      auto pgstore = c10::make_intrusive<c10d::PrefixStore>("pg", p->store);
      p->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(pgstore, p->rank, p->world, opts);
    } catch (...) {
      return collective_error(("creating the NCCL process group (rendezvous " + p->where + ")").c_str());
    }
    *out = p.release();
    return nullptr;
  }
#endif
  try {
    auto opts = c10d::ProcessGroupGloo::Options::create(p->timeout);
    if (o->ifname != nullptr && o->ifname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(o->ifname));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pgstore = c10::make_intrusive<c10d::PrefixStore>("pg", p->store);
    p->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(pgstore, p->rank, p->world, opts);
    auto ctx = std::make_shared<::gloo::rendezvous::Context>(p->rank, p->world);
    ctx->setTimeout(p->timeout);
    c10d::ProcessGroupGloo::GlooStore gs(c10::make_intrusive<c10d::PrefixStore>("direct", p->store));
    ctx->connectFullMesh(gs, opts->devices[0]);
    p->direct = std::move(ctx);
    if (p->world > 1) {
      auto gctx = std::make_shared<::gloo::rendezvous::Context>(p->rank, p->world);
      gctx->setTimeout(p->timeout);  // also each socket's send/receive timeout
      c10d::ProcessGroupGloo::GlooStore gg(c10::make_intrusive<c10d::PrefixStore>("grads", p->store));
      gctx->connectFullMesh(gg, opts->devices[0]);
      for (int r = 0; r < p->world; r++) {
        if (r != p->rank) gctx->getPair(r)->setSync(/*sync=*/true, /*busyPoll=*/false);
      }
      p->grads = std::move(gctx);
    }
  } catch (...) {
    return collective_error(("creating the Gloo process group (rendezvous " + p->where + ")").c_str());
  }
  *out = p.release();
  KILN_GUARD_END
}

int kiln_dist_has_nccl(void) {
#ifdef USE_C10D_NCCL
  try {
    return at::hasCUDA() ? 1 : 0;
  } catch (...) {
    return 0;
  }
#else
  return 0;
#endif
}

const char* kiln_dist_nccl_unavailable_reason(void) {
#ifdef USE_C10D_NCCL
  return "backend nccl: libtorch was built with NCCL but finds no CUDA device; use the gloo backend";
#else
  return "backend nccl: the linked libtorch has no CUDA and no NCCL (a CPU-only build: "
         "ProcessGroupNCCL is compiled only with USE_C10D_NCCL); use the gloo backend";
#endif
}

void kiln_pg_free(kiln_pg* pg) {
  try {
    delete pg;
  } catch (...) {
  }
}

int kiln_pg_rank(const kiln_pg* pg) { return pg == nullptr ? -1 : pg->rank; }
int kiln_pg_world_size(const kiln_pg* pg) { return pg == nullptr ? 0 : pg->world; }

kiln_error kiln_pg_allreduce_f64(kiln_pg* pg, double* v, int64_t n, kiln_reduce_op op) {
  KILN_CHECK_ARG(pg != nullptr && (v != nullptr || n == 0), "NULL argument");
  KILN_CHECK_ARG(n >= 0, "negative length");
  if (n == 0) return nullptr;
  c10d::AllreduceOptions ao;
  switch (op) {
    case KILN_REDUCE_SUM: ao.reduceOp = c10d::ReduceOp::SUM; break;
    case KILN_REDUCE_MAX: ao.reduceOp = c10d::ReduceOp::MAX; break;
    case KILN_REDUCE_MIN: ao.reduceOp = c10d::ReduceOp::MIN; break;
    default:
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT,
                              "unknown reduce op " + std::to_string(static_cast<int>(op)));
  }
  KILN_GUARD_BEGIN
  try {
    std::vector<at::Tensor> ts{at::from_blob(v, {n}, at::kDouble)};
    pg->pg->allreduce(ts, ao)->wait();
  } catch (...) {
    return collective_error("all-reduce");
  }
  KILN_GUARD_END
}

kiln_error kiln_pg_allreduce_tensor(kiln_pg* pg, kiln_tensor* t) {
  KILN_CHECK_ARG(pg != nullptr && t != nullptr, "NULL argument");
  KILN_CHECK_ARG(t->t.is_contiguous(), "all-reduce needs a contiguous tensor");
  KILN_GUARD_BEGIN
  try {
    std::vector<at::Tensor> ts{t->t.detach()};
    pg->pg->allreduce(ts)->wait();
  } catch (...) {
    return collective_error("all-reduce");
  }
  KILN_GUARD_END
}

kiln_error kiln_pg_allgather_i64(kiln_pg* pg, int64_t v, int64_t* out) {
  KILN_CHECK_ARG(pg != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  try {
    std::vector<at::Tensor> in{at::full({1}, v, at::kLong)};
    std::vector<std::vector<at::Tensor>> outs(1);
    for (int r = 0; r < pg->world; r++) outs[0].push_back(at::empty({1}, at::kLong));
    pg->pg->allgather(outs, in)->wait();
    for (int r = 0; r < pg->world; r++) out[r] = outs[0][r].item<int64_t>();
  } catch (...) {
    return collective_error("all-gather");
  }
  KILN_GUARD_END
}

kiln_error kiln_pg_broadcast_module(kiln_pg* pg, kiln_module* m, int buffers_only) {
  KILN_CHECK_ARG(pg != nullptr && m != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  at::NoGradGuard ng;
  std::vector<at::Tensor> ts = state_tensors(m, buffers_only != 0);
  try {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (at::Tensor& t : ts) {
      if (!t.is_contiguous()) {
        return kiln::make_error("broadcast: a module tensor is not contiguous");
      }
      std::vector<at::Tensor> one{t};
      works.push_back(pg->pg->broadcast(one));
    }
    for (auto& w : works) w->wait();
  } catch (...) {
    return collective_error("broadcast from rank 0");
  }
  KILN_GUARD_END
}

kiln_error kiln_pg_barrier(kiln_pg* pg) {
  KILN_CHECK_ARG(pg != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  try {
    pg->pg->barrier()->wait();
  } catch (...) {
    return collective_error("barrier");
  }
  KILN_GUARD_END
}

kiln_error kiln_pg_alive(kiln_pg* pg, const char* tag, int64_t wait_ms, int* alive) {
  KILN_CHECK_ARG(pg != nullptr && tag != nullptr && alive != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  for (int r = 0; r < pg->world; r++) alive[r] = r == pg->rank;
  try {
    std::string base = std::string("alive/") + tag + "/";
    pg->store->set(base + std::to_string(pg->rank), bytes("1"));
    auto deadline = std::chrono::steady_clock::now() + ms(std::max<int64_t>(wait_ms, 0));
    for (;;) {
      bool all = true;
      for (int r = 0; r < pg->world; r++) {
        if (!alive[r]) alive[r] = pg->store->check({base + std::to_string(r)}) ? 1 : 0;
        all = all && alive[r];
      }
      if (all || std::chrono::steady_clock::now() >= deadline) break;
      std::this_thread::sleep_for(ms(50));
    }
  } catch (...) {
    return collective_error("the rendezvous store");
  }
  KILN_GUARD_END
}

kiln_error kiln_trainer_set_group(kiln_trainer* t, kiln_pg* pg, int64_t bucket_bytes) {
  KILN_CHECK_ARG(t != nullptr, "NULL trainer");
  KILN_CHECK_ARG(pg == nullptr || bucket_bytes > 0, "bucket size must be > 0");
  KILN_GUARD_BEGIN
  if (pg == nullptr) {
    t->reduce_grads = nullptr;
    t->before_backward = nullptr;  // releases the buckets, removing their hooks
    return nullptr;
  }
  auto bk = std::make_shared<Buckets>(t->params, bucket_bytes, pg);
  std::weak_ptr<Buckets> weak = bk;
  for (size_t k = 0; k < t->params.size(); k++) {
    bk->hooks.push_back(t->params[k].register_hook([weak, k](const at::Tensor& g) {
      if (auto b = weak.lock()) b->take(k, g);  // the gradient itself is unchanged
    }));
  }
  t->before_backward = [bk](kiln_trainer*) { bk->prepare(); };
  t->reduce_grads = [bk](kiln_trainer* tr) { bk->finish(tr); };
  KILN_GUARD_END
}

kiln_error kiln_trainer_set_sync_batchnorm(kiln_trainer* t, kiln_pg* pg, const char* source) {
  KILN_CHECK_ARG(t != nullptr, "NULL trainer");
  KILN_CHECK_ARG(pg == nullptr || (source != nullptr && source[0] != '\0'),
                 "synchronized batch norm needs the training forward's source");
  KILN_GUARD_BEGIN
  if (pg == nullptr) {
    t->train_m.reset();
    t->sync_token.reset();
    return nullptr;
  }
  // A module of its own class (a fresh compilation unit) over the very
  // tensors of t's module: what its optimizer updates, this one reads.
  auto tm = std::make_shared<torch::jit::Module>(c10::QualifiedName("__torch__.kiln.SyncBatchNormNet"));
  const c10::ClassTypePtr& type = t->m.type();
  for (size_t i = 0; i < type->numAttributes(); i++) {
    const std::string& name = type->getAttributeName(i);
    c10::IValue v = t->m._ivalue()->getSlot(i);
    if (name == "training") continue;
    if (!v.isTensor()) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT,
                              "synchronized batch norm: the network's attribute '" + name +
                                  "' is not a tensor (only flat Kiln networks are supported)");
    }
    tm->register_parameter(name, v.toTensor(), /*is_buffer=*/!type->is_parameter(i));
  }
  tm->register_attribute("training", c10::BoolType::get(), true);
  int64_t id = 0;
  std::shared_ptr<void> token = syncbn::register_group(pg, &id);
  tm->register_attribute("kiln_sync_group", c10::IntType::get(), id);
  try {
    tm->define(source, std::make_shared<syncbn::Resolver>());
  } catch (const std::exception& e) {
    return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT,
                            std::string("synchronized batch norm: compiling the training forward: ") + e.what());
  }
  t->train_m = std::move(tm);
  t->sync_token = std::move(token);
  KILN_GUARD_END
}

}  // extern "C"

TORCH_LIBRARY(kiln, m) {
  m.def(
      "sync_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, float momentum, float eps, int group) -> Tensor",
      &syncbn::sync_batch_norm);
}
