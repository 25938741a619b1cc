package native

/*
#include <stdlib.h>
#include "kiln.h"
*/
import "C"

import "unsafe"

// CheckDevice parses and checks a device name as PyTorch spells it: "cpu",
// "cuda" or "cuda:N". It returns the GPU index (-1 for the CPU). The error
// is InvalidArgument for another spelling, Unsupported when the linked
// libtorch has no CUDA and Unavailable when there is no such GPU.
func CheckDevice(spec string) (int, error) {
	cs := C.CString(spec)
	defer C.free(unsafe.Pointer(cs))
	var idx C.int
	if err := takeErr(C.kiln_device_check(cs, &idx)); err != nil {
		return 0, err
	}
	return int(idx), nil
}

// CUDACompiled reports whether the linked libtorch was built with CUDA.
func CUDACompiled() bool { return C.kiln_cuda_compiled() != 0 }

// CUDADeviceCount returns the number of usable CUDA GPUs (0 without CUDA).
func CUDADeviceCount() int { return int(C.kiln_cuda_device_count()) }

// CUDAMemory returns the bytes held on GPU index by libtorch's CUDA caching
// allocator: in live tensors, and reserved from the driver.
func CUDAMemory(index int) (allocated, reserved int64, err error) {
	var a, r C.int64_t
	if err := takeErr(C.kiln_cuda_memory(C.int(index), &a, &r)); err != nil {
		return 0, 0, err
	}
	return int64(a), int64(r), nil
}

// To moves the module's parameters and buffers to device spec (see
// CheckDevice). Forward then takes and returns CPU tensors and copies
// them to and from the device itself.
func (m Module) To(spec string) error {
	cs := C.CString(spec)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_module_to(m.p, cs))
}

// Device returns the device the module is on: "cpu" or "cuda:N".
func (m Module) Device() (string, error) {
	var s *C.char
	if err := takeErr(C.kiln_module_device(m.p, &s)); err != nil {
		return "", err
	}
	return takeString(s), nil
}

// GPUStat is one GPU as NVIDIA's management library (NVML) reports it:
// the whole device, every process's use included.
type GPUStat struct {
	UUID        string  // "GPU-..."
	Index       int     // NVML's index (PCI order)
	Utilization float64 // busy fraction of the last sample period, [0, 1]
	MemoryTotal uint64  // bytes
	MemoryUsed  uint64  // bytes
}

// maxGPUs bounds the GPUs GPUStats reports.
const maxGPUs = 64

// GPUStats reads every GPU's utilisation and memory through NVML, which
// it opens at run time from NVIDIA's driver (libnvidia-ml.so.1): without
// the driver the error is Unavailable.
func GPUStats() ([]GPUStat, error) {
	buf := (*C.kiln_gpu_stats)(C.malloc(C.size_t(maxGPUs) * C.size_t(unsafe.Sizeof(C.kiln_gpu_stats{}))))
	if buf == nil {
		return nil, &Error{Code: OutOfMemory, Message: "out of memory"}
	}
	defer C.free(unsafe.Pointer(buf))
	var n C.int
	if err := takeErr(C.kiln_gpu_stats_read(buf, maxGPUs, &n)); err != nil {
		return nil, err
	}
	out := make([]GPUStat, 0, int(n))
	for _, s := range unsafe.Slice(buf, int(n)) {
		out = append(out, GPUStat{
			UUID: C.GoString(&s.uuid[0]), Index: int(s.index), Utilization: float64(s.utilization),
			MemoryTotal: uint64(s.memory_total), MemoryUsed: uint64(s.memory_used),
		})
	}
	return out, nil
}
