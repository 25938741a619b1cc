// Package serving is Kiln's model server: KServe v2 / Triton compatible
// gRPC (with grpc.health.v1) and HTTP/REST inference services and
// Prometheus metrics over a versioned model repository, with dynamic
// batching, optional bearer-token auth on the repository calls and
// optional TLS.
//
//	srv, err := serving.New(serving.Options{ModelRepository: "models"})
//	if err != nil { ... }
//	if err := srv.Start(ctx); err != nil { ... }
//	...
//	err = srv.Shutdown(ctx)
//
// Serve wraps the three for a command that runs until its context ends.
// See the sub-packages: repository (config.yaml), manager (atomic loads),
// batcher (dynamic batching), grpcserver, httpserver, metrics, auth.
package serving

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/auth"
	"github.com/kilnml/kiln/serving/grpcserver"
	"github.com/kilnml/kiln/serving/httpserver"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/metrics"
	"github.com/kilnml/kiln/serving/repository"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// Model control modes.
const (
	// ControlNone loads every model of the repository at start.
	ControlNone = "none"
	// ControlPoll loads every model at start, then polls the repository
	// every Options.PollInterval: changed models reload atomically (new
	// versions appear, removed ones go), removed models unload.
	ControlPoll = "poll"
	// ControlExplicit loads only Options.StartupModels at start; clients
	// load and unload the others with the repository API.
	ControlExplicit = "explicit"
)

// DefaultMaxMessageBytes is the default gRPC message size limit: the
// largest protobuf message (2 GiB - 1), so 1 GiB tensors fit.
const DefaultMaxMessageBytes = math.MaxInt32

// DefaultPollInterval is how often ControlPoll looks at the repository
// unless Options.PollInterval says otherwise.
const DefaultPollInterval = 15 * time.Second

// Options configure a Server.
type Options struct {
	// ModelRepository is the model repository directory (required).
	ModelRepository string
	// GRPCAddr is the gRPC listen address (default ":8001"); port 0 picks
	// a free port (see Server.GRPCAddr).
	GRPCAddr string
	// HTTPAddr is the HTTP/REST listen address; empty disables HTTP.
	HTTPAddr string
	// MetricsAddr is the Prometheus /metrics listen address; empty
	// disables metrics.
	MetricsAddr string
	// MaxMessageBytes limits received and sent gRPC messages and HTTP
	// request bodies (default DefaultMaxMessageBytes).
	MaxMessageBytes int
	// ModelControl is ControlNone (default), ControlPoll or
	// ControlExplicit.
	ModelControl string
	// PollInterval is ControlPoll's period (default DefaultPollInterval).
	PollInterval time.Duration
	// StartupModels are loaded at start in ControlExplicit mode.
	StartupModels []string
	// StrictModelLoad makes Start fail when a model fails to load;
	// otherwise the failure is logged, reported by the repository index,
	// and the server stays not ready until the model loads or is unloaded.
	StrictModelLoad bool
	// IntraOpThreads sets libtorch's intra-op threads when > 0; 0 picks
	// max(1, CPUs / instances), instances being the largest instance_count
	// among the models loaded at start, so that one model's concurrent
	// executions fit the cores (unless KILN_NUM_THREADS is set, which
	// core applies at start). OpenBLAS, when libtorch uses it, gets the
	// same thread count unless OPENBLAS_NUM_THREADS is set.
	IntraOpThreads int
	// AuthToken, when set, is the bearer token the repository calls
	// (index, load, unload) need, on gRPC and HTTP.
	AuthToken string
	// TLSCertFile and TLSKeyFile, when both set, serve gRPC and HTTP over
	// TLS with that PEM certificate (chain) and key.
	TLSCertFile, TLSKeyFile string
	// Name is the server name in ServerMetadata (default "kiln").
	Name string
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger
}

// Server is a running (or runnable) inference server.
type Server struct {
	opts     Options
	log      *slog.Logger
	mgr      *manager.Manager
	grpc     *grpc.Server
	http     *http.Server  // nil when HTTP is off
	metrics  *http.Server  // nil when metrics are off
	tls      *tls.Config   // nil without TLS
	stop     chan struct{} // closed by Shutdown
	stopOnce sync.Once
	pollDone chan struct{} // closed when the poller returns

	mu       sync.Mutex
	lis      net.Listener
	httpLis  net.Listener
	metLis   net.Listener
	started  bool
	ready    bool
	serveErr chan error
}

