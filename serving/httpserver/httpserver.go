// Package httpserver implements the KServe v2 / Triton HTTP/REST inference
// protocol over the same service (model manager, batchers, validation,
// classification) that answers gRPC:
//
//	GET  /v2/health/live, /v2/health/ready
//	GET  /v2                                          server metadata
//	GET  /v2/models/{m}[/versions/{v}]                model metadata
//	GET  /v2/models/{m}[/versions/{v}]/ready          200 ready, 503 not
//	GET  /v2/models/{m}[/versions/{v}]/config         model configuration
//	GET  /v2/models[/{m}[/versions/{v}]]/stats        statistics
//	POST /v2/models/{m}[/versions/{v}]/infer          inference
//	POST /v2/repository/index                         repository index
//	POST /v2/repository/models/{m}/load|unload        model control
//	GET  /v2/datasets                                 stored datasets (Options.Datasets)
//	GET  /v2/registry/...                             the model registry (registry.go)
//
// Inference takes JSON tensors ("data") and the binary data extension: a
// body whose first Inference-Header-Content-Length bytes are the JSON
// request and whose rest holds the inputs that declare a
// "binary_data_size" parameter, in order; outputs come back binary when
// the request asks for it ("binary_data" on an output, "binary_data_output"
// on the request). Errors are {"error": "..."} with the status that the
// gRPC code maps to (400, 401, 404, 429, 500, 503, 504).
package httpserver

import (
	"bytes"
	"compress/gzip"
	"compress/zlib"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/auth"
	"github.com/kilnml/kiln/serving/grpcserver"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/limits"
	"github.com/kilnml/kiln/serving/rollout"
	kstatus "github.com/kilnml/kiln/serving/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
)

// HeaderLength is the binary data extension's header: the length of the
// JSON part of a request or response body.
const HeaderLength = "Inference-Header-Content-Length"

// DefaultMaxBodyBytes bounds a request body as sent unless Options say
// otherwise: limits.DefaultMaxMessageBytes, like the gRPC message limit.
const DefaultMaxBodyBytes = limits.DefaultMaxMessageBytes

// Options configure the HTTP handler.
type Options struct {
	// Auth is the authentication policy: the /v2/repository endpoints are
	// auth.Control calls, inference, model metadata, configuration and
	// statistics auth.Inference calls, health and server metadata
	// auth.Open. nil lets every call through.
	Auth *auth.Policy
	// MaxBodyBytes bounds request bodies as sent (0: DefaultMaxBodyBytes);
	// a larger one is answered 413 without being read further.
	MaxBodyBytes int64
	// MaxDecompressedBytes bounds a gzip or deflate body once decoded (0:
	// limits.DefaultMaxDecompressedBytes); beyond it, 413.
	MaxDecompressedBytes int64
	// Gate admits inference requests by their declared body size
	// (Content-Length, else MaxBodyBytes) before their body is read; a
	// request it refuses is answered 503. nil admits everything.
	Gate *limits.Gate
	// Registry, when set, is served under /v2/registry (see routeRegistry);
	// RegistryStatus, when set too, answers /v2/registry/serving (what a
	// registry follower serves).
	Registry       *registry.Registry
	RegistryStatus func() any
	// Datasets, when set, is listed by GET /v2/datasets (routeDatasets).
	Datasets Datasets
	// Rollouts, when set, is served under /v2/rollouts (see
	// routeRollouts).
	Rollouts *rollout.Controller
	// Logger receives the handler's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Handler serves the v2 HTTP protocol.
type Handler struct {
	svc  *grpcserver.Service
	opts Options
	log  *slog.Logger
	mux  *http.ServeMux
}

// New returns the HTTP handler over svc.
func New(svc *grpcserver.Service, opts Options) *Handler {
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if opts.MaxDecompressedBytes <= 0 {
		opts.MaxDecompressedBytes = limits.DefaultMaxDecompressedBytes
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	h := &Handler{svc: svc, opts: opts, log: opts.Logger, mux: http.NewServeMux()}
	get, post := http.MethodGet, http.MethodPost
	open, infer, control := auth.Open, auth.Inference, auth.Control
	h.route(get, "/v2/health/live", open, h.live)
	h.route(get, "/v2/health/ready", open, h.ready)
	h.route(get, "/v2", open, h.serverMetadata)
	h.route(get, "/v2/models/stats", infer, h.stats)
	for _, base := range []string{"/v2/models/{model}", "/v2/models/{model}/versions/{version}"} {
		h.route(get, base, infer, h.modelMetadata)
		h.route(get, base+"/ready", open, h.modelReady)
		h.route(get, base+"/config", infer, h.modelConfig)
		h.route(get, base+"/stats", infer, h.stats)
		h.route(post, base+"/infer", infer, h.infer)
	}
	h.route(post, "/v2/repository/index", control, h.index)
	h.route(post, "/v2/repository/models/{model}/load", control, h.load)
	h.route(post, "/v2/repository/models/{model}/unload", control, h.unload)
	h.routeRegistry()
	h.routeDatasets()
	h.routeRollouts()
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no endpoint %s %s", r.Method, r.URL.Path))
	})
	return h
}

