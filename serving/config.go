package serving

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/serving/auth"
	"github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/limits"
	"github.com/kilnml/kiln/serving/repository/s3repo"
)

// Model control modes.
const (
	// ControlNone loads every model of the repository at start.
	ControlNone = "none"
	// ControlPoll loads every model at start, then polls the repository
	// every Config.PollInterval: changed models reload atomically (new
	// versions appear, removed ones go), removed models unload.
	ControlPoll = "poll"
	// ControlExplicit loads only Config.StartupModels at start; clients
	// load and unload the others with the repository API.
	ControlExplicit = "explicit"
)

// Default ports, as Triton users expect (HTTP 8000, gRPC 8001, metrics
// 8002) and Arrow Flight's customary 8815.
const (
	DefaultHTTPPort    = 8000
	DefaultGRPCPort    = 8001
	DefaultMetricsPort = 8002
	DefaultFlightPort  = 8815
)

// PortOff turns a listener off (every listener but gRPC's may be off).
const PortOff = -1

// DefaultMaxMessageBytes is the default limit of gRPC and Flight messages
// and HTTP bodies: limits.DefaultMaxMessageBytes (64 MiB), sized for a
// small box (see package limits); raise it for larger tensors.
const DefaultMaxMessageBytes = limits.DefaultMaxMessageBytes

// DefaultPollInterval is how often ControlPoll looks at the repository
// unless Config.PollInterval says otherwise.
const DefaultPollInterval = 15 * time.Second

// DefaultDataDir is where Flight stores datasets unless Config.DataDir
// says otherwise (relative to the working directory).
const DefaultDataDir = "kiln-data"

