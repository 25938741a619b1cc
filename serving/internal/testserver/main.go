// Command testserver runs Kiln's server (serving.Run, the composition
// `kiln serve` runs) for the Python tests until SIGINT or SIGTERM: KServe
// v2 gRPC always, Arrow Flight when -flight is given, HTTP with -http,
// metrics off.
// Once every listener is up it prints one JSON line on stdout:
// {"grpc": "HOST:PORT", "flight": "HOST:PORT", "http": "HOST:PORT", "ready": true|false}
// ("flight" only with -flight, "http" only with -http).
//
//	go run ./serving/internal/testserver -repo DIR [-grpc 127.0.0.1:0]
//	    [-explicit] [-max-message-bytes N] [-http]
//	    [-flight 127.0.0.1:0 -data DIR [-trainer stats|kiln|none]]
//	    [-user NAME -password PW] [-token TOKEN] [-tls-cert PEM -tls-key PEM]
//
// The stats trainer is flighttest.StatsTrainer (column statistics), a real
// but trivial trainer that exercises Flight's training job machinery. The
// kiln trainer is serving.Run's default, Kiln's training engine: it writes
// each trained model as a new version into -repo, the served repository,
// and loads it into the server, so that DoExchange and gRPC serve it at
// once.
//
// Exit status: 0 after a clean shutdown, 1 when the server fails, 2 for a
// bad flag.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/kilnml/kiln/serving"
	"github.com/kilnml/kiln/serving/internal/flighttest"
)

func main() {
	repo := flag.String("repo", "", "model repository directory")
	grpcAddr := flag.String("grpc", "127.0.0.1:0", "gRPC listen address")
	explicit := flag.Bool("explicit", false, "load no model at start (explicit model control)")
	maxMsg := flag.Int("max-message-bytes", 0, "gRPC message size limit (0: default)")
	flightAddr := flag.String("flight", "", "Flight listen address, on the gRPC host (default: no Flight)")
	httpOn := flag.Bool("http", false, "serve HTTP/REST too, on a free port of the gRPC host")
	data := flag.String("data", "", "Flight's dataset directory (required with -flight)")
	trainer := flag.String("trainer", "stats", "Flight trainer: stats, kiln or none")
	user := flag.String("user", "", "user name accepted by Flight's basic-auth handshake")
	password := flag.String("password", "", "its password")
	token := flag.String("token", "", "static bearer token")
	cert := flag.String("tls-cert", "", "TLS certificate (PEM)")
	key := flag.String("tls-key", "", "TLS key (PEM)")
	flag.Parse()

	cfg := serving.DefaultConfig()
	cfg.ModelRepository = *repo
	cfg.HTTPPort, cfg.MetricsPort, cfg.FlightPort = serving.PortOff, serving.PortOff, serving.PortOff
	var err error
	if cfg.Host, cfg.GRPCPort, err = hostPort(*grpcAddr); err != nil {
		fail(2, fmt.Errorf("-grpc %s: %w", *grpcAddr, err))
	}
	if *httpOn {
		cfg.HTTPPort = 0
	}
	if *maxMsg > 0 {
		cfg.MaxMessageBytes = *maxMsg
	}
	if *explicit {
		cfg.ModelControl = serving.ControlExplicit
	}
	if *flightAddr != "" {
		if err := flight(&cfg, *flightAddr, *data, *trainer); err != nil {
			fail(2, err)
		}
	}
	cfg.TLSCertFile, cfg.TLSKeyFile = *cert, *key
	cfg.Auth.Token = *token
	if *user != "" {
		cfg.Auth.Users = map[string]string{*user: *password}
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	cfg.Started = func(srv *serving.Server) {
		info := map[string]any{"grpc": srv.GRPCAddr().String(), "ready": srv.Ready()}
		if *flightAddr != "" {
			info["flight"] = srv.FlightAddr().String()
		}
		if *httpOn {
			info["http"] = srv.HTTPAddr().String()
		}
		line, _ := json.Marshal(info)
		fmt.Println(string(line))
	}
	cfg.ShutdownTimeout = 30 * time.Second
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serving.Run(ctx, cfg); err != nil {
		fail(1, err)
	}
}

// flight turns Flight on in cfg at addr (on cfg.Host) with datasets in
// data and the named trainer.
func flight(cfg *serving.Config, addr, data, trainer string) error {
	host, port, err := hostPort(addr)
	if err != nil || host != cfg.Host {
		return fmt.Errorf("-flight %s: want a port on the gRPC host %s (%v)", addr, cfg.Host, err)
	}
	if data == "" {
		return errors.New("-flight needs -data DIR")
	}
	cfg.FlightPort, cfg.DataDir = port, data
	switch trainer {
	case "stats":
		cfg.FlightTrainer = flighttest.StatsTrainer
	case "kiln": // serving.Run's default: Kiln's trainer into the served repository
	case "none":
		cfg.DisableFlightTraining = true
	default:
		return fmt.Errorf("-trainer: unknown trainer %q (stats, kiln or none)", trainer)
	}
	return nil
}

// hostPort splits "host:port".
func hostPort(addr string) (string, int, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	p, err := strconv.Atoi(port)
	return host, p, err
}

func fail(code int, err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(code)
}