// ServeHTTP serves one request.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// route serves pattern with fn for method (GET also answers HEAD) to
// callers that the auth policy lets make calls of scope.
func (h *Handler) route(method, pattern string, scope auth.Scope, fn http.HandlerFunc) {
	h.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != method && !(method == http.MethodGet && r.Method == http.MethodHead) {
			w.Header().Set("Allow", method)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s takes %s, not %s", r.URL.Path, method, r.Method))
			return
		}
		if err := h.opts.Auth.CheckHTTP(r, scope); err != nil {
			if status.Code(err) == codes.Unauthenticated {
				w.Header().Set("WWW-Authenticate", `Bearer realm="kiln"`)
			}
			writeStatus(w, err)
			return
		}
		fn(w, r)
	})
}

func writeError(w http.ResponseWriter, code int, msg string) {
	body, _ := json.Marshal(map[string]string{"error": kstatus.Truncate(msg)})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	w.Write(body)
}

func writeStatus(w http.ResponseWriter, err error) {
	var he *httpError
	if errors.As(err, &he) {
		writeError(w, he.code, he.msg)
		return
	}
	st := status.Convert(kstatus.GRPC(err))
	writeError(w, kstatus.HTTPFromGRPC(st.Code()), st.Message())
}

func writeJSON(w http.ResponseWriter, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "encoding the response: "+err.Error())
		return
	}
	writeBody(w, "application/json", body)
}

func writeBody(w http.ResponseWriter, contentType string, body []byte) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	w.Write(body)
}

var protoJSON = protojson.MarshalOptions{UseProtoNames: true}

func (h *Handler) live(w http.ResponseWriter, r *http.Request) {
	resp, err := h.svc.ServerLive(r.Context(), &pb.ServerLiveRequest{})
	if err != nil {
		writeStatus(w, err)
		return
	}
	if !resp.Live {
		writeError(w, http.StatusServiceUnavailable, "server is not live")
		return
	}
	writeBody(w, "application/json", []byte(`{"live":true}`))
}

func (h *Handler) ready(w http.ResponseWriter, r *http.Request) {
	resp, err := h.svc.ServerReady(r.Context(), &pb.ServerReadyRequest{})
	if err != nil {
		writeStatus(w, err)
		return
	}
	if !resp.Ready {
		writeError(w, http.StatusServiceUnavailable, "server is not ready: models are loading, or some failed to load (see /v2/repository/index)")
		return
	}
	writeBody(w, "application/json", []byte(`{"ready":true}`))
}

func (h *Handler) serverMetadata(w http.ResponseWriter, r *http.Request) {
	resp, err := h.svc.ServerMetadata(r.Context(), &pb.ServerMetadataRequest{})
	if err != nil {
		writeStatus(w, err)
		return
	}
	writeJSON(w, map[string]any{"name": resp.Name, "version": resp.Version, "extensions": resp.Extensions})
}

type tensorMetadata struct {
	Name     string  `json:"name"`
	Datatype string  `json:"datatype"`
	Shape    []int64 `json:"shape"`
}

func (h *Handler) modelMetadata(w http.ResponseWriter, r *http.Request) {
	resp, err := h.svc.ModelMetadata(r.Context(), &pb.ModelMetadataRequest{Name: r.PathValue("model"), Version: r.PathValue("version")})
	if err != nil {
		writeStatus(w, err)
		return
	}
	conv := func(ts []*pb.ModelMetadataResponse_TensorMetadata) []tensorMetadata {
		out := make([]tensorMetadata, len(ts))
		for i, t := range ts {
			out[i] = tensorMetadata{Name: t.Name, Datatype: t.Datatype, Shape: t.Shape}
		}
		return out
	}
	writeJSON(w, map[string]any{
		"name": resp.Name, "versions": resp.Versions, "platform": resp.Platform,
		"inputs": conv(resp.Inputs), "outputs": conv(resp.Outputs),
	})
}

