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
	if o.shutdownGrace > 0 {
		return serveWithGrace(ctx, opts, started, o.shutdownGrace)
	}
	if err := serving.Serve(ctx, opts, started); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// serveWithGrace is serving.Serve with a bound on the wait for requests in
// flight at shutdown.
func serveWithGrace(ctx context.Context, opts serving.Options, started func(*serving.Server), grace time.Duration) error {
	s, err := serving.New(opts)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if err := s.Start(ctx); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	started(s)
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := s.Shutdown(sctx); err != nil {
		return fmt.Errorf("serve: shutdown: %w", err)
	}
	return nil
}
