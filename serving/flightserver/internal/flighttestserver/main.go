// Command flighttestserver runs Kiln's gRPC inference server and its Flight
// service in one process, sharing one model manager, for the Python tests,
// until SIGINT or SIGTERM. Once both listen it prints one JSON line on
// stdout: {"grpc": "HOST:PORT", "flight": "HOST:PORT", "ready": true|false}.
//
//	go run ./serving/flightserver/internal/flighttestserver -repo DIR -data DIR \
//	    [-grpc 127.0.0.1:0] [-flight 127.0.0.1:0] [-trainer stats|kiln|none] \
//	    [-user NAME -password PW] [-token TOKEN] [-tls-cert PEM -tls-key PEM]
//
// The stats trainer is flighttest.StatsTrainer (column statistics), a real
// but trivial trainer that exercises the training job machinery. The kiln
// trainer is flightserver.ModelTrainer, Kiln's training engine: it writes each
// trained model as a new version into -repo, the served repository, and
// loads it into the server's model manager, so that DoExchange and gRPC
// serve it at once. It runs serving.Run, the composition `kiln serve` runs.
package main

import (
	"context"
	"encoding/json"
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
	"github.com/kilnml/kiln/serving/flightserver/internal/flighttest"
)

func main() {
	repo := flag.String("repo", "", "model repository directory")
	data := flag.String("data", "", "dataset directory")
	grpcAddr := flag.String("grpc", "127.0.0.1:0", "gRPC listen address")
	flightAddr := flag.String("flight", "127.0.0.1:0", "Flight listen address")
	trainer := flag.String("trainer", "stats", "trainer: stats, kiln or none")
	user := flag.String("user", "", "user name accepted by the basic-auth handshake")
	password := flag.String("password", "", "its password")
	token := flag.String("token", "", "static bearer token")
	cert := flag.String("tls-cert", "", "TLS certificate (PEM)")
	key := flag.String("tls-key", "", "TLS key (PEM)")
	flag.Parse()
	cfg := serving.DefaultConfig()
	cfg.ModelRepository, cfg.DataDir = *repo, *data
	cfg.HTTPPort, cfg.MetricsPort = serving.PortOff, serving.PortOff
	var err error
	if cfg.Host, cfg.GRPCPort, err = hostPort(*grpcAddr); err != nil {
		fail(2, fmt.Errorf("-grpc: %w", err))
	}
	var fhost string
	if fhost, cfg.FlightPort, err = hostPort(*flightAddr); err != nil || fhost != cfg.Host {
		fail(2, fmt.Errorf("-flight %s: want a port on the gRPC host %s (%v)", *flightAddr, cfg.Host, err))
	}
	cfg.TLSCertFile, cfg.TLSKeyFile = *cert, *key
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	switch *trainer {
	case "stats":
		cfg.FlightTrainer = flighttest.StatsTrainer
	case "kiln": // serving.Run's default: Kiln's trainer into the served repository
	case "none":
		cfg.DisableFlightTraining = true
	default:
		fail(2, fmt.Errorf("unknown trainer %q", *trainer))
	}
	cfg.Auth.Token = *token
	if *user != "" {
		cfg.Auth.Users = map[string]string{*user: *password}
	}
	cfg.Started = func(srv *serving.Server) {
		line, _ := json.Marshal(map[string]any{"grpc": srv.GRPCAddr().String(), "flight": srv.FlightAddr().String(), "ready": srv.Ready()})
		fmt.Println(string(line))
	}
	cfg.ShutdownTimeout = 30 * time.Second
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serving.Run(ctx, cfg); err != nil {
		fail(1, err)
	}
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
