/*
 * kiln_optimize.h — Kiln's C ABI for optimizing built networks: reading and
 * writing named tensors of a module, quantized engines, and registering
 * int8 packed Linear weights as module attributes.
 *
 * An extension of kiln.h (whose rules apply unchanged: no C++ exception
 * escapes, errors carry a code and are freed with kiln_error_free, every
 * handle has one owner). It lives in its own cgo package so that its C++
 * compiles apart from the inference core and the trainer.
 */
#ifndef KILN_OPTIMIZE_H
#define KILN_OPTIMIZE_H

#include "../kiln.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The quantized engines this libtorch supports, comma separated in
 * libtorch's order (e.g. "qnnpack,onednn"), excluding "none". The caller
 * frees *out with kiln_string_free. */
kiln_error kiln_opt_qengines(char** out);

/* The quantized engine in use for this process (e.g. "onednn"). */
kiln_error kiln_opt_qengine(char** out);

/* Selects the process-wide quantized engine; an engine this libtorch does
 * not support is an error naming the supported ones. */
kiln_error kiln_opt_set_qengine(const char* engine);

/* A copy (detached, contiguous) of the tensor attribute `name` of m: a
 * parameter or a buffer. The caller owns *out. */
kiln_error kiln_opt_get(kiln_module* m, const char* name, kiln_tensor** out);

/* Copies value into the existing tensor attribute `name` of m in place;
 * the shapes must be equal (dtype is converted). */
kiln_error kiln_opt_set(kiln_module* m, const char* name,
                        const kiln_tensor* value);

/* Quantizes weight (float, [out, in]) to qint8 per tensor, symmetrically
 * (zero point 0, scale max|w|/127.5: PyTorch's default dynamic weight
 * observer), packs it with bias (may be NULL) for the current quantized
 * engine (quantized::linear_prepack) and registers the packed parameters
 * as attribute `name` of m (TorchScript type
 * __torch__.torch.classes.quantized.LinearPackedParamsBase). The module
 * then saves and loads like any TorchScript module. *scale receives the
 * weight scale. */
kiln_error kiln_opt_add_linear_int8(kiln_module* m, const char* name,
                                    const kiln_tensor* weight,
                                    const kiln_tensor* bias, double* scale);

/* Quantizes weight (float) of a linear ([out, in]), conv1d ([out, in, k])
 * or conv2d ([out, in, kh, kw]) layer (kind "linear", "conv1d" or
 * "conv2d") to symmetric qint8 (zero point 0, scale max|w|/127.5 as
 * PyTorch's symmetric weight observers compute it), per output channel
 * when per_channel is nonzero, else per tensor; packs it with bias (may be
 * NULL) for the current quantized engine (quantized::linear_prepack,
 * conv1d_prepack, conv2d_prepack with the given stride and padding,
 * dilation 1, groups 1) and registers the packed parameters as attribute
 * `name` of m, for static int8 forwards (quantized::linear,
 * quantized::conv2d, ...). *weight_bytes receives the int8 weight's
 * element count. */
kiln_error kiln_opt_add_packed_int8(kiln_module* m, const char* name,
                                    const char* kind,
                                    const kiln_tensor* weight,
                                    const kiln_tensor* bias, int per_channel,
                                    int64_t stride, int64_t padding,
                                    int64_t* weight_bytes);

/* Compiles TorchScript methods into m's class, like kiln_nn_define, with
 * the quantized operators in scope as `quantized` (e.g.
 * quantized.linear_dynamic(x, self.l0_packed)). */
kiln_error kiln_opt_define(kiln_module* m, const char* source);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* KILN_OPTIMIZE_H */
