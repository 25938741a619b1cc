// Package serving is Kiln's model server: KServe v2 / Triton compatible
// gRPC (with grpc.health.v1) and HTTP/REST inference services, Prometheus
// metrics and the Arrow Flight service (serving/flightserver) over one
// versioned model repository and one model manager, with dynamic
// batching, one authentication policy (serving/auth) and optional TLS.
//
// One composition serves every caller (`kiln serve`, Python's kiln.serve,
// the test servers): a Config and Run.
//
//	cfg := serving.DefaultConfig()
//	cfg.ModelRepository = "models"
//	err := serving.Run(ctx, cfg) // until ctx ends, then a graceful stop
//
// New, Start and Shutdown are the same steps for a caller that keeps the
// server beside other work. See the sub-packages: repository (model
// configs, installing packages), manager (atomic loads), batcher (dynamic
// batching), grpcserver, httpserver, flightserver, metrics, auth.
package serving

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/auth"
	"github.com/kilnml/kiln/serving/console"
	"github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/follower"
	"github.com/kilnml/kiln/serving/grpcserver"
	"github.com/kilnml/kiln/serving/httpserver"
	"github.com/kilnml/kiln/serving/internal/grpccodec"
	"github.com/kilnml/kiln/serving/limits"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/metrics"
	"github.com/kilnml/kiln/serving/repository"
	"github.com/kilnml/kiln/serving/repository/s3repo"
	"github.com/kilnml/kiln/serving/rollout"
	kstatus "github.com/kilnml/kiln/serving/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// Server is a running (or runnable) inference server.
type Server struct {
	cfg        Config
	addrs      listenAddrs
	log        *slog.Logger
	mgr        *manager.Manager
	grpc       *grpc.Server
	http       *http.Server         // nil when HTTP is off
	metrics    *http.Server         // nil when metrics are off
	flight     *flightserver.Server // nil when Flight is off
	tls        *tls.Config          // nil without TLS
	gate       *limits.Gate         // bytes in flight, over every listener
	streams    *limits.Streams      // client-streaming calls open, over every listener
	stop       chan struct{}        // closed by Shutdown
	stopReq    chan context.Context // Stop's request to Run
	stopOnce   sync.Once
	pollDone   chan struct{}      // closed when the poller returns
	repoDir    string             // the repository's local directory (the S3 mirror's, for s3://)
	mirror     *s3repo.Mirror     // nil unless the repository is s3://
	mirrorTemp string             // the mirror's temporary cache directory, removed on shutdown ("" when given)
	registry   *registry.Registry // nil without Config.Registry
	pipes      *pipelines         // nil without Config.Registry
	follower   *follower.Follower // nil without Config.Registry
	followDone chan struct{}      // closed when the follower returns
	rollouts   *rollout.Controller
	rollDone   chan struct{} // closed when the rollout controller returns

	mu       sync.Mutex
	lis      net.Listener
	httpLis  net.Listener
	metLis   net.Listener
	started  bool
	ready    bool
	serveErr chan error
}

// listenAddrs are the "host:port" addresses of the listeners ("" when
// off).
type listenAddrs struct{ grpc, http, metrics, flight string }

