package core

import (
	"fmt"

	"github.com/kilnml/kiln/native"
)

// CPU is the device name of the host processor, as PyTorch spells it.
const CPU = "cpu"

// CheckDevice checks a device name as PyTorch spells it ("cpu", "cuda",
// "cuda:N") against the linked libtorch and the machine. Its error has
// code InvalidArgument for another spelling, Unsupported when libtorch has
// no CUDA (Debian's libtorch 1.13 has none) and Unavailable when there is
// no such GPU; the message names the device. "" means "cpu".
func CheckDevice(device string) error {
	if device == "" {
		return nil
	}
	if _, err := native.CheckDevice(device); err != nil {
		return fmt.Errorf("kiln: %w", err)
	}
	return nil
}

// CUDACompiled reports whether the linked libtorch was built with CUDA.
func CUDACompiled() bool { return native.CUDACompiled() }

// CUDADeviceCount returns the number of CUDA GPUs usable now: 0 without
// CUDA in libtorch or without a GPU.
func CUDADeviceCount() int { return native.CUDADeviceCount() }

// CUDAMemory returns the bytes libtorch's CUDA caching allocator holds on
// GPU index: in live tensors (allocated) and reserved from the driver.
// Errors: Unsupported without CUDA, Unavailable for a missing GPU.
func CUDAMemory(index int) (allocated, reserved int64, err error) {
	allocated, reserved, err = native.CUDAMemory(index)
	if err != nil {
		return 0, 0, fmt.Errorf("kiln: GPU memory of cuda:%d: %w", index, err)
	}
	return allocated, reserved, nil
}

// To moves the module's parameters and buffers to device ("cpu", "cuda",
// "cuda:N"; "" is "cpu"), once. Forward keeps taking and returning CPU
// tensors: on a GPU it copies inputs to the device through pinned memory
// on a CUDA stream of the module's own and copies outputs back. Errors as
// CheckDevice, and OutOfMemory when the device's memory is exhausted; on
// error the module stays where it was.
func (m *Module) To(device string) error {
	if m == nil {
		return Errorf(InvalidArgument, "kiln: nil module")
	}
	if device == "" {
		device = CPU
	}
	m.mu.Lock() // no forward runs while parameters move
	defer m.mu.Unlock()
	if !m.h.Valid() {
		return ErrClosed
	}
	if err := m.h.To(device); err != nil {
		return fmt.Errorf("kiln: move %s to %s: %w", m.name, device, err)
	}
	return nil
}

// Device returns the device the module's parameters are on: "cpu" or
// "cuda:N".
func (m *Module) Device() string {
	var d string
	err := m.use(func(h native.Module) (err error) {
		d, err = h.Device()
		return err
	})
	if err != nil {
		return CPU
	}
	return d
}

// GPUStat is one GPU's utilisation and memory as NVIDIA's management
// library (NVML) reports them for the whole device.
type GPUStat = native.GPUStat

// GPUStats reads every GPU's utilisation and memory through NVML, opened
// at run time from NVIDIA's driver; without the driver the error has code
// Unavailable.
func GPUStats() ([]GPUStat, error) {
	s, err := native.GPUStats()
	if err != nil {
		return nil, fmt.Errorf("kiln: GPU statistics: %w", err)
	}
	return s, nil
}