// Config is every option of a Kiln server: the KServe v2 gRPC and
// HTTP/REST services, Prometheus metrics, Arrow Flight, authentication,
// TLS and limits. `kiln serve`'s flags and Python's kiln.serve keyword
// arguments map onto it one to one; start from DefaultConfig, which holds
// their defaults, and set what differs.
type Config struct {
	// ModelRepository is the model repository (required): a directory, or
	// s3://bucket/prefix for one in S3-compatible object storage (see
	// package serving/repository/s3repo), mirrored into RepositoryCache.
	ModelRepository string `json:"model_repository"`
	// RepositoryCache is, for an s3:// ModelRepository, the local
	// directory its models are downloaded into, reused across restarts
	// (one server at a time: it is locked); "" means a new temporary
	// directory, removed on shutdown.
	RepositoryCache string `json:"repository_cache"`
	// S3PathStyle turns path-style addressing of an s3:// repository on
	// or off (nil: on with a custom endpoint; ApplyEnv sets it from
	// KILN_S3_PATH_STYLE).
	S3PathStyle *bool `json:"-"`
	// Host is the address every listener binds ("" or "0.0.0.0": every
	// IPv4 interface, "::": every interface; an IPv6 literal may be
	// written with or without brackets, e.g. "::1" or "[::1]").
	Host string `json:"host"`
	// GRPCPort, HTTPPort, MetricsPort and FlightPort are the listeners'
	// ports: 0 picks a free port (see Server's *Addr methods), PortOff
	// turns that listener off (not gRPC's).
	GRPCPort    int `json:"grpc_port"`
	HTTPPort    int `json:"http_port"`
	MetricsPort int `json:"metrics_port"`
	FlightPort  int `json:"flight_port"`
	// SinglePort serves gRPC on the HTTP port too, beside REST: HTTP/1.1,
	// cleartext HTTP/2 with prior knowledge (h2c) and, with TLS, HTTP/2
	// by ALPN, on one listener; each HTTP/2 request with content-type
	// application/grpc goes to the gRPC service (KServe's serverless mode
	// exposes one port). GRPCPort may then be PortOff; when open it keeps
	// serving gRPC on grpc-go's own transport.
	SinglePort bool `json:"single_port"`

	// ModelControl is ControlNone, ControlPoll or ControlExplicit.
	ModelControl string `json:"model_control"`
	// PollInterval is ControlPoll's period.
	PollInterval time.Duration `json:"poll_interval"`
	// StartupModels are loaded at start in ControlExplicit mode.
	StartupModels []string `json:"load_models"`
	// StrictModelLoad makes Start fail when a model fails to load;
	// otherwise the failure is logged, reported by the repository index,
	// and the server stays not ready until the model loads or is unloaded.
	StrictModelLoad bool `json:"strict_model_config"`
	// IntraOpThreads sets libtorch's intra-op threads when > 0; 0 picks
	// max(1, CPUs / instances), instances being the largest instance_count
	// among the models loaded at start, so that one model's concurrent
	// executions fit the cores. OpenBLAS, when libtorch uses it, gets the
	// same thread count unless OPENBLAS_NUM_THREADS is set.
	IntraOpThreads int `json:"threads"`

	// Auth is the one authentication policy of gRPC, HTTP and Flight
	// (serving/auth): with a token, the repository API and Flight's
	// datasets and jobs need it, inference too when Auth.Inference is set.
	Auth auth.Config `json:"-"`
	// TLSCertFile and TLSKeyFile, when both set, serve gRPC, HTTP and
	// Flight over TLS with that PEM certificate (chain) and key.
	TLSCertFile string `json:"tls_cert"`
	TLSKeyFile  string `json:"tls_key"`
	// MaxMessageBytes limits received and sent gRPC and Flight messages
	// and HTTP request bodies, in bytes.
	MaxMessageBytes int `json:"max_message_bytes"`
	// Limits are the other resource limits (decompressed bytes, inputs
	// per request, elements per tensor, bytes in flight, read timeouts,
	// concurrent streams per connection and over the server); their
	// fields are promoted, and a zero field means its default
	// (limits.Defaults).
	limits.Limits

	// DataDir is the directory of Flight's datasets (created if missing).
	DataDir string `json:"data_dir"`
	// FlightTrainer runs Flight's `train` action; nil means Kiln's own
	// (flightserver.ModelTrainer), which trains into ModelRepository and
	// loads the new version into this server.
	FlightTrainer flightserver.Trainer `json:"-"`
	// DisableFlightTraining turns Flight's `train` action off (it answers
	// UNIMPLEMENTED).
	DisableFlightTraining bool `json:"disable_flight_training"`

	// Registry, when set, is the model registry whose alias the server
	// serves (serving/follower): a SQLite file or sqlite://PATH, or
	// postgres://.... Every registered model with the alias ServeAlias is
	// installed into ModelRepository under its registry version number
	// (the artifact's SHA-256 verified) and answers the requests that name
	// no version; a move of the alias loads and warms up the new version
	// before it switches, and the previous one stays loaded for
	// RollbackGrace.
	Registry string `json:"registry"`
	// RegistryArtifacts is the registry's artifact root: a directory or
	// s3://bucket/prefix (objects in S3-compatible storage, configured
	// like an s3:// model repository); required for PostgreSQL (default
	// $KILN_REGISTRY_ARTIFACTS), for SQLite default "artifacts" beside
	// the file.
	RegistryArtifacts string `json:"registry_artifacts"`
	// RegistryKeyFile holds the key that decrypts encrypted artifacts
	// (default $KILN_REGISTRY_KEY_FILE; $KILN_REGISTRY_KEY gives the key
	// itself, see ApplyEnv).
	RegistryKeyFile string `json:"registry_key_file"`
	// registryKey is $KILN_REGISTRY_KEY (secret: never logged, never
	// serialized).
	registryKey string
	// ServeAlias is the alias served (default follower.DefaultAlias,
	// "production").
	ServeAlias string `json:"serve_alias"`
	// RegistryPollInterval is the time between two polls of the registry
	// (default follower.DefaultInterval, 2 s).
	RegistryPollInterval time.Duration `json:"registry_poll_interval"`
	// RollbackGrace is how long the version that served before an alias
	// move stays loaded, so that moving the alias back is immediate
	// (default follower.DefaultGrace, 5 min).
	RollbackGrace time.Duration `json:"rollback_grace"`

	// Pipeline, with Registry and Flight, is a pipeline file (package
	// pipeline) run by continuous training: every commit (a DoPut) of the
	// dataset WatchDataset (default: the file's data.dataset) starts a
	// run on that dataset, PipelineDebounce (default 30 s) after the last
	// commit, one run at a time (commits during a run queue one more). A
	// failed run is logged and recorded; the server goes on. With Registry
	// the Flight action pipeline_run runs any pipeline file, with or
	// without Pipeline.
	Pipeline         string        `json:"pipeline"`
	WatchDataset     string        `json:"watch_dataset"`
	PipelineDebounce time.Duration `json:"pipeline_debounce"`
	// pipelineRuns is the directory of pipeline runs ($KILN_HOME/pipelines,
	// from ApplyEnv).
	pipelineRuns string

	// RolloutPolicy is a rollout policy file (package rollout:
	// ParsePolicies): the default policy and per-model ones of the
	// server's rollouts (canary steps, analysis window, thresholds, shadow
	// share, sticky key). Empty: the defaults.
	RolloutPolicy string `json:"rollout_policy"`
	// RolloutState is the directory that keeps rollouts across restarts
	// (default $KILN_HOME/rollouts).
	RolloutState string `json:"rollout_state"`
	// RolloutManual, with Registry, turns off automatic rollouts: by
	// default a registry model whose "candidate" alias names a version
	// other than production's is rolled out by the server itself.
	RolloutManual bool `json:"rollout_manual"`

	// ShutdownTimeout bounds how long Run waits for requests in flight
	// when its context ends (0: no limit).
	ShutdownTimeout time.Duration `json:"shutdown_timeout"`
	// Name is the server name in ServerMetadata (default "kiln").
	Name string `json:"-"`
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger `json:"-"`
	// Started, when set, is called by Run once every listener is up and
	// the models are loaded (the server may still be not ready, when a
	// model failed to load).
	Started func(*Server) `json:"-"`
}

