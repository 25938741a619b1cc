// Package metrics exports the statistics of a model manager's loaded
// versions to Prometheus, under Triton's metric names, labelled by model
// and version:
//
//	nv_inference_request_success            counter  successful requests
//	nv_inference_request_failure            counter  failed requests
//	nv_inference_count                      counter  inferences (batch rows)
//	nv_inference_exec_count                 counter  model executions
//	nv_inference_request_duration_us        counter  end-to-end request time
//	nv_inference_queue_duration_us          counter  time waiting in the queue
//	nv_inference_compute_input_duration_us  counter  time merging inputs
//	nv_inference_compute_infer_duration_us  counter  time in the model
//	nv_inference_compute_output_duration_us counter  time splitting outputs
//	nv_inference_pending_request_count      gauge    requests queued now
//	kiln_inference_batch_size               histogram executions by batch size
//
// and, labelled by model, version and role (production: the version that
// answers unversioned requests; candidate: a rollout's candidate; other),
// so that Prometheus, Argo Rollouts or Flagger can analyse a rollout:
//
//	kiln_inference_requests_total            counter  requests by outcome (success, failure)
//	kiln_inference_request_duration_seconds  histogram successful requests' end-to-end time
//
// and per model under a rollout's split:
//
//	kiln_rollout_candidate_weight            gauge    the candidate's share of unversioned requests (label version: the candidate)
//	kiln_shadow_requests_total               counter  requests also run on the candidate as shadow traffic
//	kiln_shadow_dropped_total                counter  requests drawn for shadowing but not sent (too many in flight)
//
// plus the server's admission control (AdmissionCollector: bytes in
// flight, open streams, refusals).
//
// The values are read from the versions' statistics at scrape time, so they
// cost nothing on the request path; a version's counters start at zero when
// it loads.
//
// Handler adds the process's own health, unlabelled, for leak watching:
//
//	kiln_native_tensors_live       gauge    native tensor handles alive (core.LiveTensors)
//	go_goroutines                  gauge    goroutines (Go collector, with the rest of go_*)
//	process_open_fds               gauge    open file descriptors (process collector)
//	process_resident_memory_bytes  gauge    resident set size in bytes (process collector)
//
// At rest kiln_native_tensors_live returns to the same value; one that
// grows with traffic is a leak of libtorch tensors.
package metrics

import (
	"net/http"
	"slices"
	"strconv"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/batcher"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// BatchSizeBuckets are the upper bounds of the batch size histogram.
var BatchSizeBuckets = []float64{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024}

var labels = []string{"model", "version"}

var roleLabels = []string{"model", "version", "role"}

func desc(name, help string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	descSuccess   = desc("nv_inference_request_success", "Number of successful inference requests, all batch sizes")
	descFailure   = desc("nv_inference_request_failure", "Number of failed inference requests, all batch sizes")
	descCount     = desc("nv_inference_count", "Number of inferences performed (a batch of n counts n)")
	descExec      = desc("nv_inference_exec_count", "Number of model executions performed (a batch counts 1)")
	descRequest   = desc("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds")
	descQueue     = desc("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds")
	descInput     = desc("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds")
	descInfer     = desc("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds")
	descOutput    = desc("nv_inference_compute_output_duration_us", "Cumulative compute output duration in microseconds")
	descPending   = desc("nv_inference_pending_request_count", "Instantaneous number of requests waiting in the queue")
	descBatchSize = desc("kiln_inference_batch_size", "Model executions by batch size (rows along dimension 0)")

	descRequests = prometheus.NewDesc("kiln_inference_requests_total", "Inference requests by outcome (success, failure), labelled by the version's role",
		append(slices.Clone(roleLabels), "outcome"), nil)
	descDuration = prometheus.NewDesc("kiln_inference_request_duration_seconds", "End-to-end time of successful inference requests in seconds, labelled by the version's role",
		roleLabels, nil)
	descWeight = prometheus.NewDesc("kiln_rollout_candidate_weight", "Share of the model's unversioned requests its rollout candidate answers (version: the candidate)",
		labels, nil)
	descShadow = prometheus.NewDesc("kiln_shadow_requests_total", "Requests answered by production and also run on the rollout candidate (shadow traffic)",
		[]string{"model"}, nil)
	descShadowDropped = prometheus.NewDesc("kiln_shadow_dropped_total", "Requests drawn for shadow traffic but not sent because too many shadow requests were in flight",
		[]string{"model"}, nil)
)

// Collector is a prometheus.Collector over a manager's loaded versions.
type Collector struct {
	mgr *manager.Manager
}

// NewCollector returns a collector for mgr.
func NewCollector(mgr *manager.Manager) *Collector { return &Collector{mgr: mgr} }

// Describe sends the descriptors of every metric the collector exports.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSuccess, descFailure, descCount, descExec, descRequest,
		descQueue, descInput, descInfer, descOutput, descPending, descBatchSize,
		descRequests, descDuration, descWeight, descShadow, descShadowDropped} {
		ch <- d
	}
}