// New validates cfg, opens the repository and builds every service; nothing
// listens and no model loads yet.
func New(cfg Config) (_ *Server, retErr error) {
	if cfg.Name == "" {
		cfg.Name = "kiln"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("serving: %w", err)
	}
	var addrs listenAddrs
	for _, a := range []struct {
		dst  *string
		port int
	}{{&addrs.grpc, cfg.GRPCPort}, {&addrs.http, cfg.HTTPPort}, {&addrs.metrics, cfg.MetricsPort}, {&addrs.flight, cfg.FlightPort}} {
		*a.dst, _ = cfg.listenAddr(a.port) // Validate checked the host
	}
	repoDir := cfg.ModelRepository
	var mirror *s3repo.Mirror
	var mirrorTemp string // the cache directory New made, removed on shutdown
	if s3repo.IsURL(cfg.ModelRepository) {
		var err error
		if mirror, mirrorTemp, err = openMirror(cfg); err != nil {
			return nil, fmt.Errorf("serving: %w", err)
		}
		repoDir = mirror.Dir()
		built := false
		defer func() {
			if !built {
				mirror.Close()
				if mirrorTemp != "" {
					os.RemoveAll(mirrorTemp)
				}
			}
		}()
		defer func() { built = retErr == nil }()
	}
	repo, err := repository.Open(repoDir)
	if err != nil {
		return nil, fmt.Errorf("serving: %w", err)
	}
	if mirror != nil {
		repo.SetRemote(mirror)
	}
	policy, err := auth.New(cfg.Auth)
	if err != nil {
		return nil, fmt.Errorf("serving: %w", err)
	}
	s := &Server{cfg: cfg, addrs: addrs, log: cfg.Logger, stop: make(chan struct{}), stopReq: make(chan context.Context, 1),
		repoDir: repoDir, mirror: mirror, mirrorTemp: mirrorTemp}
	if cfg.TLSCertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCertFile, cfg.TLSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("serving: TLS certificate %s, key %s: %w", cfg.TLSCertFile, cfg.TLSKeyFile, err)
		}
		s.tls = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	s.mgr = manager.New(repo, manager.Options{Logger: cfg.Logger})
	if cfg.Registry != "" {
		if err := s.openRegistry(); err != nil {
			s.mgr.Close()
			return nil, fmt.Errorf("serving: registry: %w", err)
		}
		if s.pipes, err = s.newPipelines(); err != nil {
			s.mgr.Close()
			s.registry.Close()
			return nil, fmt.Errorf("serving: %w", err)
		}
	}
	if s.rollouts, err = s.newRollouts(); err != nil {
		s.mgr.Close()
		if s.registry != nil {
			s.registry.Close()
		}
		return nil, fmt.Errorf("serving: %w", err)
	}
	lim := cfg.Limits.WithDefaults()
	gate := limits.NewGate(lim.MaxInflightBytes)
	s.gate, s.streams = gate, limits.NewStreams(lim.MaxStreams)
	gopts := append([]grpc.ServerOption{
		grpc.MaxRecvMsgSize(cfg.MaxMessageBytes),
		grpc.MaxSendMsgSize(cfg.MaxMessageBytes),
		grpc.MaxConcurrentStreams(lim.MaxConcurrentStreams),
	}, kstatus.ServerOptions()...) // outermost: every error leaves with its code and a bounded message
	gopts = append(gopts, grpccodec.New().ServerOptions()...) // then: malformed messages → INVALID_ARGUMENT
	gopts = append(gopts, policy.GRPCServerOptions(auth.KServeScope)...)
	// After auth: an unauthenticated request holds no admission.
	gopts = append(gopts, grpc.ChainUnaryInterceptor(gate.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(s.streams.StreamServerInterceptor()))
	if s.tls != nil {
		gopts = append(gopts, grpc.Creds(credentials.NewTLS(s.tls)))
	}
	s.grpc = grpc.NewServer(gopts...)
	svc := grpcserver.New(s.mgr, grpcserver.Options{
		Name: cfg.Name, Version: core.Version, Ready: s.Ready, Logger: cfg.Logger, Stopping: s.stop,
		MaxInputs: lim.MaxInputs, MaxTensorElements: lim.MaxTensorElements, Gate: gate,
	})
	svc.Register(s.grpc)
	healthpb.RegisterHealthServer(s.grpc, &healthService{s: s})
	if addrs.http != "" {
		hopts := httpserver.Options{Auth: policy, MaxBodyBytes: int64(cfg.MaxMessageBytes),
			MaxDecompressedBytes: lim.MaxDecompressedBytes, Gate: gate, Logger: cfg.Logger}
		if s.registry != nil {
			hopts.Registry = s.registry
			hopts.RegistryStatus = func() any { return s.follower.Status() }
		}
		if addrs.flight != "" {
			hopts.Datasets = flightDatasets{s}
		}
		hopts.Rollouts = s.rollouts
		h := httpserver.New(svc, hopts)
		var handler http.Handler = withConsole(h, console.New(console.Options{Logger: cfg.Logger}))
		if cfg.SinglePort {
			handler = grpcOrREST(s.grpc, handler)
		}
		s.http = &http.Server{
			Handler: handler, TLSConfig: s.tls, ReadHeaderTimeout: lim.ReadHeaderTimeout, ReadTimeout: lim.ReadTimeout,
			IdleTimeout: 5 * time.Minute, MaxHeaderBytes: 1 << 20,
			ErrorLog: slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelWarn),
		}
		if cfg.SinglePort {
			singlePort(s.http, lim.MaxConcurrentStreams)
		}
	}
	if addrs.metrics != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", metrics.Handler(s.mgr, metrics.NewAdmissionCollector(s.gate, s.streams)))
		s.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second,
			ErrorLog: slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelWarn)}
	}
	if addrs.flight != "" {
		if s.flight, err = s.newFlight(policy); err != nil {
			s.mgr.Close()
			if s.registry != nil {
				s.registry.Close()
			}
			return nil, fmt.Errorf("serving: flight (a Flight port of -1 turns it off): %w", err)
		}
	}
	return s, nil
}