func (h *Handler) modelReady(w http.ResponseWriter, r *http.Request) {
	name, version := r.PathValue("model"), r.PathValue("version")
	resp, err := h.svc.ModelReady(r.Context(), &pb.ModelReadyRequest{Name: name, Version: version})
	if err != nil {
		writeStatus(w, err)
		return
	}
	if !resp.Ready {
		what := fmt.Sprintf("model %q", name)
		if version != "" {
			what = fmt.Sprintf("version %s of model %q", version, name)
		}
		writeError(w, http.StatusServiceUnavailable, what+" is not ready")
		return
	}
	writeBody(w, "application/json", []byte(`{"ready":true}`))
}

func (h *Handler) modelConfig(w http.ResponseWriter, r *http.Request) {
	resp, err := h.svc.ModelConfig(r.Context(), &pb.ModelConfigRequest{Name: r.PathValue("model"), Version: r.PathValue("version")})
	if err != nil {
		writeStatus(w, err)
		return
	}
	body, err := protoJSON.Marshal(resp.Config)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "encoding the configuration: "+err.Error())
		return
	}
	writeBody(w, "application/json", body)
}

func (h *Handler) stats(w http.ResponseWriter, r *http.Request) {
	resp, err := h.svc.ModelStatistics(r.Context(), &pb.ModelStatisticsRequest{Name: r.PathValue("model"), Version: r.PathValue("version")})
	if err != nil {
		writeStatus(w, err)
		return
	}
	body, err := protoJSON.Marshal(resp)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "encoding the statistics: "+err.Error())
		return
	}
	writeBody(w, "application/json", body)
}

// httpError is an error answered with its own HTTP status (413 and 503,
// which no gRPC code maps to).
type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

// admit reserves the request's declared body size (Content-Length, else
// the body limit) in the gate before the body is read; the caller calls
// release once the request is answered. A declared size over the body
// limit is 413, a full gate 503.
func (h *Handler) admit(r *http.Request) (release func(), err error) {
	n := r.ContentLength
	if n > h.opts.MaxBodyBytes {
		return nil, &httpError{http.StatusRequestEntityTooLarge, fmt.Sprintf("request body of %d bytes exceeds the limit of %d bytes", n, h.opts.MaxBodyBytes)}
	}
	if n < 0 {
		n = h.opts.MaxBodyBytes
	}
	if !h.opts.Gate.Acquire(n) {
		return nil, &httpError{http.StatusServiceUnavailable, fmt.Sprintf("server busy: %d bytes of requests in flight, the limit is %d; retry later", h.opts.Gate.InFlight(), h.opts.Gate.Capacity())}
	}
	return func() { h.opts.Gate.Release(n) }, nil
}

// readBody reads a request body within the size limits, decompressing
// gzip and deflate (zlib) Content-Encodings. It reads incrementally: the
// buffer grows with the bytes actually received, never from the declared
// Content-Length. A body over MaxBodyBytes, or over MaxDecompressedBytes
// once decoded, is a 413 httpError.
func (h *Handler) readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	if r.ContentLength > h.opts.MaxBodyBytes {
		return nil, &httpError{http.StatusRequestEntityTooLarge, fmt.Sprintf("request body of %d bytes exceeds the limit of %d bytes", r.ContentLength, h.opts.MaxBodyBytes)}
	}
	var src io.Reader = http.MaxBytesReader(w, r.Body, h.opts.MaxBodyBytes)
	limit := h.opts.MaxBodyBytes
	switch enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
	case "gzip":
		zr, err := gzip.NewReader(src)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "gzip body: %v", err)
		}
		defer zr.Close()
		src, limit = zr, h.opts.MaxDecompressedBytes
	case "deflate":
		zr, err := zlib.NewReader(src)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "deflate body: %v", err)
		}
		defer zr.Close()
		src, limit = zr, h.opts.MaxDecompressedBytes
	default:
		return nil, status.Errorf(codes.InvalidArgument, "unsupported Content-Encoding %q (want gzip or deflate)", enc)
	}
	var buf bytes.Buffer
	n, err := buf.ReadFrom(io.LimitReader(src, limit+1))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return nil, &httpError{http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds the limit of %d bytes", h.opts.MaxBodyBytes)}
	}
	if n > limit {
		return nil, &httpError{http.StatusRequestEntityTooLarge, fmt.Sprintf("decoded request body exceeds the limit of %d bytes", limit)}
	}
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "reading the request body: %v", err)
	}
	return buf.Bytes(), nil
}

type indexRequest struct {
	Ready bool `json:"ready"`
}

type indexEntry struct {
	Name    string `json:"name"`
	Version string `json:"version,omitempty"`
	State   string `json:"state,omitempty"`
	Reason  string `json:"reason,omitempty"`
}