// New validates opts and opens the repository; nothing listens yet.
func New(opts Options) (*Server, error) {
	if opts.ModelRepository == "" {
		return nil, errors.New("serving: no model repository")
	}
	repo, err := repository.Open(opts.ModelRepository)
	if err != nil {
		return nil, fmt.Errorf("serving: %w", err)
	}
	if opts.GRPCAddr == "" {
		opts.GRPCAddr = ":8001"
	}
	if opts.MaxMessageBytes <= 0 {
		opts.MaxMessageBytes = DefaultMaxMessageBytes
	}
	switch opts.ModelControl {
	case "":
		opts.ModelControl = ControlNone
	case ControlNone, ControlPoll, ControlExplicit:
	default:
		return nil, fmt.Errorf("serving: unknown model control mode %q (want %q, %q or %q)", opts.ModelControl, ControlNone, ControlPoll, ControlExplicit)
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = DefaultPollInterval
	}
	if len(opts.StartupModels) > 0 && opts.ModelControl != ControlExplicit {
		return nil, fmt.Errorf("serving: startup models %v need model control mode %q (mode %q loads every model)", opts.StartupModels, ControlExplicit, opts.ModelControl)
	}
	if opts.Name == "" {
		opts.Name = "kiln"
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &Server{opts: opts, log: opts.Logger, stop: make(chan struct{})}
	if (opts.TLSCertFile == "") != (opts.TLSKeyFile == "") {
		return nil, errors.New("serving: TLS needs both a certificate and a key file")
	}
	if opts.TLSCertFile != "" {
		cert, err := tls.LoadX509KeyPair(opts.TLSCertFile, opts.TLSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("serving: TLS certificate %s, key %s: %w", opts.TLSCertFile, opts.TLSKeyFile, err)
		}
		s.tls = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	token := auth.New(opts.AuthToken)
	s.mgr = manager.New(repo, manager.Options{Logger: opts.Logger})
	gopts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(opts.MaxMessageBytes),
		grpc.MaxSendMsgSize(opts.MaxMessageBytes),
		grpc.ChainUnaryInterceptor(token.UnaryInterceptor()),
		grpc.ChainStreamInterceptor(token.StreamInterceptor()),
	}
	if s.tls != nil {
		gopts = append(gopts, grpc.Creds(credentials.NewTLS(s.tls)))
	}
	s.grpc = grpc.NewServer(gopts...)
	svc := grpcserver.New(s.mgr, grpcserver.Options{
		Name: opts.Name, Version: core.Version, Ready: s.Ready, Logger: opts.Logger, Stopping: s.stop,
	})
	svc.Register(s.grpc)
	healthpb.RegisterHealthServer(s.grpc, &healthService{s: s})
	if opts.HTTPAddr != "" {
		h := httpserver.New(svc, httpserver.Options{Auth: token, MaxBodyBytes: int64(opts.MaxMessageBytes), Logger: opts.Logger})
		s.http = &http.Server{
			Handler: h, TLSConfig: s.tls, ReadHeaderTimeout: 30 * time.Second, IdleTimeout: 5 * time.Minute,
			ErrorLog: slog.NewLogLogger(opts.Logger.Handler(), slog.LevelWarn),
		}
	}
	if opts.MetricsAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", metrics.Handler(s.mgr))
		s.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second,
			ErrorLog: slog.NewLogLogger(opts.Logger.Handler(), slog.LevelWarn)}
	}
	return s, nil
}

// healthService is grpc.health.v1 for the server as a whole ("") and the
// inference service: SERVING exactly when the server is ready.
type healthService struct {
	healthpb.UnimplementedHealthServer
	s *Server
}

func (h *healthService) status(service string) (healthpb.HealthCheckResponse_ServingStatus, error) {
	if service != "" && service != "inference.GRPCInferenceService" {
		return 0, status.Errorf(codes.NotFound, "unknown service %q", service)
	}
	if h.s.Ready() {
		return healthpb.HealthCheckResponse_SERVING, nil
	}
	return healthpb.HealthCheckResponse_NOT_SERVING, nil
}

// Check reports the serving status of a service.
func (h *healthService) Check(_ context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	st, err := h.status(req.GetService())
	if err != nil {
		return nil, err
	}
	return &healthpb.HealthCheckResponse{Status: st}, nil
}

