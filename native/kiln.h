/*
 * kiln.h — Kiln's flat C ABI over libtorch.
 *
 * C++ lives behind this header; only C crosses it. Rules every entry point
 * follows:
 *
 *   - No C++ exception escapes. A function that can fail returns a kiln_error:
 *     NULL on success, otherwise an error the caller owns and frees with
 *     kiln_error_free, holding a kiln_error_code_t and a message (libtorch's,
 *     or Kiln's own). Modeled on Triton's TRITONSERVER_Error.
 *   - Results come back through out-parameters, written only on success.
 *   - Every handle (kiln_tensor, kiln_module) has one owner and is released
 *     with its *_free function. Freeing NULL is a no-op.
 *   - Memory kept by libtorch after a call is C memory: buffers handed to
 *     kiln_tensor_from_blob must not live on a garbage-collected heap.
 */
#ifndef KILN_NATIVE_H
#define KILN_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What kind of failure an error is. Values are stable; they follow
 * Triton's TRITONSERVER_Error_Code and gRPC's status codes, which is where
 * the serving layer maps them (serving/status). */
typedef enum {
  KILN_ERROR_UNKNOWN = 0,           /* unclassified */
  KILN_ERROR_INTERNAL = 1,          /* a bug or broken invariant in Kiln or libtorch */
  KILN_ERROR_NOT_FOUND = 2,         /* a file, model, version or name does not exist */
  KILN_ERROR_INVALID_ARGUMENT = 3,  /* the caller's arguments or data are wrong */
  KILN_ERROR_UNAVAILABLE = 4,       /* not ready now; retrying later may work */
  KILN_ERROR_UNSUPPORTED = 5,       /* not implemented by Kiln or this libtorch */
  KILN_ERROR_ALREADY_EXISTS = 6,    /* the thing to create exists */
  KILN_ERROR_CANCELLED = 7,         /* the caller cancelled */
  KILN_ERROR_OUT_OF_MEMORY = 8,     /* an allocation failed */
  KILN_ERROR_FAILED_PRECONDITION = 9, /* the system is not in the state the call needs */
  KILN_ERROR_RESOURCE_EXHAUSTED = 10, /* a quota or queue is full (not memory) */
  KILN_ERROR_DEADLINE_EXCEEDED = 11,  /* the caller's deadline passed */
} kiln_error_code_t;

/* An error owned by the caller (opaque); NULL means success. */
typedef struct kiln_error_s* kiln_error;

/* The error's code (KILN_ERROR_UNKNOWN for NULL). */
kiln_error_code_t kiln_error_code(kiln_error err);

/* The error's message, valid until kiln_error_free; never NULL ("" for
 * NULL). */
const char* kiln_error_message(kiln_error err);

/* Frees an error returned by any kiln_* function. Freeing NULL is a no-op. */
void kiln_error_free(kiln_error err);

/* Element types. Values are Kiln's own and stable across libtorch versions. */
typedef enum {
  KILN_FLOAT32 = 0,
  KILN_FLOAT64 = 1,
  KILN_INT64 = 2,
  KILN_INT32 = 3,
  KILN_INT8 = 4,
  KILN_UINT8 = 5,
  KILN_BOOL = 6,
  KILN_FLOAT16 = 7,
  KILN_BFLOAT16 = 8,
  KILN_INT16 = 9,
} kiln_dtype;

/* Opaque handles. */
typedef struct kiln_tensor kiln_tensor;
typedef struct kiln_module kiln_module;

/* ---- library ---------------------------------------------------------- */

/* The libtorch version this library was compiled against, e.g. "1.13.0".
 * Static storage; do not free. */
const char* kiln_torch_version(void);

/* Intra-op thread count (at::set_num_threads / at::get_num_threads). */
kiln_error kiln_set_num_threads(int n);
int kiln_get_num_threads(void);

/* Inter-op thread count; can only be set once, before any inter-op work. */
kiln_error kiln_set_num_interop_threads(int n);
int kiln_get_num_interop_threads(void);

/* Seeds libtorch's default CPU generator. */
void kiln_manual_seed(uint64_t seed);

/* Returns x + 1 and touches nothing else: the cheapest possible call, used
 * to measure the cost of crossing the cgo boundary. */
int kiln_noop(int x);

/* ---- tensors ---------------------------------------------------------- */

/* Called by libtorch when the last reference to a from_blob storage dies,
 * from whichever thread drops it. */
typedef void (*kiln_release_fn)(void* ctx);

/* Wraps an existing buffer without copying. shape has ndim entries; strides
 * may be NULL (contiguous) or ndim entries in elements. release (may be NULL)
 * is called with ctx exactly once when the tensor and every view of it are
 * gone. On error, release is NOT called: the caller still owns the buffer. */
