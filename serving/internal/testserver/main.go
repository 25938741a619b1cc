// Command testserver runs Kiln's inference server (serving.Run) for the
// Python tests until SIGINT or SIGTERM. Once the server has started it
// prints one JSON line on stdout: {"grpc": "HOST:PORT", "ready": true|false}.
//
//	go run ./serving/internal/testserver -repo DIR [-grpc 127.0.0.1:0] [-explicit]
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

	"github.com/kilnml/kiln/serving"
)

func main() {
	repo := flag.String("repo", "", "model repository directory")
	addr := flag.String("grpc", "127.0.0.1:0", "gRPC listen address")
	explicit := flag.Bool("explicit", false, "load no model at start (explicit model control)")
	maxMsg := flag.Int("max-message-bytes", 0, "gRPC message size limit (0: default)")
	flag.Parse()
	cfg := serving.DefaultConfig()
	cfg.ModelRepository = *repo
	cfg.HTTPPort, cfg.MetricsPort, cfg.FlightPort = serving.PortOff, serving.PortOff, serving.PortOff
	host, port, err := net.SplitHostPort(*addr)
	if err == nil {
		cfg.Host = host
		cfg.GRPCPort, err = strconv.Atoi(port)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "-grpc:", err)
		os.Exit(2)
	}
	if *maxMsg > 0 {
		cfg.MaxMessageBytes = *maxMsg
	}
	if *explicit {
		cfg.ModelControl = serving.ControlExplicit
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	cfg.Started = func(srv *serving.Server) {
		line, _ := json.Marshal(map[string]any{"grpc": srv.GRPCAddr().String(), "ready": srv.Ready()})
		fmt.Println(string(line))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serving.Run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