// newFlight builds the Flight service over the server's model manager,
// with Kiln's trainer unless Config.FlightTrainer names another.
func (s *Server) newFlight(policy *auth.Policy) (*flightserver.Server, error) {
	trainer := s.cfg.FlightTrainer
	if trainer == nil && !s.cfg.DisableFlightTraining {
		mt, err := flightserver.NewModelTrainer(flightserver.ModelTrainerOptions{
			Repository: s.repoDir, Load: s.mgr.Load, Registry: s.registry,
		})
		if err != nil {
			return nil, err
		}
		trainer = mt
	}
	if s.cfg.DisableFlightTraining {
		trainer = nil
	}
	var pipes flightserver.PipelineRunner
	var committed func(flightserver.DatasetInfo)
	if s.pipes != nil {
		pipes, committed = s.pipes, s.pipes.committed
	}
	return flightserver.New(flightserver.Options{
		Pipelines: pipes, OnDatasetCommitted: committed,
		DataDir: s.cfg.DataDir, Addr: s.addrs.flight, Models: flightserver.ManagerModels(s.mgr),
		Trainer: trainer, Auth: policy, TLSConfig: s.tls, MaxMessageBytes: s.cfg.MaxMessageBytes, Logger: s.log,
		MaxTensorElements: s.cfg.Limits.WithDefaults().MaxTensorElements, MaxConcurrentStreams: s.cfg.Limits.WithDefaults().MaxConcurrentStreams,
		Gate: s.gate, Streams: s.streams,
	})
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

// Start listens (gRPC, then HTTP, metrics and Flight when configured),
// then loads the models (the server is live but not ready meanwhile), and
// serves in the background until Shutdown. In ControlPoll mode it then
// polls the repository.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	if s.started {
		s.mu.Unlock()
		return errors.New("serving: already started")
	}
	s.started = true
	s.mu.Unlock()
	threads := s.cfg.IntraOpThreads
	if threads <= 0 {
		threads = s.autoThreads()
	}
	if err := core.SetNumThreads(threads); err != nil {
		return fmt.Errorf("serving: intra-op threads: %w", err)
	}
	if err := s.listen(ctx); err != nil {
		return err
	}
	s.serveAll()
	if s.mirror != nil {
		// The first sync must list the bucket: a wrong endpoint, wrong
		// credentials or a missing bucket stop the server here, clearly.
		if err := s.mirror.Sync(ctx); err != nil {
			s.closeListeners()
			s.mgr.Close()
			if s.registry != nil {
				s.registry.Close()
			}
			s.removeMirrorTemp()
			return fmt.Errorf("serving: %w", err)
		}
	}
	if err := s.loadModels(); err != nil {
		s.closeListeners()
		s.mgr.Close()
		if s.registry != nil {
			s.registry.Close()
		}
		return fmt.Errorf("serving: %w", err)
	}
	if s.cfg.ModelControl == ControlPoll {
		s.pollDone = make(chan struct{})
		go s.poll()
	}
	if s.follower != nil {
		// The first pass loads what the alias names before the server
		// turns ready; a failure is logged (the follower retries).
		if err := s.follower.Sync(ctx); err != nil {
			s.log.Error("registry: some aliases cannot be served yet", "err", err)
		}
		s.followDone = make(chan struct{})
		go func() {
			defer close(s.followDone)
			fctx, cancel := context.WithCancel(context.Background())
			go func() { <-s.stop; cancel() }()
			s.follower.Run(fctx)
		}()
	}
	// Rollouts after the follower's first pass: a rollout resumed after a
	// restart finds its models loaded and the registry's aliases served.
	if err := s.rollouts.Resume(ctx); err != nil {
		s.log.Error("rollouts: state not read", "err", err)
	}
	s.rollouts.RestoreRoutes()
	s.rollouts.Analyse(ctx)
	s.rollDone = make(chan struct{})
	go func() {
		defer close(s.rollDone)
		rctx, cancel := context.WithCancel(context.Background())
		go func() { <-s.stop; cancel() }()
		s.rollouts.Run(rctx)
	}()
	s.mu.Lock()
	s.ready = true
	s.mu.Unlock()
	s.log.Info("server started", "ready", s.Ready())
	return nil
}