kiln_error kiln_tensor_from_blob(void* data, kiln_dtype dtype,
                                 const int64_t* shape, int ndim,
                                 const int64_t* strides,
                                 kiln_release_fn release, void* ctx,
                                 kiln_tensor** out);

/* Creates a contiguous tensor owning a copy of nbytes at data; nbytes must
 * equal numel * element size. data may be NULL only when nbytes is 0. */
kiln_error kiln_tensor_from_copy(const void* data, size_t nbytes,
                                 kiln_dtype dtype, const int64_t* shape,
                                 int ndim, kiln_tensor** out);

/* Creates a zero-filled contiguous tensor. */
kiln_error kiln_tensor_zeros(kiln_dtype dtype, const int64_t* shape, int ndim,
                             kiln_tensor** out);

/* Releases a tensor handle (the storage lives on while views hold it). */
void kiln_tensor_free(kiln_tensor* t);

/* Metadata. dtype fails for element types Kiln does not map. */
kiln_error kiln_tensor_dtype(const kiln_tensor* t, kiln_dtype* out);
int kiln_tensor_ndim(const kiln_tensor* t);
/* Copies min(ndim, cap) sizes/strides into out; returns ndim. */
int kiln_tensor_shape(const kiln_tensor* t, int64_t* out, int cap);
int kiln_tensor_strides(const kiln_tensor* t, int64_t* out, int cap);
int64_t kiln_tensor_numel(const kiln_tensor* t);
int kiln_tensor_is_contiguous(const kiln_tensor* t);

/* Pointer to the first element; fails unless the tensor is contiguous and
 * on the CPU. Valid while the tensor (or a view sharing its storage) lives. */
kiln_error kiln_tensor_data_ptr(const kiln_tensor* t, void** out);

/* A contiguous tensor with the same values: a new handle to the same storage
 * when t is already contiguous, a copy otherwise. */
kiln_error kiln_tensor_contiguous(const kiln_tensor* t, kiln_tensor** out);

/* Converts to another element type (a new tensor). */
kiln_error kiln_tensor_to_dtype(const kiln_tensor* t, kiln_dtype dtype,
                                kiln_tensor** out);

/* The number of kiln_tensor handles alive now: made by any kiln_* function
 * (this header's, kiln_train.h's, kiln_optimize.h's) and not yet released
 * with kiln_tensor_free. Each handle is one libtorch tensor reference owned
 * by Kiln's caller; views of one storage count once per handle. Never
 * fails; safe to call from any thread. */
int64_t kiln_tensor_live_count(void);

/* ---- TorchScript modules ---------------------------------------------- */

/* Loads a TorchScript archive on the CPU and puts it in eval mode. */
kiln_error kiln_module_load(const char* path, kiln_module** out);
kiln_error kiln_module_load_bytes(const void* data, size_t n,
                                  kiln_module** out);
void kiln_module_free(kiln_module* m);

/* Saves the module as a TorchScript archive that torch.jit.load reads. */
kiln_error kiln_module_save(kiln_module* m, const char* path);

/* Switches training mode (train != 0) or eval mode (train == 0). */
kiln_error kiln_module_set_train(kiln_module* m, int train);

/* Replaces a CPU module by its frozen, inference-optimized form, as
 * torch.jit.optimize_for_inference(torch.jit.freeze(m.eval())) does:
 * parameters and attributes become constants, convolutions run on oneDNN
 * with weights reordered once (and batch norms are folded into them),
 * linear layers keep pre-transposed weights. Only forward is kept, the
 * module is in eval mode, and it can no longer be trained or saved as the
 * original. Outputs may differ from the original's by float rounding
 * (oneDNN's kernels against im2col + BLAS). On error (a CUDA module:
 * INVALID_ARGUMENT; a module freezing or an optimization pass refuses)
 * the module is left as it was. */
kiln_error kiln_module_optimize_for_inference(kiln_module* m);

/* Runs forward with n input tensors under inference mode (no autograd
 * graph). The result may be a tensor, or a tuple/list of tensors (nested
 * ones flattened in order). On success *outs is a malloc'd array of *nouts
 * new tensor handles; the caller frees each handle and then the array with
 * kiln_tensor_array_free (which does not free the handles). */
kiln_error kiln_module_forward(kiln_module* m, kiln_tensor* const* inputs,
                               int n, kiln_tensor*** outs, int* nouts);
void kiln_tensor_array_free(kiln_tensor** arr);

