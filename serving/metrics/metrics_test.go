package metrics_test

import (
	"bufio"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/metrics"
	"github.com/kilnml/kiln/serving/repository"
)

// scrape returns the unlabelled samples the handler exports, by name.
func scrape(t *testing.T, h http.Handler) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	require.Equal(t, http.StatusOK, rec.Code)
	out := map[string]float64{}
	sc := bufio.NewScanner(io.Reader(rec.Body))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || strings.Contains(line, "{") {
			continue
		}
		name, val, ok := strings.Cut(line, " ")
		require.True(t, ok, line)
		f, err := strconv.ParseFloat(val, 64)
		require.NoError(t, err, line)
		out[name] = f
	}
	return out
}

// TestHandlerExportsProcessHealth: the metrics endpoint carries the live
// native tensor gauge, which follows tensors made and closed, next to the
// goroutine, open file and RSS gauges of the Go and process collectors.
func TestHandlerExportsProcessHealth(t *testing.T) {
	repo, err := repository.Open(t.TempDir())
	require.NoError(t, err)
	h := metrics.Handler(manager.New(repo, manager.Options{}))

	before := scrape(t, h)
	for _, name := range []string{metrics.LiveTensorsName, "go_goroutines", "process_open_fds", "process_resident_memory_bytes"} {
		_, ok := before[name]
		assert.True(t, ok, "%s is exported", name)
	}
	assert.Equal(t, float64(core.LiveTensors()), before[metrics.LiveTensorsName])

	var ts []*core.Tensor
	for range 3 {
		x, err := core.NewTensor([]float32{1, 2})
		require.NoError(t, err)
		ts = append(ts, x)
	}
	// Nothing else in this test binary makes tensors, so the count is exact.
	assert.Equal(t, before[metrics.LiveTensorsName]+3, scrape(t, h)[metrics.LiveTensorsName])
	core.CloseAll(ts)
	assert.Equal(t, before[metrics.LiveTensorsName], scrape(t, h)[metrics.LiveTensorsName])
}

// TestGPUMetrics: with NVIDIA's driver the GPU gauges are exported under
// Triton's names; without it (this CPU machine) NVML's absence is a coded
// error and the endpoint exports no GPU samples, and still answers.
func TestGPUMetrics(t *testing.T) {
	repo, err := repository.Open(t.TempDir())
	require.NoError(t, err)
	h := metrics.Handler(manager.New(repo, manager.Options{}))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	require.Equal(t, http.StatusOK, rec.Code)
	body := rec.Body.String()

	stats, err := core.GPUStats()
	if err != nil {
		assert.Equal(t, core.Unavailable, core.CodeOf(err), "%v", err)
		assert.Contains(t, err.Error(), "libnvidia-ml.so.1")
		assert.NotContains(t, body, "nv_gpu_utilization")
		assert.NotContains(t, body, "nv_gpu_memory_used_bytes")
	} else {
		for _, s := range stats {
			assert.Contains(t, body, `nv_gpu_memory_total_bytes{gpu_uuid="`+s.UUID+`"}`)
		}
	}
	if core.CUDADeviceCount() == 0 {
		assert.NotContains(t, body, "kiln_cuda_memory_allocated_bytes")
	} else {
		assert.Contains(t, body, `kiln_cuda_memory_allocated_bytes{device="cuda:0"}`)
	}
}
