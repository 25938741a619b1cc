package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving"
)

// defaultRepositories are tried, in order, when --model-repository is not
// given: ./models, then the demo repository `make run` builds.
var defaultRepositories = []string{"models", "build/repository"}

type serveOptions struct {
	repository    string
	host          string
	grpcPort      int
	httpPort      int
	metricsPort   int
	control       string
	pollSecs      float64
	loadModels    []string
	strict        bool
	authToken     string
	tlsCert       string
	tlsKey        string
	maxMsgBytes   int
	logFormat     string
	shutdownGrace time.Duration
	flightPort    int
	dataDir       string
}

func newServeCmd() *cobra.Command {
	var o serveOptions
	cmd := &cobra.Command{
		Use:   "serve [--model-repository DIR]",
		Short: "Serve a model repository over KServe v2 gRPC and HTTP/REST, with Prometheus metrics",
		Long: `Serves the models of a repository (<repo>/<model>/config.yaml and
<repo>/<model>/<version>/model.pt) with the KServe v2 / Triton protocols:
gRPC on --grpc-port, HTTP/REST on --http-port, Prometheus /metrics on
--metrics-port (a port of -1 turns that listener off, 0 picks a free one).
Requests to a model are batched dynamically as its config.yaml says.

The server is live at once and ready once every model has loaded and
warmed up. SIGTERM or SIGINT stops it gracefully: no new requests, those
in flight finish, then it exits 0.

Model control: "none" loads every model at start; "poll" also watches the
repository every --repository-poll-secs and reloads what changed;
"explicit" loads only --load-model models, clients load the rest with the
repository API. --auth-token guards that API (index, load, unload) with a
bearer token; --tls-cert/--tls-key serve gRPC and HTTP over TLS.

Arrow Flight on --flight-port shares the models and batchers: DoPut stores
datasets under --data-dir, DoExchange streams predictions, DoAction "train"
trains a model on a stored dataset into the repository as its next version
and loads it. --auth-token and TLS apply to Flight as well.

--threads (libtorch intra-op threads) defaults to CPUs / instance_count.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			threads, err := cmd.Flags().GetInt("threads")
			if err != nil {
				return err
			}
			if o.authToken == "" {
				o.authToken = os.Getenv("KILN_AUTH_TOKEN")
			}
			return runServe(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), o, threads)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.repository, "model-repository", "", "model repository directory (default ./models, else build/repository, which make run builds)")
	f.StringVar(&o.host, "host", "", "address to listen on (default all interfaces)")
	f.IntVar(&o.grpcPort, "grpc-port", 8001, "gRPC port (0: any free port)")
	f.IntVar(&o.httpPort, "http-port", 8000, "HTTP/REST port (-1: off, 0: any free port)")
	f.IntVar(&o.metricsPort, "metrics-port", 8002, "Prometheus /metrics port (-1: off, 0: any free port)")
	f.StringVar(&o.control, "model-control-mode", serving.ControlNone, "model control: none, poll or explicit")
	f.Float64Var(&o.pollSecs, "repository-poll-secs", serving.DefaultPollInterval.Seconds(), "poll mode: seconds between repository scans")
	f.StringArrayVar(&o.loadModels, "load-model", nil, "explicit mode: a model to load at start (repeatable)")
	f.BoolVar(&o.strict, "strict-model-config", false, "exit when a model fails to load, instead of serving the others (not ready)")
	f.StringVar(&o.authToken, "auth-token", "", "bearer token the repository API (index, load, unload) needs (default $KILN_AUTH_TOKEN)")
	f.StringVar(&o.tlsCert, "tls-cert", "", "PEM certificate for TLS on gRPC and HTTP")
	f.StringVar(&o.tlsKey, "tls-key", "", "PEM private key for TLS on gRPC and HTTP")
	f.IntVar(&o.maxMsgBytes, "max-message-bytes", serving.DefaultMaxMessageBytes, "largest gRPC message / HTTP body in bytes")
	f.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	f.IntVar(&o.flightPort, "flight-port", 8815, "Arrow Flight port: datasets, batch inference, training jobs (-1: off, 0: any free port)")
	f.StringVar(&o.dataDir, "data-dir", "kiln-data", "directory of the datasets uploaded over Flight")
	f.DurationVar(&o.shutdownGrace, "shutdown-timeout", 0, "longest wait for requests in flight on shutdown (0: no limit)")
	return cmd
}

func listenAddr(host string, port int) (string, error) {
	switch {
	case port < -1 || port > 65535:
		return "", fmt.Errorf("port %d is not within -1..65535", port)
	case port == -1:
		return "", nil
	}
	return net.JoinHostPort(host, strconv.Itoa(port)), nil
}

func pickRepository(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	for _, d := range defaultRepositories {
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			return d, nil
		}
	}
	return "", fmt.Errorf("no --model-repository given and none of %v exists (`make run` builds the demo repository build/repository)", defaultRepositories)
}

func runServe(ctx context.Context, stdout, stderr io.Writer, o serveOptions, threads int) error {
	if ctx == nil {
		ctx = context.Background()
	}
	level := slog.LevelInfo
	if slog.Default().Enabled(ctx, slog.LevelDebug) { // --verbose
		level = slog.LevelDebug
	}
	var log *slog.Logger
	switch o.logFormat {
	case "text":
		log = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	case "json":
		log = slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	default:
		return fmt.Errorf("serve: --log-format %q: want text or json", o.logFormat)
	}
	repo, err := pickRepository(o.repository)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if o.grpcPort == -1 {
		return errors.New("serve: --grpc-port -1: the gRPC service cannot be turned off")
	}
	grpcAddr, err := listenAddr(o.host, o.grpcPort)
	if err != nil {
		return fmt.Errorf("serve: --grpc-port: %w", err)
	}
	httpAddr, err := listenAddr(o.host, o.httpPort)
	if err != nil {
		return fmt.Errorf("serve: --http-port: %w", err)
	}
	metricsAddr, err := listenAddr(o.host, o.metricsPort)
	if err != nil {
		return fmt.Errorf("serve: --metrics-port: %w", err)
	}
	if o.pollSecs <= 0 {
		return fmt.Errorf("serve: --repository-poll-secs %g: want a positive number", o.pollSecs)
	}
	if threads < 0 {
		return fmt.Errorf("serve: --threads %d: want ≥ 0", threads)
	}
	opts := serving.Options{
		ModelRepository: repo,
		GRPCAddr:        grpcAddr,
		HTTPAddr:        httpAddr,
		MetricsAddr:     metricsAddr,
		MaxMessageBytes: o.maxMsgBytes,
		ModelControl:    o.control,
		PollInterval:    time.Duration(o.pollSecs * float64(time.Second)),
		StartupModels:   o.loadModels,
		StrictModelLoad: o.strict,
		IntraOpThreads:  threads,
		AuthToken:       o.authToken,
		TLSCertFile:     o.tlsCert,
		TLSKeyFile:      o.tlsKey,
		Logger:          log,
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	started := func(s *serving.Server) {
		scheme := "http"
		if s.TLS() {
			scheme = "https"
		}
		fmt.Fprintf(stdout, "kiln serve: repository %s\n", repo)
		fmt.Fprintf(stdout, "kiln serve: gRPC     %s\n", s.GRPCAddr())
		if a := s.HTTPAddr(); a != nil {
			fmt.Fprintf(stdout, "kiln serve: HTTP     %s://%s/v2\n", scheme, a)
		}
		if a := s.MetricsAddr(); a != nil {
			fmt.Fprintf(stdout, "kiln serve: metrics  http://%s/metrics\n", a)
		}
		ready := "ready"
		if !s.Ready() {
			ready = "NOT ready (a model failed to load; see the log and the repository index)"
		}
		fmt.Fprintf(stdout, "kiln serve: %s; SIGTERM or Ctrl-C stops it\n", ready)
	}
	flightAddr, err := listenAddr(o.host, o.flightPort)
	if err != nil {
		return fmt.Errorf("serve: --flight-port: %w", err)
	}
	return serveAll(ctx, opts, started, o, flightAddr, stdout, log)
}

// serveAll runs the inference server and, unless flightAddr is empty, the
// Arrow Flight service over the same models, until ctx ends; then it stops
// Flight first (the manager must outlive it), then the server, waiting at
// most --shutdown-timeout (when set) for requests in flight.
func serveAll(ctx context.Context, opts serving.Options, started func(*serving.Server), o serveOptions,
	flightAddr string, stdout io.Writer, log *slog.Logger) error {
	s, err := serving.New(opts)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if err := s.Start(ctx); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	shutdownCtx := func() (context.Context, context.CancelFunc) {
		if o.shutdownGrace > 0 {
			return context.WithTimeout(context.Background(), o.shutdownGrace)
		}
		return context.WithCancel(context.Background())
	}
	var fs *flightserver.Server
	if flightAddr != "" {
		trainer, err := flightserver.NewModelTrainer(flightserver.ModelTrainerOptions{
			Repository: opts.ModelRepository,
			Load:       s.Manager().Load,
		})
		if err == nil {
			fopts := flightserver.Options{
				DataDir: o.dataDir, Addr: flightAddr, Models: flightserver.ManagerModels(s.Manager()),
				Trainer: trainer, CertFile: o.tlsCert, KeyFile: o.tlsKey,
				MaxMessageBytes: o.maxMsgBytes, Logger: log,
			}
			if opts.AuthToken != "" {
				fopts.Auth = &flightserver.Auth{Tokens: map[string]string{opts.AuthToken: "kiln"}}
			}
			if fs, err = flightserver.New(fopts); err == nil {
				err = fs.Start(ctx)
			}
		}
		if err != nil {
			sctx, cancel := shutdownCtx()
			defer cancel()
			s.Shutdown(sctx)
			return fmt.Errorf("serve: flight (--flight-port -1 turns it off): %w", err)
		}
	}
	if fs != nil {
		fmt.Fprintf(stdout, "kiln serve: Flight   grpc://%s (datasets in %s)\n", fs.Addr(), o.dataDir)
	}
	started(s) // last: its final line says the server is up
	<-ctx.Done()
	sctx, cancel := shutdownCtx()
	defer cancel()
	if fs != nil {
		if err := fs.Shutdown(sctx); err != nil {
			log.Warn("flight shutdown", "err", err)
		}
	}
	if err := s.Shutdown(sctx); err != nil {
		return fmt.Errorf("serve: shutdown: %w", err)
	}
	return nil
}
