// device.cc — devices: names, CUDA availability, modules placed on a GPU.
//
// The same source builds against a CPU-only libtorch (Debian's 1.13) and
// against one with CUDA (a pip torch). What needs CUDA's own headers (the
// module's CUDA stream, the caching allocator's statistics) is compiled
// only with KILN_WITH_CUDA, which scripts/env.sh defines when the libtorch
// it points at has lib/libtorch_cuda.so. Everything else uses libtorch's
// device-generic API, which answers "no CUDA" at run time on a CPU build.
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <dlfcn.h>

#include <limits>
#include <string>

#ifdef KILN_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "internal.h"

namespace kiln {
namespace {

// Whether the linked libtorch has CUDA: compiled in (KILN_WITH_CUDA), or
// its libtorch_cuda.so loaded into this process with libtorch (a pip
// torch's libtorch.so depends on it even when Kiln was built without the
// define).
bool cuda_compiled() {
#ifdef KILN_WITH_CUDA
  return true;
#else
  static const bool loaded = [] {
    void* h = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    if (h == nullptr) return false;
    dlclose(h);
    return true;
  }();
  return loaded;
#endif
}

const int kMaxIndex = std::numeric_limits<c10::DeviceIndex>::max();

// Parses "cpu", "cuda" or "cuda:N" into an index (-1 for the CPU).
kiln_error parse_device(const std::string& s, int* index) {
  if (s == "cpu") {
    *index = -1;
    return nullptr;
  }
  if (s == "cuda") {
    *index = 0;
    return nullptr;
  }
  const std::string prefix = "cuda:";
  if (s.size() > prefix.size() && s.compare(0, prefix.size(), prefix) == 0 &&
      s.size() - prefix.size() <= 3) {
    int n = 0;
    bool digits = true;
    for (size_t i = prefix.size(); i < s.size(); i++) {
      if (s[i] < '0' || s[i] > '9') {
        digits = false;
        break;
      }
      n = n * 10 + (s[i] - '0');
    }
    if (digits && n <= kMaxIndex) {
      *index = n;
      return nullptr;
    }
  }
  return make_error(KILN_ERROR_INVALID_ARGUMENT,
                    "device \"" + s + "\": want cpu, cuda or cuda:N (N a GPU index, 0 to " +
                        std::to_string(kMaxIndex) + ")");
}

// Whether GPU index can be used now, as an error naming spec.
kiln_error check_cuda(int index, const std::string& spec) {
  if (!cuda_compiled()) {
    return make_error(KILN_ERROR_UNSUPPORTED,
                      "device " + spec + ": this libtorch (" + TORCH_VERSION +
                          ") has no CUDA; build Kiln against a libtorch with CUDA "
                          "(LIBTORCH=<a pip torch with CUDA>, see README) to run on a GPU");
  }
  int n = static_cast<int>(torch::cuda::device_count());
  if (n == 0) {
    return make_error(KILN_ERROR_UNAVAILABLE,
                      "device " + spec + ": no CUDA GPU present (this libtorch has CUDA, "
                                         "but no device or driver was found)");
  }
  if (index >= n) {
    return make_error(KILN_ERROR_UNAVAILABLE,
                      "device " + spec + ": no GPU " + std::to_string(index) + " (" +
                          std::to_string(n) + " present: cuda:0 to cuda:" +
                          std::to_string(n - 1) + ")");
  }
  return nullptr;
}

}  // namespace

std::vector<at::Tensor> forward_on_device(kiln_module* m, const std::vector<at::Tensor>& inputs) {
#ifdef KILN_WITH_CUDA
  auto* stream = static_cast<c10::cuda::CUDAStream*>(m->stream.get());
  c10::cuda::CUDAStreamGuard stream_guard(*stream);  // also selects the device
#else
  c10::DeviceGuard device_guard(m->device);
#endif
  c10::InferenceMode mode;
  std::vector<c10::IValue> args;
  args.reserve(inputs.size());
  for (const at::Tensor& t : inputs) {
    // Host → device from pinned memory, asynchronously on the module's
    // stream (the caching host allocator keeps the pinned block until the
    // copy is done). A caller's tensor already on the device is used as is.
    at::Tensor h = t;
    if (h.device().is_cpu() && !h.is_pinned()) h = h.pin_memory();
    args.emplace_back(h.to(m->device, /*non_blocking=*/true));
  }
  c10::IValue r = m->m.forward(std::move(args));
  std::vector<at::Tensor> on_device;
  flatten(r, &on_device);
  std::vector<at::Tensor> out;
  out.reserve(on_device.size());
  // Device → host; a blocking copy, which waits for the module's stream.
  for (const at::Tensor& t : on_device) out.push_back(t.to(at::kCPU));
  return out;
}

}  // namespace kiln

