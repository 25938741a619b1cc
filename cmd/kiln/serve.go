package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/serving"
	"github.com/kilnml/kiln/serving/follower"
)

// defaultRepositories are tried, in order, when --model-repository is not
// given: ./models, then the demo repository `make run` builds.
var defaultRepositories = []string{"models", "build/repository"}

// serveFlags are `kiln serve`'s flags that are not serving.Config fields
// as they stand (ports and durations in the CLI's own units).
type serveFlags struct {
	pollSecs  float64
	logFormat string
}

func newServeCmd() *cobra.Command {
	cfg := serving.DefaultConfig()
	var o serveFlags
	cmd := &cobra.Command{
		Use:   "serve [--model-repository DIR]",
		Short: "Serve a model repository over KServe v2 gRPC and HTTP/REST, Arrow Flight, with Prometheus metrics",
		Long: `Serves the models of a repository (<repo>/<model>/config.yaml and
<repo>/<model>/<version>/model.pt) with the KServe v2 / Triton protocols:
gRPC on --grpc-port, HTTP/REST on --http-port, Prometheus /metrics on
--metrics-port (a port of -1 turns that listener off, 0 picks a free one).
--single-port serves gRPC on the HTTP port too (HTTP/1.1, h2c and, with
TLS, ALPN h2 on one listener; --grpc-port -1 then closes gRPC's own port).

The repository may be s3://bucket/prefix, in S3-compatible storage
(AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, KILN_S3_PATH_STYLE): it is mirrored into --repository-cache,
a version appearing once its .kiln-complete marker exists (see kiln
repository push); with poll mode it is synced every --repository-poll-secs,
and the last good versions keep serving whatever fails.
Requests to a model are batched dynamically as its config.yaml says.

The server is live at once and ready once every model has loaded and
warmed up. SIGTERM or SIGINT stops it gracefully: it turns not ready, no
new requests, those in flight finish, then it exits 0.

Model control: "none" loads every model at start; "poll" also watches the
repository every --repository-poll-secs and reloads what changed;
"explicit" loads only --load-model models, clients load the rest with the
repository API.

Authentication: --auth-token (or --auth-token-file, $KILN_AUTH_TOKEN,
$KILN_AUTH_TOKEN_FILE; at least 16 characters) is one policy over gRPC,
HTTP and Flight: the repository API (index, load, unload) and Flight's
datasets and training jobs need the bearer token; with --auth-inference
inference and model metadata need it too. Health and server metadata never
do. Without a token, those control calls are taken only from this host
(loopback); other hosts get PERMISSION_DENIED / 403. --tls-cert/--tls-key
serve gRPC, HTTP and Flight over TLS.

Arrow Flight on --flight-port shares the models and batchers: DoPut stores
datasets under --data-dir, DoExchange streams predictions, DoAction "train"
trains a model on a stored dataset into the repository as its next version
and loads it.

Registry: with --registry, every registered model with the alias
--serve-alias (production) is installed into the repository under its
registry version number (its artifact's SHA-256 verified) and answers the
requests that name no version. When the alias moves, the new version loads
and warms up before it switches; the previous one stays loaded for
--rollback-grace, so that moving the alias back is immediate.

--threads (libtorch intra-op threads; default $KILN_NUM_THREADS, else
CPUs / instance_count) and --host accept IPv6 ("::1" or "[::1]").`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			threads, err := cmd.Flags().GetInt("threads")
			if err != nil {
				return err
			}
			vars, err := kilnenv.Load(os.Getenv)
			if err != nil {
				return fmt.Errorf("serve: %w", err)
			}
			cfg.IntraOpThreads = threads
			cfg.ApplyEnv(vars)
			return runServe(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), cfg, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.ModelRepository, "model-repository", "", "model repository: a directory (default ./models, else build/repository, which make run builds) or s3://bucket/prefix")
	f.StringVar(&cfg.RepositoryCache, "repository-cache", "", "with an s3:// repository: local directory its models are downloaded into, reused across restarts (default: a temporary directory)")
	f.StringVar(&cfg.Host, "host", cfg.Host, "address to listen on (default all interfaces; IPv6 as ::1 or [::1])")
	f.IntVar(&cfg.GRPCPort, "grpc-port", cfg.GRPCPort, "gRPC port (0: any free port; -1: off, with --single-port)")
	f.BoolVar(&cfg.SinglePort, "single-port", false, "serve gRPC on the HTTP port too (HTTP/1.1, h2c and TLS ALPN h2 on one listener; for KServe serverless)")
	f.IntVar(&cfg.HTTPPort, "http-port", cfg.HTTPPort, "HTTP/REST port (-1: off, 0: any free port)")
	f.IntVar(&cfg.MetricsPort, "metrics-port", cfg.MetricsPort, "Prometheus /metrics port (-1: off, 0: any free port)")
	f.IntVar(&cfg.FlightPort, "flight-port", cfg.FlightPort, "Arrow Flight port: datasets, batch inference, training jobs (-1: off, 0: any free port)")
	f.StringVar(&cfg.ModelControl, "model-control-mode", cfg.ModelControl, "model control: none, poll or explicit")
	f.Float64Var(&o.pollSecs, "repository-poll-secs", cfg.PollInterval.Seconds(), "poll mode: seconds between repository scans")
	f.StringArrayVar(&cfg.StartupModels, "load-model", nil, "explicit mode: a model to load at start (repeatable)")
	f.BoolVar(&cfg.StrictModelLoad, "strict-model-config", false, "exit when a model fails to load, instead of serving the others (not ready)")
	f.StringVar(&cfg.Auth.Token, "auth-token", "", "bearer token (≥ 16 characters) of the repository API and Flight datasets/jobs (default $KILN_AUTH_TOKEN)")
	f.StringVar(&cfg.Auth.TokenFile, "auth-token-file", "", "file holding the bearer token (default $KILN_AUTH_TOKEN_FILE)")
	f.BoolVar(&cfg.Auth.Inference, "auth-inference", false, "inference and model metadata need the bearer token too")
	f.StringVar(&cfg.TLSCertFile, "tls-cert", "", "PEM certificate for TLS on gRPC, HTTP and Flight")
	f.StringVar(&cfg.TLSKeyFile, "tls-key", "", "PEM private key for TLS on gRPC, HTTP and Flight")
	f.IntVar(&cfg.MaxMessageBytes, "max-message-bytes", cfg.MaxMessageBytes, "largest gRPC/Flight message and HTTP body in bytes (larger HTTP bodies: 413)")
	f.Int64Var(&cfg.MaxDecompressedBytes, "max-decompressed-bytes", cfg.MaxDecompressedBytes, "largest HTTP body once gzip/deflate-decoded, in bytes")
	f.IntVar(&cfg.MaxInputs, "max-inputs", cfg.MaxInputs, "most input tensors in one inference request")
	f.Int64Var(&cfg.MaxTensorElements, "max-tensor-elements", cfg.MaxTensorElements, "most elements in one input tensor (and rows in one Flight record batch)")
	f.Int64Var(&cfg.MaxInflightBytes, "max-inflight-bytes", cfg.MaxInflightBytes, "most bytes of inference requests admitted at once; beyond: RESOURCE_EXHAUSTED / HTTP 503")
	f.DurationVar(&cfg.ReadHeaderTimeout, "read-header-timeout", cfg.ReadHeaderTimeout, "longest time to read an HTTP request's headers")
	f.DurationVar(&cfg.ReadTimeout, "read-timeout", cfg.ReadTimeout, "longest time to read a whole HTTP request, body included")
	f.Uint32Var(&cfg.MaxConcurrentStreams, "max-concurrent-streams", cfg.MaxConcurrentStreams, "most concurrent gRPC/Flight streams per connection")
	f.IntVar(&cfg.MaxStreams, "max-streams", cfg.MaxStreams, "most client-streaming calls (ModelStreamInfer, Flight DoPut/DoExchange) open at once over the server; beyond: RESOURCE_EXHAUSTED")
	f.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&cfg.DataDir, "data-dir", cfg.DataDir, "directory of the datasets uploaded over Flight")
	f.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", 0, "longest wait for requests in flight on shutdown (0: no limit)")
	f.StringVar(&cfg.Registry, "registry", "", "serve the versions a model registry's alias names (a SQLite file, sqlite://PATH or postgres://...; see --serve-alias)")
	f.StringVar(&cfg.RegistryArtifacts, "registry-artifacts", "", "the registry's artifact root: a directory or s3://bucket/prefix (PostgreSQL: required, default $KILN_REGISTRY_ARTIFACTS; SQLite: artifacts/ beside the file)")
	f.StringVar(&cfg.RegistryKeyFile, "registry-key-file", "", "file holding the key of encrypted registry artifacts (default $KILN_REGISTRY_KEY_FILE)")
	f.StringVar(&cfg.ServeAlias, "serve-alias", follower.DefaultAlias, "with --registry: the alias whose versions are served")
	f.DurationVar(&cfg.RegistryPollInterval, "registry-poll-interval", follower.DefaultInterval, "with --registry: time between two polls of the registry")
	f.DurationVar(&cfg.RollbackGrace, "rollback-grace", follower.DefaultGrace, "with --registry: how long the version served before an alias move stays loaded (an immediate rollback)")
	f.StringVar(&cfg.Pipeline, "pipeline", "", "with --registry: continuous training: run this pipeline file (kiln pipeline run) on each commit of --watch-dataset")
	f.StringVar(&cfg.WatchDataset, "watch-dataset", "", "with --pipeline: the Flight dataset whose commits (DoPut) start a run (default: the pipeline's data.dataset)")
	f.DurationVar(&cfg.PipelineDebounce, "pipeline-debounce", serving.DefaultPipelineDebounce, "with --pipeline: start a run this long after the last commit; commits during a run queue one more run")
	f.StringVar(&cfg.RolloutPolicy, "rollout-policy", "", "rollout policy file (YAML/JSON: default and per-model steps, window, thresholds, shadow, sticky key; see kiln rollout --help)")
	f.StringVar(&cfg.RolloutState, "rollout-state", "", "directory keeping rollouts across restarts (default $KILN_HOME/rollouts)")
	f.BoolVar(&cfg.RolloutManual, "rollout-manual", false, "with --registry: do not start a rollout by itself when a model's candidate alias moves (kiln rollout start does)")
	return cmd
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

