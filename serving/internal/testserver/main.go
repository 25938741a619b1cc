// Command testserver runs Kiln's inference server for the Python tests
// until SIGINT or SIGTERM. Once the server has started it prints one JSON
// line on stdout: {"grpc": "HOST:PORT", "ready": true|false}.
//
//	go run ./serving/internal/testserver -repo DIR [-grpc 127.0.0.1:0] [-explicit]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/kilnml/kiln/serving"
)

func main() {
	repo := flag.String("repo", "", "model repository directory")
	addr := flag.String("grpc", "127.0.0.1:0", "gRPC listen address")
	explicit := flag.Bool("explicit", false, "load no model at start (explicit model control)")
	maxMsg := flag.Int("max-message-bytes", 0, "gRPC message size limit (0: default)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	opts := serving.Options{ModelRepository: *repo, GRPCAddr: *addr, MaxMessageBytes: *maxMsg, Logger: log}
	if *explicit {
		opts.ModelControl = serving.ControlExplicit
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	srv, err := serving.New(opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if err := srv.Start(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	line, _ := json.Marshal(map[string]any{"grpc": srv.GRPCAddr().String(), "ready": srv.Ready()})
	fmt.Println(string(line))
	<-ctx.Done()
	if err := srv.Shutdown(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