extern "C" {

kiln_error kiln_device_check(const char* spec, int* index) {
  KILN_CHECK_ARG(spec != nullptr, "device is NULL");
  KILN_GUARD_BEGIN
  int i = -1;
  if (kiln_error e = kiln::parse_device(spec, &i)) return e;
  if (i >= 0) {
    if (kiln_error e = kiln::check_cuda(i, spec)) return e;
  }
  if (index != nullptr) *index = i;
  KILN_GUARD_END
}

int kiln_cuda_compiled(void) {
  try {
    return kiln::cuda_compiled() ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

int kiln_cuda_device_count(void) {
  try {
    if (!kiln::cuda_compiled()) return 0;
    return static_cast<int>(torch::cuda::device_count());
  } catch (...) {
    return 0;
  }
}

kiln_error kiln_module_to(kiln_module* m, const char* spec) {
  KILN_CHECK_ARG(m != nullptr && spec != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  int index = -1;
  if (kiln_error e = kiln::parse_device(spec, &index)) return e;
  if (index < 0) {
    m->m.to(at::kCPU);
    m->device = c10::Device(c10::kCPU);
#ifdef KILN_WITH_CUDA
    m->stream.reset();
#endif
    return nullptr;
  }
  if (kiln_error e = kiln::check_cuda(index, spec)) return e;
  c10::Device d(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
#ifdef KILN_WITH_CUDA
  auto stream = std::make_shared<c10::cuda::CUDAStream>(
      c10::cuda::getStreamFromPool(/*isHighPriority=*/false, d.index()));
#endif
  m->m.to(d);
  m->device = d;
#ifdef KILN_WITH_CUDA
  m->stream = std::move(stream);
#endif
  KILN_GUARD_END
}

kiln_error kiln_module_device(kiln_module* m, char** out) {
  KILN_CHECK_ARG(m != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  std::string s = m->device.is_cuda() ? "cuda:" + std::to_string(m->device.index()) : "cpu";
  *out = kiln::dup_string(s);
  if (*out == nullptr) return kiln::make_error(KILN_ERROR_OUT_OF_MEMORY, "out of memory");
  KILN_GUARD_END
}

kiln_error kiln_cuda_memory(int index, int64_t* allocated, int64_t* reserved) {
  KILN_CHECK_ARG(allocated != nullptr && reserved != nullptr, "NULL argument");
  KILN_CHECK_ARG(index >= 0 && index <= kiln::kMaxIndex, "GPU index out of range");
  KILN_GUARD_BEGIN
  std::string spec = "cuda:" + std::to_string(index);
  if (kiln_error e = kiln::check_cuda(index, spec)) return e;
#ifdef KILN_WITH_CUDA
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
      static_cast<c10::DeviceIndex>(index));
  const size_t all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  *allocated = stats.allocated_bytes[all].current;
  *reserved = stats.reserved_bytes[all].current;
  return nullptr;
#else
  return kiln::make_error(KILN_ERROR_UNSUPPORTED,
                          spec + ": Kiln was built without KILN_WITH_CUDA, so it cannot read "
                                 "the CUDA caching allocator's statistics");
#endif
  KILN_GUARD_END
}

}  // extern "C"

// ---- NVML ---------------------------------------------------------------
//
// The few NVML entry points Kiln uses, declared from NVML's C API
// (nvml.h, https://docs.nvidia.com/deploy/nvml-api/) and looked up with
// dlsym in the driver's libnvidia-ml.so.1, so no SDK is needed to build.

namespace kiln {
namespace {

using nvml_return = int;  // nvmlReturn_t; 0 is NVML_SUCCESS
using nvml_device = void*;
struct nvml_utilization {
  unsigned int gpu, memory;
};
struct nvml_memory {
  unsigned long long total, free, used;
};

struct nvml_api {
  bool ok = false;
  std::string why;
  nvml_return (*get_count)(unsigned int*) = nullptr;
  nvml_return (*get_handle)(unsigned int, nvml_device*) = nullptr;
  nvml_return (*get_utilization)(nvml_device, nvml_utilization*) = nullptr;
  nvml_return (*get_memory)(nvml_device, nvml_memory*) = nullptr;
  nvml_return (*get_uuid)(nvml_device, char*, unsigned int) = nullptr;
};

template <typename F>
bool lookup(void* lib, const char* name, F* f) {
  *f = reinterpret_cast<F>(dlsym(lib, name));
  return *f != nullptr;
}

const nvml_api& nvml() {
  static const nvml_api api = [] {
    nvml_api a;
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (lib == nullptr) {
      a.why = "NVML (libnvidia-ml.so.1, part of NVIDIA's driver) is not installed";
      return a;
    }
    nvml_return (*init)() = nullptr;
    if (!lookup(lib, "nvmlInit_v2", &init) || !lookup(lib, "nvmlDeviceGetCount_v2", &a.get_count) ||
        !lookup(lib, "nvmlDeviceGetHandleByIndex_v2", &a.get_handle) ||
        !lookup(lib, "nvmlDeviceGetUtilizationRates", &a.get_utilization) ||
        !lookup(lib, "nvmlDeviceGetMemoryInfo", &a.get_memory) ||
        !lookup(lib, "nvmlDeviceGetUUID", &a.get_uuid)) {
      a.why = "libnvidia-ml.so.1 lacks an NVML function Kiln uses";
      return a;
    }
    if (nvml_return r = init(); r != 0) {
      a.why = "nvmlInit_v2 failed with NVML error " + std::to_string(r);
      return a;
    }
    a.ok = true;
    return a;
  }();
  return api;
}

}  // namespace
}  // namespace kiln

extern "C" kiln_error kiln_gpu_stats_read(kiln_gpu_stats* out, int cap, int* n) {
  KILN_CHECK_ARG(n != nullptr && cap >= 0 && (cap == 0 || out != nullptr), "bad arguments");
  KILN_GUARD_BEGIN
  const kiln::nvml_api& api = kiln::nvml();
  if (!api.ok) return kiln::make_error(KILN_ERROR_UNAVAILABLE, api.why);
  unsigned int count = 0;
  if (kiln::nvml_return r = api.get_count(&count); r != 0) {
    return kiln::make_error(KILN_ERROR_UNAVAILABLE, "nvmlDeviceGetCount_v2: NVML error " + std::to_string(r));
  }
  int made = 0;
  for (unsigned int i = 0; i < count && made < cap; i++) {
    kiln::nvml_device d = nullptr;
    kiln::nvml_utilization u{};
    kiln::nvml_memory m{};
    kiln_gpu_stats& s = out[made];
    std::memset(&s, 0, sizeof s);
    if (api.get_handle(i, &d) != 0 || api.get_uuid(d, s.uuid, sizeof s.uuid) != 0) continue;
    s.uuid[sizeof s.uuid - 1] = '\0';
    s.index = static_cast<int>(i);
    if (api.get_utilization(d, &u) == 0) s.utilization = u.gpu / 100.0;
    if (api.get_memory(d, &m) == 0) {
      s.memory_total = m.total;
      s.memory_used = m.used;
    }
    made++;
  }
  *n = made;
  KILN_GUARD_END
}
