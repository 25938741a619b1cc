package metrics

import (
	"github.com/kilnml/kiln/serving/limits"
	"github.com/prometheus/client_golang/prometheus"
)

// Admission metrics (serving/limits), over every listener:
//
//	kiln_inflight_request_bytes        gauge    bytes of requests admitted now
//	kiln_inflight_request_bytes_peak   gauge    the most admitted at once since start
//	kiln_inflight_request_bytes_limit  gauge    the limit (--max-inflight-bytes)
//	kiln_open_streams                  gauge    client-streaming calls open now
//	kiln_open_streams_peak             gauge    the most open at once since start
//	kiln_open_streams_limit            gauge    the limit (--max-streams)
//	kiln_admission_refused_total       counter  requests and stream messages (reason="bytes") and streams (reason="streams") refused
var (
	descInflight      = prometheus.NewDesc("kiln_inflight_request_bytes", "Bytes of requests and stream messages admitted now (decoding or executing)", nil, nil)
	descInflightPeak  = prometheus.NewDesc("kiln_inflight_request_bytes_peak", "The most bytes of requests admitted at once since the server started", nil, nil)
	descInflightLimit = prometheus.NewDesc("kiln_inflight_request_bytes_limit", "The limit of bytes of requests admitted at once", nil, nil)
	descStreams       = prometheus.NewDesc("kiln_open_streams", "Client-streaming calls (ModelStreamInfer, Flight DoPut, DoExchange, Handshake) open now", nil, nil)
	descStreamsPeak   = prometheus.NewDesc("kiln_open_streams_peak", "The most client-streaming calls open at once since the server started", nil, nil)
	descStreamsLimit  = prometheus.NewDesc("kiln_open_streams_limit", "The limit of client-streaming calls open at once", nil, nil)
	descRefused       = prometheus.NewDesc("kiln_admission_refused_total", "Requests, stream messages (reason bytes) and streams (reason streams) refused with RESOURCE_EXHAUSTED / HTTP 503", []string{"reason"}, nil)
)

// AdmissionCollector is a prometheus.Collector over a server's admission
// control: its in-flight bytes gate and its stream limit (either may be
// nil: no limit, reported as 0).
type AdmissionCollector struct {
	gate    *limits.Gate
	streams *limits.Streams
}

// NewAdmissionCollector returns a collector for gate and streams.
func NewAdmissionCollector(gate *limits.Gate, streams *limits.Streams) *AdmissionCollector {
	return &AdmissionCollector{gate: gate, streams: streams}
}

// Describe sends the descriptors of the admission metrics.
func (c *AdmissionCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descInflight, descInflightPeak, descInflightLimit, descStreams, descStreamsPeak, descStreamsLimit, descRefused} {
		ch <- d
	}
}

// Collect sends the admission metrics' current values.
func (c *AdmissionCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v int64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v))
	}
	gauge(descInflight, c.gate.InFlight())
	gauge(descInflightPeak, c.gate.Peak())
	gauge(descInflightLimit, c.gate.Capacity())
	gauge(descStreams, c.streams.Open())
	gauge(descStreamsPeak, c.streams.Peak())
	gauge(descStreamsLimit, c.streams.Max())
	ch <- prometheus.MustNewConstMetric(descRefused, prometheus.CounterValue, float64(c.gate.Refused()), "bytes")
	ch <- prometheus.MustNewConstMetric(descRefused, prometheus.CounterValue, float64(c.streams.Refused()), "streams")
}