/* kiln_module_forward for small calls whose output dtypes and shapes the
 * caller already knows, in one crossing: the n_in inputs borrow the
 * caller's C-contiguous memory at the addresses in_data (no copy, no
 * handle), forward runs under
 * inference mode, and each of the n_out outputs is copied into the
 * caller's buffer at address out_data[i] when its dtype and shape equal the expected
 * ones. desc describes every tensor, inputs first, then outputs:
 * dtype code, ndim (0..KILN_FORWARD_INTO_MAX_DIMS), dims... *status is
 * KILN_FORWARD_INTO_DONE (outputs written), _MISMATCH (the output count,
 * an output's dtype or shape differs, or it is not contiguous) or
 * _ALIASED (an output shares memory with an input); nothing is written
 * unless DONE. Errors: INVALID_ARGUMENT for a bad descriptor or inputs the
 * model rejects. desc_len is desc's length in int64s. */
#define KILN_FORWARD_INTO_MAX_DIMS 16
#define KILN_FORWARD_INTO_DONE 0
#define KILN_FORWARD_INTO_MISMATCH 1
#define KILN_FORWARD_INTO_ALIASED 2
kiln_error kiln_module_forward_into(kiln_module* m, const int64_t* desc,
                                    int desc_len, int n_in,
                                    const uintptr_t* in_data, int n_out,
                                    const uintptr_t* out_data, int* status);

/* The forward method's schema, e.g.
 * "forward(__torch__.Net self, Tensor x) -> Tensor", and its arguments
 * (self excluded). Returned strings are malloc'd; free with kiln_string_free. */
kiln_error kiln_module_schema(kiln_module* m, char** out);
kiln_error kiln_module_num_inputs(kiln_module* m, int* out);
kiln_error kiln_module_input(kiln_module* m, int i, char** name, char** type);
kiln_error kiln_module_output_type(kiln_module* m, char** type);
void kiln_string_free(char* s);

/* Number of parameters and their total bytes. */
kiln_error kiln_module_param_stats(kiln_module* m, int64_t* count,
                                   int64_t* bytes);

/* ---- devices ----------------------------------------------------------
 *
 * A device is named as PyTorch names it: "cpu", "cuda" (the first GPU) or
 * "cuda:N" (GPU N, counted from 0). Kiln runs modules on the CPU unless one
 * is moved with kiln_module_to. Whether CUDA can be used depends on the
 * linked libtorch (Debian's libtorch 1.13 has none; a pip torch's has) and
 * on a GPU and driver being present. */

/* Parses and checks spec. On success *index is -1 for "cpu" and N for
 * "cuda"/"cuda:N" ("cuda" is 0). Errors: INVALID_ARGUMENT for a spec that
 * is not cpu, cuda or cuda:N; UNSUPPORTED when spec names a GPU and the
 * linked libtorch has no CUDA; UNAVAILABLE when it has CUDA but there is no
 * such GPU (none present, or N >= the number present). Both messages name
 * the device. index may be NULL. */
kiln_error kiln_device_check(const char* spec, int* index);

/* Whether the linked libtorch was built with CUDA (1) or not (0). */
int kiln_cuda_compiled(void);

/* The number of CUDA GPUs usable now (0 without CUDA or without a GPU). */
int kiln_cuda_device_count(void);

/* Moves the module's parameters and buffers to device spec (checked as by
 * kiln_device_check) once; kiln_module_forward then copies its inputs to
 * that device (through pinned host memory, on a CUDA stream of the
 * module's own) and its outputs back to the CPU, so callers keep passing
 * and receiving CPU tensors. Out of device memory is OUT_OF_MEMORY. */
kiln_error kiln_module_to(kiln_module* m, const char* spec);

/* The device the module is on ("cpu", "cuda:0", ...); malloc'd, free with
 * kiln_string_free. */
kiln_error kiln_module_device(kiln_module* m, char** out);

/* Memory held on GPU index by libtorch's CUDA caching allocator: bytes in
 * live tensors and bytes reserved from the driver. UNSUPPORTED without
 * CUDA; UNAVAILABLE for a GPU that is not present. */
kiln_error kiln_cuda_memory(int index, int64_t* allocated, int64_t* reserved);

/* One GPU as NVIDIA's management library (NVML) reports it: the whole
 * device, every process's use included (Triton's nv_gpu_* metrics). */
typedef struct {
  char uuid[96];             /* "GPU-..." */
  int index;                 /* NVML's index (PCI order, not CUDA_VISIBLE_DEVICES') */
  double utilization;        /* busy fraction of the last sample period, [0, 1] */
  uint64_t memory_total;     /* bytes */
  uint64_t memory_used;      /* bytes */
} kiln_gpu_stats;

/* Reads up to cap GPUs' statistics into out and their number into *n.
 * NVML (libnvidia-ml.so.1, installed with NVIDIA's driver) is opened at
 * run time, so a machine without the driver gets UNAVAILABLE and Kiln
 * builds without CUDA's SDK. */
kiln_error kiln_gpu_stats_read(kiln_gpu_stats* out, int cap, int* n);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* KILN_NATIVE_H */