// listen opens every listener, or none.
func (s *Server) listen(ctx context.Context) error {
	var lc net.ListenConfig
	var opened []net.Listener
	listen := func(what, addr string) (net.Listener, error) {
		if addr == "" {
			return nil, nil
		}
		l, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			for _, o := range opened {
				o.Close()
			}
			return nil, fmt.Errorf("serving: %s listener on %s: %w", what, addr, err)
		}
		opened = append(opened, l)
		return l, nil
	}
	lis, err := listen("gRPC", s.addrs.grpc)
	if err != nil {
		return err
	}
	httpLis, err := listen("HTTP", s.addrs.http)
	if err != nil {
		return err
	}
	metLis, err := listen("metrics", s.addrs.metrics)
	if err != nil {
		return err
	}
	if s.flight != nil {
		if err := s.flight.Start(ctx); err != nil {
			for _, o := range opened {
				o.Close()
			}
			return fmt.Errorf("serving: flight listener on %s: %w", s.addrs.flight, err)
		}
	}
	s.mu.Lock()
	s.lis, s.httpLis, s.metLis = lis, httpLis, metLis
	s.serveErr = make(chan error, 3)
	s.mu.Unlock()
	return nil
}

// serveAll serves gRPC, HTTP and metrics on their listeners in the
// background (Flight serves from its own Start).
func (s *Server) serveAll() {
	grpcAddr := "off (single port)"
	if s.lis != nil {
		go func() {
			if err := s.grpc.Serve(s.lis); err != nil {
				s.serveErr <- fmt.Errorf("gRPC server: %w", err)
			}
		}()
		grpcAddr = s.lis.Addr().String()
	}
	scheme := "http"
	if s.tls != nil {
		scheme = "https"
	}
	s.log.Info("gRPC inference service listening", "addr", grpcAddr, "tls", s.tls != nil, "repository", s.cfg.ModelRepository,
		"max_message_bytes", s.cfg.MaxMessageBytes, "intra_op_threads", core.NumThreads(), "cpus", runtime.NumCPU(),
		"model_control", s.cfg.ModelControl, "auth", s.cfg.Auth.Token != "" || s.cfg.Auth.TokenFile != "" || len(s.cfg.Auth.Users) > 0,
		"auth_inference", s.cfg.Auth.Inference)
	if s.httpLis != nil {
		go func() {
			var err error
			if s.tls != nil {
				err = s.http.ServeTLS(s.httpLis, "", "")
			} else {
				err = s.http.Serve(s.httpLis)
			}
			if !errors.Is(err, http.ErrServerClosed) {
				s.serveErr <- fmt.Errorf("HTTP server: %w", err)
			}
		}()
		s.log.Info("HTTP/REST inference service listening", "url", scheme+"://"+s.httpLis.Addr().String()+"/v2", "grpc_too", s.cfg.SinglePort)
	}
	if s.metLis != nil {
		go func() {
			if err := s.metrics.Serve(s.metLis); !errors.Is(err, http.ErrServerClosed) {
				s.serveErr <- fmt.Errorf("metrics server: %w", err)
			}
		}()
		s.log.Info("Prometheus metrics listening", "url", "http://"+s.metLis.Addr().String()+"/metrics")
	}
}

// loadModels loads the models the model control mode names; a failure is
// an error only with StrictModelLoad (otherwise it is logged and the
// server stays not ready).
func (s *Server) loadModels() error {
	var loadErr error
	if s.cfg.ModelControl == ControlExplicit {
		var errs []error
		for _, n := range s.cfg.StartupModels {
			errs = append(errs, s.mgr.Load(n))
		}
		loadErr = errors.Join(errs...)
	} else {
		loadErr = s.mgr.LoadAll()
	}
	if loadErr != nil && !s.cfg.StrictModelLoad {
		s.log.Error("some models failed to load", "err", loadErr)
		return nil
	}
	return loadErr
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
	if s.flight != nil {
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // an ended context: stop at once
		s.flight.Shutdown(ctx)
	}
}