// DefaultConfig returns the defaults of `kiln serve` and kiln.serve: every
// interface, gRPC 8001, HTTP 8000, metrics 8002, Flight 8815, datasets in
// DefaultDataDir, model control "none", no auth, no TLS, messages up to
// DefaultMaxMessageBytes, threads picked from the models. ModelRepository
// is left for the caller.
func DefaultConfig() Config {
	return Config{
		GRPCPort: DefaultGRPCPort, HTTPPort: DefaultHTTPPort, MetricsPort: DefaultMetricsPort, FlightPort: DefaultFlightPort,
		ModelControl: ControlNone, PollInterval: DefaultPollInterval, MaxMessageBytes: DefaultMaxMessageBytes,
		DataDir: DefaultDataDir, Name: "kiln", Limits: limits.Defaults(),
	}
}

// ApplyEnv fills what the environment sets and the config leaves unset:
// the auth token (KILN_AUTH_TOKEN, KILN_AUTH_TOKEN_FILE), the intra-op
// threads (KILN_NUM_THREADS), the registry's key (KILN_REGISTRY_KEY,
// KILN_REGISTRY_KEY_FILE), S3 path-style addressing (KILN_S3_PATH_STYLE)
// and, with a registry, its artifact root (KILN_REGISTRY_ARTIFACTS). See
// package internal/kilnenv.
func (c *Config) ApplyEnv(v kilnenv.Vars) {
	if c.RegistryKeyFile == "" && c.registryKey == "" {
		c.registryKey, c.RegistryKeyFile = v.RegistryKey, v.RegistryKeyFile
	}
	if c.Auth.Token == "" && c.Auth.TokenFile == "" {
		c.Auth.Token, c.Auth.TokenFile = v.AuthToken, v.AuthTokenFile
	}
	if c.IntraOpThreads == 0 {
		c.IntraOpThreads = v.NumThreads
	}
	if c.pipelineRuns == "" {
		if home, err := v.DataDir(); err == nil {
			c.pipelineRuns = filepath.Join(home, "pipelines")
		}
	}
	if c.S3PathStyle == nil {
		c.S3PathStyle = v.S3PathStyle
	}
	if c.RolloutState == "" {
		if home, err := v.DataDir(); err == nil {
			c.RolloutState = filepath.Join(home, "rollouts")
		}
	}
	if c.Registry != "" && c.RegistryArtifacts == "" {
		c.RegistryArtifacts = v.RegistryArtifacts
	}
}

