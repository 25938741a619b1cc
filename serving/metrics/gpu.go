package metrics

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kilnml/kiln/core"
)

// GPU metrics, under Triton's names for what NVML reports of the whole
// device (labelled by gpu_uuid), and Kiln's for what libtorch's CUDA
// caching allocator holds in this process (labelled by CUDA device).
var (
	descGPUUtil     = prometheus.NewDesc("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0) (NVML, whole device)", []string{"gpu_uuid"}, nil)
	descGPUMemTotal = prometheus.NewDesc("nv_gpu_memory_total_bytes", "GPU total memory, in bytes (NVML)", []string{"gpu_uuid"}, nil)
	descGPUMemUsed  = prometheus.NewDesc("nv_gpu_memory_used_bytes", "GPU used memory, in bytes (NVML, every process)", []string{"gpu_uuid"}, nil)
	descCUDAAlloc   = prometheus.NewDesc("kiln_cuda_memory_allocated_bytes", "Bytes in live tensors of this process on the CUDA device (libtorch's caching allocator)", []string{"device"}, nil)
	descCUDAReserve = prometheus.NewDesc("kiln_cuda_memory_reserved_bytes", "Bytes this process's caching allocator holds from the driver on the CUDA device", []string{"device"}, nil)
)

// GPUCollector exports GPU utilisation and memory. On a machine without
// NVIDIA's driver, or with a libtorch without CUDA, it exports nothing.
type GPUCollector struct {
	// The readers: core.GPUStats, core.CUDAMemory, core.CUDADeviceCount.
	stats  func() ([]core.GPUStat, error)
	memory func(index int) (int64, int64, error)
	count  func() int
}

// NewGPUCollector returns a collector over NVML and the CUDA caching
// allocator.
func NewGPUCollector() *GPUCollector {
	return &GPUCollector{stats: core.GPUStats, memory: core.CUDAMemory, count: core.CUDADeviceCount}
}

// Describe sends the descriptors of the GPU metrics.
func (c *GPUCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descGPUUtil, descGPUMemTotal, descGPUMemUsed, descCUDAAlloc, descCUDAReserve} {
		ch <- d
	}
}

// Collect reads NVML and the caching allocator at scrape time; what cannot
// be read (no driver, no CUDA) is left out.
func (c *GPUCollector) Collect(ch chan<- prometheus.Metric) {
	if stats, err := c.stats(); err == nil {
		for _, s := range stats {
			ch <- prometheus.MustNewConstMetric(descGPUUtil, prometheus.GaugeValue, s.Utilization, s.UUID)
			ch <- prometheus.MustNewConstMetric(descGPUMemTotal, prometheus.GaugeValue, float64(s.MemoryTotal), s.UUID)
			ch <- prometheus.MustNewConstMetric(descGPUMemUsed, prometheus.GaugeValue, float64(s.MemoryUsed), s.UUID)
		}
	}
	for i := range c.count() {
		alloc, reserved, err := c.memory(i)
		if err != nil {
			continue
		}
		dev := "cuda:" + strconv.Itoa(i)
		ch <- prometheus.MustNewConstMetric(descCUDAAlloc, prometheus.GaugeValue, float64(alloc), dev)
		ch <- prometheus.MustNewConstMetric(descCUDAReserve, prometheus.GaugeValue, float64(reserved), dev)
	}
}