// autoThreads returns max(1, CPUs / instances), instances being the largest
// instance_count among the models Start loads.
func (s *Server) autoThreads() int {
	names := s.cfg.StartupModels
	if s.cfg.ModelControl != ControlExplicit {
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

// openRegistry opens Config.Registry and makes the follower of its alias.
func (s *Server) openRegistry() error {
	key, err := registry.LoadKey(s.cfg.registryKey, s.cfg.RegistryKeyFile)
	if err != nil {
		return err
	}
	reg, err := registry.Open(context.Background(), s.cfg.Registry, registry.Options{
		ArtifactDir: s.cfg.RegistryArtifacts, S3PathStyle: s.cfg.S3PathStyle, Key: key, Logger: s.log})
	if err != nil {
		return err
	}
	f, err := follower.New(follower.Options{Registry: reg, Manager: s.mgr, Repository: s.repoDir,
		Alias: s.cfg.ServeAlias, Interval: s.cfg.RegistryPollInterval, Grace: s.cfg.RollbackGrace, Logger: s.log})
	if err != nil {
		reg.Close()
		return err
	}
	s.registry, s.follower = reg, f
	return nil
}

// newRollouts makes the rollout controller (package rollout) of the
// server's models: policies from Config.RolloutPolicy, state kept in
// Config.RolloutState, the registry and its follower when set.
func (s *Server) newRollouts() (*rollout.Controller, error) {
	o := rollout.Options{Manager: s.mgr, StateDir: s.cfg.RolloutState, Logger: s.log}
	if s.cfg.RolloutPolicy != "" {
		b, err := os.ReadFile(s.cfg.RolloutPolicy)
		if err != nil {
			return nil, core.Errorf(core.InvalidArgument, "rollout policy: %v", err)
		}
		if o.Policies, err = rollout.ParsePolicies(b); err != nil {
			return nil, fmt.Errorf("%s: %w", s.cfg.RolloutPolicy, err)
		}
	}
	if s.registry != nil {
		o.Registry, o.Installer, o.Auto = s.registry, s.follower, !s.cfg.RolloutManual
	}
	return rollout.New(o)
}

// Rollouts returns the server's rollout controller.
func (s *Server) Rollouts() *rollout.Controller { return s.rollouts }

// Follower returns the registry follower, or nil without Config.Registry.
func (s *Server) Follower() *follower.Follower { return s.follower }

// poll runs Manager.Poll every PollInterval until Shutdown.
func (s *Server) poll() {
	defer close(s.pollDone)
	t := time.NewTicker(s.cfg.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		if s.mirror != nil {
			// A failure is logged and reported in the models' status
			// (Manager.Poll sees it in the fingerprint); what was in
			// place keeps serving.
			ctx, cancel := context.WithCancel(context.Background())
			go func() {
				select {
				case <-s.stop:
					cancel()
				case <-ctx.Done():
				}
			}()
			s.mirror.Sync(ctx)
			cancel()
		}
		if err := s.mgr.Poll(); err != nil {
			s.log.Warn("repository poll: some models failed to load", "err", err)
		}
	}
}

// GRPCAddr returns the address the gRPC service listens on, or nil before
// Start or when its own port is off (Config.SinglePort: gRPC is then on
// HTTPAddr).
func (s *Server) GRPCAddr() net.Addr { return s.addr(&s.lis) }

// HTTPAddr returns the address the HTTP service listens on, or nil before
// Start or without HTTP.
func (s *Server) HTTPAddr() net.Addr { return s.addr(&s.httpLis) }

// MetricsAddr returns the address /metrics is served on, or nil before
// Start or without metrics.
func (s *Server) MetricsAddr() net.Addr { return s.addr(&s.metLis) }

// FlightAddr returns the address Arrow Flight listens on, or nil before
// Start or without Flight.
func (s *Server) FlightAddr() net.Addr {
	if s.flight == nil {
		return nil
	}
	return s.flight.Addr()
}

// Flight returns the Flight service (datasets, jobs), or nil without
// Flight.
func (s *Server) Flight() *flightserver.Server { return s.flight }

// Config returns the server's configuration, defaults filled in.
func (s *Server) Config() Config { return s.cfg }

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

// Shutdown turns the server not ready (health checks say NOT_SERVING at
// once), stops every listener from accepting connections and requests —
// gRPC, HTTP, metrics and Flight together — lets requests and streams in
// flight finish (until ctx ends, when the rest are cancelled), then
// unloads every model.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.ready = false
	s.mu.Unlock()
	s.stopOnce.Do(func() { close(s.stop) })
	s.pipes.close() // a continuous training run in progress is cancelled (and recorded KILLED)
	if s.pollDone != nil {
		<-s.pollDone
	}
	if s.followDone != nil {
		<-s.followDone
	}
	if s.rollDone != nil {
		<-s.rollDone
	}
	var wg sync.WaitGroup
	var httpErr, flightErr error
	if s.http != nil {
		wg.Go(func() { httpErr = s.http.Shutdown(ctx) })
	}
	if s.metrics != nil {
		wg.Go(func() { s.metrics.Shutdown(ctx) })
	}
	if s.flight != nil {
		wg.Go(func() { flightErr = s.flight.Shutdown(ctx) })
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
	if flightErr != nil {
		err = errors.Join(err, fmt.Errorf("flight shutdown: %w", flightErr))
	}
	s.mgr.Close()
	if s.registry != nil {
		s.registry.Close()
	}
	s.removeMirrorTemp()
	s.log.Info("server stopped")
	return err
}

// Stop makes Run return: the server shuts down as when Run's context ends,
// but ctx (not Config.ShutdownTimeout) bounds the wait for requests in
// flight. It returns at once; a second Stop, or a Stop after Run has
// begun to shut down, does nothing.
func (s *Server) Stop(ctx context.Context) {
	select {
	case s.stopReq <- ctx:
	default:
	}
}

// Run serves cfg until ctx ends (on SIGTERM, say), then shuts the server
// down gracefully, waiting at most cfg.ShutdownTimeout (when set) for
// requests in flight, and returns nil; cfg.Started, when set, is called
// once the server has started. It is the one composition of Kiln's
// services: `kiln serve`, Python's kiln.serve and the test servers all run
// it. A listener that fails while serving stops the server with an error.
func Run(ctx context.Context, cfg Config) error {
	s, err := New(cfg)
	if err != nil {
		return err
	}
	if err := s.Start(ctx); err != nil {
		return err
	}
	if cfg.Started != nil {
		cfg.Started(s)
	}
	sctx, cancel := context.WithoutCancel(ctx), context.CancelFunc(func() {})
	select {
	case <-ctx.Done():
		if cfg.ShutdownTimeout > 0 {
			sctx, cancel = context.WithTimeout(sctx, cfg.ShutdownTimeout)
		}
	case sctx = <-s.stopReq:
	case err := <-s.serveErr:
		s.closeListeners()
		s.mgr.Close()
		return fmt.Errorf("serving: %w", err)
	}
	defer cancel()
	if err := s.Shutdown(sctx); err != nil {
		return fmt.Errorf("serving: shutdown: %w", err)
	}
	return nil
}

// withConsole serves the console (serving/console) on the HTTP port beside
// the v2 REST API: /v2 and everything under it stay the API's (its own 404
// for unknown paths), the console answers its pages and assets, and every
// other path is the API's JSON 404.
func withConsole(api, c http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		if p == "/v2" || strings.HasPrefix(p, "/v2/") || !(console.IsPage(p) || strings.HasPrefix(p, "/console/")) {
			api.ServeHTTP(w, r)
			return
		}
		c.ServeHTTP(w, r)
	})
}

// flightDatasets lists the Flight service's stored datasets for GET
// /v2/datasets (httpserver.Datasets).
type flightDatasets struct{ s *Server }

func (d flightDatasets) Datasets() ([]httpserver.Dataset, error) {
	if d.s.flight == nil {
		return nil, nil
	}
	infos, err := d.s.flight.Datasets()
	if err != nil {
		return nil, core.Errorf(core.Internal, "datasets: %v", err)
	}
	out := make([]httpserver.Dataset, 0, len(infos))
	for _, in := range infos {
		ds := httpserver.Dataset{Name: in.Name, Rows: in.Rows, Batches: in.Batches, Bytes: in.Bytes}
		if st, err := os.Stat(in.Path); err == nil {
			ds.Modified = st.ModTime().UTC()
		}
		if in.Schema != nil {
			for _, f := range in.Schema.Fields() {
				ds.Schema = append(ds.Schema, httpserver.DatasetField{Name: f.Name, Type: f.Type.String(), Nullable: f.Nullable})
			}
		}
		out = append(out, ds)
	}
	return out, nil
}