// Validate reports the first option that cannot work, naming it.
func (c *Config) Validate() error {
	if c.ModelRepository == "" {
		return errors.New("no model repository")
	}
	if s3repo.IsURL(c.ModelRepository) {
		if _, err := s3repo.ParseURL(c.ModelRepository); err != nil {
			return fmt.Errorf("model repository: %w", err)
		}
	} else if c.RepositoryCache != "" {
		return errors.New("a repository cache needs an s3:// model repository")
	}
	if c.GRPCPort == PortOff && !c.SinglePort {
		return errors.New("grpc port -1: the gRPC service cannot be turned off (unless single port serves it on the HTTP port)")
	}
	if c.SinglePort && c.HTTPPort == PortOff {
		return errors.New("single port serves gRPC on the HTTP port, which is off")
	}
	for _, p := range []struct {
		name string
		port int
	}{{"grpc", c.GRPCPort}, {"http", c.HTTPPort}, {"metrics", c.MetricsPort}, {"flight", c.FlightPort}} {
		if p.port < PortOff || p.port > 65535 {
			return fmt.Errorf("%s port %d is not within -1..65535", p.name, p.port)
		}
	}
	if _, err := c.listenAddr(0); err != nil {
		return err
	}
	switch c.ModelControl {
	case ControlNone, ControlPoll, ControlExplicit:
	default:
		return fmt.Errorf("unknown model control mode %q (want %q, %q or %q)", c.ModelControl, ControlNone, ControlPoll, ControlExplicit)
	}
	if c.PollInterval <= 0 {
		return fmt.Errorf("repository poll interval %v: want a positive duration", c.PollInterval)
	}
	if len(c.StartupModels) > 0 && c.ModelControl != ControlExplicit {
		return fmt.Errorf("startup models %v need model control mode %q (mode %q loads every model)", c.StartupModels, ControlExplicit, c.ModelControl)
	}
	if c.IntraOpThreads < 0 {
		return fmt.Errorf("threads %d: want ≥ 0", c.IntraOpThreads)
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return errors.New("TLS needs both a certificate and a key file")
	}
	if c.MaxMessageBytes <= 0 {
		return fmt.Errorf("max message bytes %d: want a positive number", c.MaxMessageBytes)
	}
	if err := c.Limits.Validate(); err != nil {
		return err
	}
	if c.FlightPort != PortOff && c.DataDir == "" {
		return errors.New("Flight needs a data directory (a Flight port of -1 turns Flight off)")
	}
	if c.ShutdownTimeout < 0 {
		return fmt.Errorf("shutdown timeout %v: want ≥ 0", c.ShutdownTimeout)
	}
	if c.Registry == "" && c.RegistryArtifacts != "" {
		return errors.New("registry artifacts need a registry")
	}
	if s3repo.IsURL(c.RegistryArtifacts) {
		if _, err := s3repo.ParseURL(c.RegistryArtifacts); err != nil {
			return fmt.Errorf("registry artifacts: %w", err)
		}
	}
	if c.Pipeline != "" && c.Registry == "" {
		return errors.New("--pipeline needs --registry (the pipeline registers and promotes there)")
	}
	if c.Pipeline != "" && c.FlightPort == PortOff {
		return errors.New("--pipeline watches a Flight dataset: Flight cannot be off")
	}
	if c.WatchDataset != "" && c.Pipeline == "" {
		return errors.New("--watch-dataset needs --pipeline (the pipeline to run on each commit)")
	}
	if c.PipelineDebounce < 0 {
		return fmt.Errorf("pipeline debounce %v: want ≥ 0", c.PipelineDebounce)
	}
	if c.RegistryPollInterval < 0 {
		return fmt.Errorf("registry poll interval %v: want ≥ 0", c.RegistryPollInterval)
	}
	return nil
}

// listenAddr returns the "host:port" address of a port, IPv6 hosts in
// brackets, or "" for PortOff.
func (c *Config) listenAddr(port int) (string, error) {
	if port == PortOff {
		return "", nil
	}
	host := c.Host
	if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	}
	if strings.ContainsAny(host, "[]/ ") || (strings.Contains(host, ":") && net.ParseIP(host) == nil) {
		return "", fmt.Errorf("host %q: want a host name or an IP address (IPv6 with or without brackets)", c.Host)
	}
	return net.JoinHostPort(host, strconv.Itoa(port)), nil
}
