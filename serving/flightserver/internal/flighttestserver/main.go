// Command flighttestserver runs Kiln's gRPC inference server and its Flight
// service in one process, sharing one model manager, for the Python tests,
// until SIGINT or SIGTERM. Once both listen it prints one JSON line on
// stdout: {"grpc": "HOST:PORT", "flight": "HOST:PORT", "ready": true|false}.
//
//	go run ./serving/flightserver/internal/flighttestserver -repo DIR -data DIR \
//	    [-grpc 127.0.0.1:0] [-flight 127.0.0.1:0] [-trainer stats|kiln|none] \
//	    [-train-repo DIR] [-user NAME -password PW] [-token TOKEN] \
//	    [-tls-cert PEM -tls-key PEM]
//
// The stats trainer is flighttest.StatsTrainer (column statistics), a real
// but trivial trainer that exercises the training job machinery. The kiln
// trainer is flightserver.ModelTrainer, Kiln's training engine: it writes each
// trained model as a new version into -train-repo (default: -repo, the
// served repository) and loads it into the server's model manager, so that
// DoExchange and gRPC serve it at once.
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
	"time"

	"github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/flightserver/internal/flighttest"
	"github.com/kilnml/kiln/serving"
)

func main() {
	repo := flag.String("repo", "", "model repository directory")
	data := flag.String("data", "", "dataset directory")
	grpcAddr := flag.String("grpc", "127.0.0.1:0", "gRPC listen address")
	flightAddr := flag.String("flight", "127.0.0.1:0", "Flight listen address")
	trainer := flag.String("trainer", "stats", "trainer: stats, kiln or none")
	trainRepo := flag.String("train-repo", "", "model repository the kiln trainer writes to (default: -repo)")
	user := flag.String("user", "", "user name accepted by the basic-auth handshake")
	password := flag.String("password", "", "its password")
	token := flag.String("token", "", "static bearer token")
	cert := flag.String("tls-cert", "", "TLS certificate (PEM)")
	key := flag.String("tls-key", "", "TLS key (PEM)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	srv, err := serving.New(serving.Options{ModelRepository: *repo, GRPCAddr: *grpcAddr, Logger: log})
	if err != nil {
		fail(2, err)
	}
	if err := srv.Start(ctx); err != nil {
		fail(1, err)
	}
	opts := flightserver.Options{DataDir: *data, Addr: *flightAddr, Models: flightserver.ManagerModels(srv.Manager()), Logger: log, CertFile: *cert, KeyFile: *key}
	switch *trainer {
	case "stats":
		opts.Trainer = flighttest.StatsTrainer
	case "kiln":
		to := flightserver.ModelTrainerOptions{Repository: *trainRepo}
		if to.Repository == "" {
			to.Repository = *repo
			to.Load = srv.Manager().Load
		}
		mt, err := flightserver.NewModelTrainer(to)
		if err != nil {
			fail(2, err)
		}
		opts.Trainer = mt
	case "none":
	default:
		fail(2, fmt.Errorf("unknown trainer %q", *trainer))
	}
	if *user != "" || *token != "" {
		opts.Auth = &flightserver.Auth{}
		if *user != "" {
			opts.Auth.Users = map[string]string{*user: *password}
		}
		if *token != "" {
			opts.Auth.Tokens = map[string]string{*token: "static"}
		}
	}
	fs, err := flightserver.New(opts)
	if err != nil {
		fail(2, err)
	}
	if err := fs.Start(ctx); err != nil {
		fail(1, err)
	}
	line, _ := json.Marshal(map[string]any{"grpc": srv.GRPCAddr().String(), "flight": fs.Addr().String(), "ready": srv.Ready()})
	fmt.Println(string(line))
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ferr := fs.Shutdown(sctx)
	serr := srv.Shutdown(sctx)
	if ferr != nil || serr != nil {
		fail(1, fmt.Errorf("shutdown: flight: %v, grpc: %v", ferr, serr))
	}
}

func fail(code int, err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(code)
}