func us(ns uint64) float64 { return float64(ns) / 1e3 }

// Collect sends the current value of every metric of every loaded version.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	splits := map[string]bool{}
	for _, v := range c.mgr.Loaded() {
		st := v.Stats().Snapshot()
		lv := []string{v.Name(), strconv.FormatInt(v.Number(), 10)}
		role := append(slices.Clone(lv), c.mgr.Role(v))
		ch <- prometheus.MustNewConstMetric(descRequests, prometheus.CounterValue, float64(st.Success.Count), append(slices.Clone(role), "success")...)
		ch <- prometheus.MustNewConstMetric(descRequests, prometheus.CounterValue, float64(st.Fail.Count), append(slices.Clone(role), "failure")...)
		ch <- prometheus.MustNewConstHistogram(descDuration, st.Latency.Total(), st.Latency.Sum, latencyBuckets(st.Latency), role...)
		if !splits[v.Name()] {
			splits[v.Name()] = true
			if sp, ok := c.mgr.SplitOf(v.Name()); ok {
				ch <- prometheus.MustNewConstMetric(descWeight, prometheus.GaugeValue, sp.Weight, v.Name(), strconv.FormatInt(sp.Candidate, 10))
			}
			shadowed, dropped := c.mgr.ShadowCounts(v.Name())
			ch <- prometheus.MustNewConstMetric(descShadow, prometheus.CounterValue, float64(shadowed), v.Name())
			ch <- prometheus.MustNewConstMetric(descShadowDropped, prometheus.CounterValue, float64(dropped), v.Name())
		}
		counter := func(d *prometheus.Desc, val float64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, val, lv...)
		}
		counter(descSuccess, float64(st.Success.Count))
		counter(descFailure, float64(st.Fail.Count))
		counter(descCount, float64(st.InferenceCount))
		counter(descExec, float64(st.ExecutionCount))
		counter(descRequest, us(st.Success.NS+st.Fail.NS))
		counter(descQueue, us(st.Queue.NS))
		counter(descInput, us(st.ComputeInput.NS))
		counter(descInfer, us(st.ComputeInfer.NS))
		counter(descOutput, us(st.ComputeOutput.NS))
		ch <- prometheus.MustNewConstMetric(descPending, prometheus.GaugeValue, float64(v.QueueLen()), lv...)

		buckets := map[float64]uint64{}
		var count uint64
		var sum float64
		for _, b := range st.Batches {
			n := b.ComputeInfer.Count
			count += n
			sum += float64(b.Size) * float64(n)
			i, _ := slices.BinarySearch(BatchSizeBuckets, float64(b.Size))
			if i < len(BatchSizeBuckets) {
				buckets[BatchSizeBuckets[i]] += n
			}
		}
		var cum uint64
		for _, ub := range BatchSizeBuckets { // cumulative, as Prometheus wants
			cum += buckets[ub]
			buckets[ub] = cum
		}
		ch <- prometheus.MustNewConstHistogram(descBatchSize, count, sum, buckets, lv...)
	}
}

// latencyBuckets converts a latency histogram to Prometheus's cumulative
// buckets (upper bounds in seconds; +Inf is implied by the count): every
// fourth of batcher.LatencyBounds (about 2× apart, 50 µs to 60 s), 22
// buckets rather than 83, as Prometheus advises.
func latencyBuckets(h batcher.Histogram) map[float64]uint64 {
	out := make(map[float64]uint64, len(batcher.LatencyBounds)/4+1)
	var cum uint64
	last := len(batcher.LatencyBounds) - 1
	for i, ub := range batcher.LatencyBounds {
		if i < len(h.Counts) {
			cum += h.Counts[i]
		}
		if i%4 == 0 || i == last {
			out[ub] = cum
		}
	}
	return out
}

// LiveTensorsName is the name of the gauge of native tensor handles alive.
const LiveTensorsName = "kiln_native_tensors_live"

// NewLiveTensorsGauge returns the kiln_native_tensors_live gauge, read
// from core.LiveTensors at scrape time.
func NewLiveTensorsGauge() prometheus.GaugeFunc {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: LiveTensorsName,
		Help: "Native (libtorch) tensor handles alive in the process: made and not yet released",
	}, func() float64 { return float64(core.LiveTensors()) })
}

// Handler returns the /metrics handler: the manager's metrics, the live
// native tensor gauge, the GPU metrics (NewGPUCollector; none on a CPU
// machine), the Go runtime's and the process's collectors, and
// those of extra collectors (such as NewAdmissionCollector's).
func Handler(mgr *manager.Manager, extra ...prometheus.Collector) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(mgr), NewLiveTensorsGauge(), NewGPUCollector(), collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(extra...)
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: nil})
}