func decodeOptionalJSON(body []byte, v any) error {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil
	}
	if err := json.Unmarshal(body, v); err != nil {
		return status.Errorf(codes.InvalidArgument, "invalid JSON body: %v", err)
	}
	return nil
}

func (h *Handler) index(w http.ResponseWriter, r *http.Request) {
	body, err := h.readBody(w, r)
	if err != nil {
		writeStatus(w, err)
		return
	}
	var req indexRequest
	if err := decodeOptionalJSON(body, &req); err != nil {
		writeStatus(w, err)
		return
	}
	resp, err := h.svc.RepositoryIndex(r.Context(), &pb.RepositoryIndexRequest{Ready: req.Ready})
	if err != nil {
		writeStatus(w, err)
		return
	}
	out := make([]indexEntry, 0, len(resp.Models))
	for _, m := range resp.Models {
		out = append(out, indexEntry{Name: m.Name, Version: m.Version, State: m.State, Reason: m.Reason})
	}
	writeJSON(w, out)
}

type controlRequest struct {
	Parameters map[string]json.RawMessage `json:"parameters"`
}

func (h *Handler) load(w http.ResponseWriter, r *http.Request) {
	body, err := h.readBody(w, r)
	if err != nil {
		writeStatus(w, err)
		return
	}
	var req controlRequest
	if err := decodeOptionalJSON(body, &req); err != nil {
		writeStatus(w, err)
		return
	}
	preq := &pb.RepositoryModelLoadRequest{ModelName: r.PathValue("model")}
	if len(req.Parameters) > 0 {
		preq.Parameters = map[string]*pb.ModelRepositoryParameter{}
		for k, v := range req.Parameters {
			preq.Parameters[k] = &pb.ModelRepositoryParameter{ParameterChoice: &pb.ModelRepositoryParameter_StringParam{StringParam: string(v)}}
		}
	}
	if _, err := h.svc.RepositoryModelLoad(r.Context(), preq); err != nil {
		writeStatus(w, err)
		return
	}
	writeBody(w, "application/json", []byte("{}"))
}

func (h *Handler) unload(w http.ResponseWriter, r *http.Request) {
	body, err := h.readBody(w, r)
	if err != nil {
		writeStatus(w, err)
		return
	}
	var req controlRequest
	if err := decodeOptionalJSON(body, &req); err != nil {
		writeStatus(w, err)
		return
	}
	for k := range req.Parameters {
		if k != "unload_dependents" { // Kiln models have no dependents
			writeError(w, http.StatusBadRequest, fmt.Sprintf("unload parameter %q is not supported", k))
			return
		}
	}
	if _, err := h.svc.RepositoryModelUnload(r.Context(), &pb.RepositoryModelUnloadRequest{ModelName: r.PathValue("model")}); err != nil {
		writeStatus(w, err)
		return
	}
	writeBody(w, "application/json", []byte("{}"))
}

// requestTimeout returns the request's "timeout" parameter (microseconds)
// as a duration, 0 when absent.
func requestTimeout(params map[string]json.RawMessage) (time.Duration, error) {
	raw, ok := params["timeout"]
	if !ok {
		return 0, nil
	}
	var us int64
	if err := json.Unmarshal(raw, &us); err != nil || us < 0 {
		return 0, status.Errorf(codes.InvalidArgument, "parameter \"timeout\" must be a non-negative number of microseconds, got %s", raw)
	}
	return time.Duration(us) * time.Microsecond, nil
}

func (h *Handler) infer(w http.ResponseWriter, r *http.Request) {
	release, err := h.admit(r)
	if err != nil {
		writeStatus(w, err)
		return
	}
	defer release()
	body, err := h.readBody(w, r)
	if err != nil {
		writeStatus(w, err)
		return
	}
	req, outs, err := decodeInferRequest(r.PathValue("model"), r.PathValue("version"), body, r.Header.Get(HeaderLength))
	if err != nil {
		writeStatus(w, err)
		return
	}
	ctx := grpcserver.WithHeaders(r.Context(), r.Header)
	if req.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, req.timeout)
		defer cancel()
	}
	resp, err := h.svc.ModelInfer(ctx, req.pb)
	if err != nil {
		writeStatus(w, err)
		return
	}
	header, binary, err := encodeInferResponse(resp, outs, req.binaryOutput)
	if err != nil {
		writeStatus(w, err)
		return
	}
	if len(binary) == 0 {
		writeBody(w, "application/json", header)
		return
	}
	w.Header().Set(HeaderLength, strconv.Itoa(len(header)))
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(len(header)+len(binary)))
	w.WriteHeader(http.StatusOK)
	w.Write(header)
	w.Write(binary)
}
