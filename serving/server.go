// Package serving is Kiln's model server: a KServe v2 / Triton compatible
// gRPC inference service (with grpc.health.v1) over a versioned model
// repository, with dynamic batching.
//
//	srv, err := serving.New(serving.Options{ModelRepository: "models"})
//	if err != nil { ... }
//	if err := srv.Start(ctx); err != nil { ... }
//	...
//	err = srv.Shutdown(ctx)
//
// Serve wraps the three for a command that runs until its context ends.
package serving

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"runtime"
	"sync"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/grpcserver"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// Model control modes.
const (
	// ControlNone loads every model of the repository at start.
	ControlNone = "none"
	// ControlExplicit loads only Options.StartupModels at start; clients
	// load and unload the others with the repository API.
	ControlExplicit = "explicit"
)

// DefaultMaxMessageBytes is the default gRPC message size limit: the
// largest protobuf message (2 GiB - 1), so 1 GiB tensors fit.
const DefaultMaxMessageBytes = math.MaxInt32

// Options configure a Server.
type Options struct {
	// ModelRepository is the model repository directory (required).
	ModelRepository string
	// GRPCAddr is the gRPC listen address (default ":8001"); port 0 picks
	// a free port (see Server.GRPCAddr).
	GRPCAddr string
	// MaxMessageBytes limits received and sent gRPC messages
	// (default DefaultMaxMessageBytes).
	MaxMessageBytes int
	// ModelControl is ControlNone (default) or ControlExplicit.
	ModelControl string
	// StartupModels are loaded at start in ControlExplicit mode.
	StartupModels []string
	// StrictModelLoad makes Start fail when a model fails to load;
	// otherwise the failure is logged, reported by the repository index,
	// and the server stays not ready until the model loads or is unloaded.
	StrictModelLoad bool
	// IntraOpThreads sets libtorch's intra-op threads when > 0; 0 leaves
	// the process setting alone.
	IntraOpThreads int
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
	stop     chan struct{} // closed by Shutdown
	stopOnce sync.Once

	mu       sync.Mutex
	lis      net.Listener
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
	case ControlNone, ControlExplicit:
	default:
		return nil, fmt.Errorf("serving: unknown model control mode %q (want %q or %q)", opts.ModelControl, ControlNone, ControlExplicit)
	}
	if opts.Name == "" {
		opts.Name = "kiln"
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &Server{opts: opts, log: opts.Logger, stop: make(chan struct{})}
	s.mgr = manager.New(repo, manager.Options{Logger: opts.Logger})
	s.grpc = grpc.NewServer(
		grpc.MaxRecvMsgSize(opts.MaxMessageBytes),
		grpc.MaxSendMsgSize(opts.MaxMessageBytes),
	)
	grpcserver.New(s.mgr, grpcserver.Options{
		Name: opts.Name, Version: core.Version, Ready: s.Ready, Logger: opts.Logger,
	}).Register(s.grpc)
	healthpb.RegisterHealthServer(s.grpc, &healthService{s: s})
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

// Start listens, then loads the models (the server is live but not ready
// meanwhile), and serves in the background until Shutdown.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	if s.started {
		s.mu.Unlock()
		return errors.New("serving: already started")
	}
	s.started = true
	s.mu.Unlock()
	if s.opts.IntraOpThreads > 0 {
		if err := core.SetNumThreads(s.opts.IntraOpThreads); err != nil {
			return fmt.Errorf("serving: %w", err)
		}
	}
	var lc net.ListenConfig
	lis, err := lc.Listen(ctx, "tcp", s.opts.GRPCAddr)
	if err != nil {
		return fmt.Errorf("serving: %w", err)
	}
	s.mu.Lock()
	s.lis = lis
	s.serveErr = make(chan error, 1)
	s.mu.Unlock()
	go func() { s.serveErr <- s.grpc.Serve(lis) }()
	s.log.Info("gRPC inference service listening", "addr", lis.Addr().String(), "repository", s.opts.ModelRepository,
		"max_message_bytes", s.opts.MaxMessageBytes, "intra_op_threads", core.NumThreads(), "cpus", runtime.NumCPU())

	var loadErr error
	if s.opts.ModelControl == ControlNone {
		loadErr = s.mgr.LoadAll()
	} else {
		var errs []error
		for _, n := range s.opts.StartupModels {
			errs = append(errs, s.mgr.Load(n))
		}
		loadErr = errors.Join(errs...)
	}
	if loadErr != nil {
		if s.opts.StrictModelLoad {
			s.grpc.Stop()
			s.mgr.Close()
			return fmt.Errorf("serving: %w", loadErr)
		}
		s.log.Error("some models failed to load", "err", loadErr)
	}
	s.mu.Lock()
	s.ready = true
	s.mu.Unlock()
	s.log.Info("server started", "ready", s.Ready())
	return nil
}

// GRPCAddr returns the address the gRPC service listens on, or nil before
// Start.
func (s *Server) GRPCAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lis == nil {
		return nil
	}
	return s.lis.Addr()
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
	s.mgr.Close()
	s.log.Info("server stopped")
	return err
}

// Serve runs a server with opts until ctx ends (on SIGTERM, say), then
// shuts it down gracefully: no new requests, those in flight finish, the
// models are unloaded, and Serve returns nil.
func Serve(ctx context.Context, opts Options) error {
	s, err := New(opts)
	if err != nil {
		return err
	}
	if err := s.Start(ctx); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case err := <-s.serveErr:
		s.mgr.Close()
		return fmt.Errorf("serving: gRPC server: %w", err)
	}
	return s.Shutdown(context.WithoutCancel(ctx))
}