// List reports the status of every service.
func (h *healthService) List(ctx context.Context, _ *healthpb.HealthListRequest) (*healthpb.HealthListResponse, error) {
	st, _ := h.status("")
	r := &healthpb.HealthCheckResponse{Status: st}
	return &healthpb.HealthListResponse{Statuses: map[string]*healthpb.HealthCheckResponse{"": r, "inference.GRPCInferenceService": r}}, nil
}

// Watch streams the status of a service whenever it changes (checked
// every 250 ms), until the client leaves or the server shuts down.
func (h *healthService) Watch(req *healthpb.HealthCheckRequest, stream healthpb.Health_WatchServer) error {
	last := healthpb.HealthCheckResponse_ServingStatus(-1)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		st, err := h.status(req.GetService())
		if err != nil {
			st = healthpb.HealthCheckResponse_SERVICE_UNKNOWN
		}
		if st != last {
			if err := stream.Send(&healthpb.HealthCheckResponse{Status: st}); err != nil {
				return err
			}
			last = st
		}
		select {
		case <-tick.C:
		case <-stream.Context().Done():
			return stream.Context().Err()
		case <-h.s.stop:
			return stream.Send(&healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_NOT_SERVING})
		}
	}
}

// Manager returns the server's model manager.
func (s *Server) Manager() *manager.Manager { return s.mgr }

// Start listens (gRPC, then HTTP and metrics when configured), then loads
// the models (the server is live but not ready meanwhile), and serves in
// the background until Shutdown. In ControlPoll mode it then polls the
// repository.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	if s.started {
		s.mu.Unlock()
		return errors.New("serving: already started")
	}
	s.started = true
	s.mu.Unlock()
	threads := s.opts.IntraOpThreads
	if threads <= 0 && os.Getenv("KILN_NUM_THREADS") == "" {
		threads = s.autoThreads()
	}
	if threads > 0 {
		if err := core.SetNumThreads(threads); err != nil {
			return fmt.Errorf("serving: intra-op threads: %w", err)
		}
	}
	var lc net.ListenConfig
	listen := func(what, addr string) (net.Listener, error) {
		l, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("serving: %s listener: %w", what, err)
		}
		return l, nil
	}
	lis, err := listen("gRPC", s.opts.GRPCAddr)
	if err != nil {
		return err
	}
	var httpLis, metLis net.Listener
	if s.http != nil {
		if httpLis, err = listen("HTTP", s.opts.HTTPAddr); err != nil {
			lis.Close()
			return err
		}
	}
	if s.metrics != nil {
		if metLis, err = listen("metrics", s.opts.MetricsAddr); err != nil {
			lis.Close()
			if httpLis != nil {
				httpLis.Close()
			}
			return err
		}
	}
	s.mu.Lock()
	s.lis, s.httpLis, s.metLis = lis, httpLis, metLis
	s.serveErr = make(chan error, 3)
	s.mu.Unlock()
	go func() {
		if err := s.grpc.Serve(lis); err != nil {
			s.serveErr <- fmt.Errorf("gRPC server: %w", err)
		}
	}()
	scheme := "http"
	if s.tls != nil {
		scheme = "https"
	}
	s.log.Info("gRPC inference service listening", "addr", lis.Addr().String(), "tls", s.tls != nil, "repository", s.opts.ModelRepository,
		"max_message_bytes", s.opts.MaxMessageBytes, "intra_op_threads", core.NumThreads(), "cpus", runtime.NumCPU(),
		"model_control", s.opts.ModelControl, "auth", s.opts.AuthToken != "")
	if httpLis != nil {
		go func() {
			var err error
			if s.tls != nil {
				err = s.http.ServeTLS(httpLis, "", "")
			} else {
				err = s.http.Serve(httpLis)
			}
			if !errors.Is(err, http.ErrServerClosed) {
				s.serveErr <- fmt.Errorf("HTTP server: %w", err)
			}
		}()
		s.log.Info("HTTP/REST inference service listening", "url", scheme+"://"+httpLis.Addr().String()+"/v2")
	}
	if metLis != nil {
		go func() {
			if err := s.metrics.Serve(metLis); !errors.Is(err, http.ErrServerClosed) {
				s.serveErr <- fmt.Errorf("metrics server: %w", err)
			}
		}()
		s.log.Info("Prometheus metrics listening", "url", "http://"+metLis.Addr().String()+"/metrics")
	}

	var loadErr error
	if s.opts.ModelControl == ControlExplicit {
		var errs []error
		for _, n := range s.opts.StartupModels {
			errs = append(errs, s.mgr.Load(n))
		}
		loadErr = errors.Join(errs...)
	} else {
		loadErr = s.mgr.LoadAll()
	}
	if loadErr != nil {
		if s.opts.StrictModelLoad {
			s.closeListeners()
			s.mgr.Close()
			return fmt.Errorf("serving: %w", loadErr)
		}
		s.log.Error("some models failed to load", "err", loadErr)
	}
	if s.opts.ModelControl == ControlPoll {
		s.pollDone = make(chan struct{})
		go s.poll()
	}
	s.mu.Lock()
	s.ready = true
	s.mu.Unlock()
	s.log.Info("server started", "ready", s.Ready())
	return nil
}