// runServe runs serving.Run with cfg until ctx ends or SIGTERM/SIGINT,
// printing the addresses once the server is up.
func runServe(ctx context.Context, stdout, stderr io.Writer, cfg serving.Config, o serveFlags) error {
	if ctx == nil {
		ctx = context.Background()
	}
	level := slog.LevelInfo
	if slog.Default().Enabled(ctx, slog.LevelDebug) { // --verbose
		level = slog.LevelDebug
	}
	switch o.logFormat {
	case "text":
		cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	case "json":
		cfg.Logger = slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	default:
		return fmt.Errorf("serve: --log-format %q: want text or json", o.logFormat)
	}
	applyMemoryLimit(cfg.Logger)
	repo, err := pickRepository(cfg.ModelRepository)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	cfg.ModelRepository = repo
	if o.pollSecs <= 0 {
		return fmt.Errorf("serve: --repository-poll-secs %g: want a positive number", o.pollSecs)
	}
	cfg.PollInterval = time.Duration(o.pollSecs * float64(time.Second))
	cfg.Started = func(s *serving.Server) { printStarted(stdout, s) }
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serving.Run(ctx, cfg); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// printStarted prints where the server listens; its last line says it is
// up (tests wait for it).
func printStarted(stdout io.Writer, s *serving.Server) {
	scheme := "http"
	if s.TLS() {
		scheme = "https"
	}
	cfg := s.Config()
	fmt.Fprintf(stdout, "kiln serve: repository %s\n", cfg.ModelRepository)
	if a := s.GRPCAddr(); a != nil {
		fmt.Fprintf(stdout, "kiln serve: gRPC     %s\n", a)
	}
	if a := s.HTTPAddr(); a != nil {
		fmt.Fprintf(stdout, "kiln serve: HTTP     %s://%s/v2\n", scheme, a)
		if cfg.SinglePort {
			fmt.Fprintf(stdout, "kiln serve: gRPC     %s (single port, with HTTP)\n", a)
		}
	}
	if a := s.MetricsAddr(); a != nil {
		fmt.Fprintf(stdout, "kiln serve: metrics  http://%s/metrics\n", a)
	}
	if a := s.FlightAddr(); a != nil {
		fmt.Fprintf(stdout, "kiln serve: Flight   grpc://%s (datasets in %s)\n", a, cfg.DataDir)
	}
	ready := "ready"
	if !s.Ready() {
		ready = "NOT ready (a model failed to load; see the log and the repository index)"
	}
	fmt.Fprintf(stdout, "kiln serve: %s; SIGTERM or Ctrl-C stops it\n", ready)
}