// closeListeners stops every server at once, without waiting for requests.
func (s *Server) closeListeners() {
	s.grpc.Stop()
	if s.http != nil {
		s.http.Close()
	}
	if s.metrics != nil {
		s.metrics.Close()
	}
}

// autoThreads returns max(1, CPUs / instances), instances being the largest
// instance_count among the models Start loads.
func (s *Server) autoThreads() int {
	names := s.opts.StartupModels
	if s.opts.ModelControl != ControlExplicit {
		names, _ = s.mgr.Repository().Names()
	}
	inst := 1
	for _, n := range names {
		if m, err := s.mgr.Repository().Model(n); err == nil {
			inst = max(inst, m.Config.Instances())
		}
	}
	return max(1, runtime.NumCPU()/inst)
}

// poll runs Manager.Poll every PollInterval until Shutdown.
func (s *Server) poll() {
	defer close(s.pollDone)
	t := time.NewTicker(s.opts.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		if err := s.mgr.Poll(); err != nil {
			s.log.Warn("repository poll: some models failed to load", "err", err)
		}
	}
}

// GRPCAddr returns the address the gRPC service listens on, or nil before
// Start.
func (s *Server) GRPCAddr() net.Addr { return s.addr(&s.lis) }

// HTTPAddr returns the address the HTTP service listens on, or nil before
// Start or without HTTP.
func (s *Server) HTTPAddr() net.Addr { return s.addr(&s.httpLis) }

// MetricsAddr returns the address /metrics is served on, or nil before
// Start or without metrics.
func (s *Server) MetricsAddr() net.Addr { return s.addr(&s.metLis) }

// TLS reports whether gRPC and HTTP are served over TLS.
func (s *Server) TLS() bool { return s.tls != nil }

func (s *Server) addr(l *net.Listener) net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if *l == nil {
		return nil
	}
	return (*l).Addr()
}

// Ready reports whether the server has started and every model it was
// asked to load serves.
func (s *Server) Ready() bool {
	s.mu.Lock()
	ready := s.ready
	s.mu.Unlock()
	return ready && s.mgr.Ready()
}

// Shutdown stops accepting connections and requests, lets requests in
// flight finish (until ctx ends, when the rest are cancelled), then
// unloads every model.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.ready = false
	s.mu.Unlock()
	s.stopOnce.Do(func() { close(s.stop) })
	if s.pollDone != nil {
		<-s.pollDone
	}
	var wg sync.WaitGroup
	var httpErr error
	if s.http != nil {
		wg.Go(func() { httpErr = s.http.Shutdown(ctx) })
	}
	if s.metrics != nil {
		wg.Go(func() { s.metrics.Shutdown(ctx) })
	}
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		s.grpc.Stop()
		<-done
		err = ctx.Err()
	}
	wg.Wait()
	if s.http != nil && httpErr != nil {
		s.http.Close()
		err = errors.Join(err, fmt.Errorf("HTTP shutdown: %w", httpErr))
	}
	s.mgr.Close()
	s.log.Info("server stopped")
	return err
}

// Serve runs a server with opts until ctx ends (on SIGTERM, say), then
// shuts it down gracefully: no new requests, those in flight finish, the
// models are unloaded, and Serve returns nil. started, when not nil, is
// called once the server has started.
func Serve(ctx context.Context, opts Options, started func(*Server)) error {
	s, err := New(opts)
	if err != nil {
		return err
	}
	if err := s.Start(ctx); err != nil {
		return err
	}
	if started != nil {
		started(s)
	}
	select {
	case <-ctx.Done():
	case err := <-s.serveErr:
		s.closeListeners()
		s.mgr.Close()
		return fmt.Errorf("serving: %w", err)
	}
	return s.Shutdown(context.WithoutCancel(ctx))
}
