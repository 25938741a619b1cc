package bindings

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/kilnml/kiln/serving"
	"github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/repository"
)

// serveOptions is what Python's kiln.serve passes, as JSON.
type serveOptions struct {
	Repository   string `json:"repository"`
	Host         string `json:"host"`
	GRPCPort     int    `json:"grpc_port"`
	HTTPPort     int    `json:"http_port"`
	MetricsPort  int    `json:"metrics_port"`
	FlightPort   int    `json:"flight_port"`
	DataDir      string `json:"data_dir"`
	ModelControl string `json:"model_control"`
	AuthToken    string `json:"auth_token"`
	Threads      int    `json:"threads"`
}

func addr(host string, port int) string {
	if port < 0 {
		return ""
	}
	return fmt.Sprintf("%s:%d", host, port)
}

// Server is a Kiln server running inside this process (gRPC, HTTP,
// metrics and Arrow Flight over one model manager).
type Server struct {
	s      *serving.Server
	fs     *flightserver.Server
	cancel context.CancelFunc
}

// Serve starts a server in the background from optionsJSON (see
// kiln.serve); a port of 0 picks a free one, -1 turns that listener off.
func Serve(optionsJSON string) (_ *Server, err error) {
	defer guard(&err)
	var o serveOptions
	if err := json.Unmarshal([]byte(optionsJSON), &o); err != nil {
		return nil, fmt.Errorf("kiln: serve: bad options: %w", err)
	}
	if o.GRPCPort < 0 {
		return nil, fmt.Errorf("kiln: serve: the gRPC service cannot be turned off")
	}
	s, err := serving.New(serving.Options{
		ModelRepository: o.Repository,
		GRPCAddr:        addr(o.Host, o.GRPCPort),
		HTTPAddr:        addr(o.Host, o.HTTPPort),
		MetricsAddr:     addr(o.Host, o.MetricsPort),
		ModelControl:    o.ModelControl,
		AuthToken:       o.AuthToken,
		IntraOpThreads:  o.Threads,
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := s.Start(ctx); err != nil {
		cancel()
		return nil, err
	}
	h := &Server{s: s, cancel: cancel}
	if a := addr(o.Host, o.FlightPort); a != "" {
		trainer, err := flightserver.NewModelTrainer(flightserver.ModelTrainerOptions{Repository: o.Repository, Load: s.Manager().Load})
		if err == nil {
			fo := flightserver.Options{DataDir: o.DataDir, Addr: a, Models: flightserver.ManagerModels(s.Manager()), Trainer: trainer}
			if o.AuthToken != "" {
				fo.Auth = &flightserver.Auth{Tokens: map[string]string{o.AuthToken: "kiln"}}
			}
			if h.fs, err = flightserver.New(fo); err == nil {
				err = h.fs.Start(ctx)
			}
		}
		if err != nil {
			h.Stop(5000)
			return nil, fmt.Errorf("kiln: serve: flight: %w", err)
		}
	}
	return h, nil
}

// AddressesJSON returns {"grpc": ..., "http": ..., "metrics": ...,
// "flight": ...} with the addresses actually listened on ("" when off).
func (h *Server) AddressesJSON() string {
	m := map[string]string{"grpc": "", "http": "", "metrics": "", "flight": ""}
	if a := h.s.GRPCAddr(); a != nil {
		m["grpc"] = a.String()
	}
	if a := h.s.HTTPAddr(); a != nil {
		m["http"] = a.String()
	}
	if a := h.s.MetricsAddr(); a != nil {
		m["metrics"] = a.String()
	}
	if h.fs != nil && h.fs.Addr() != nil {
		m["flight"] = h.fs.Addr().String()
	}
	b, _ := json.Marshal(m)
	return string(b)
}

// Ready reports whether every model is loaded and warm.
func (h *Server) Ready() bool { return h.s.Ready() }

// Stop shuts the server down gracefully, waiting at most timeoutMs for
// requests in flight.
func (h *Server) Stop(timeoutMs int) (err error) {
	defer guard(&err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(timeoutMs)*time.Millisecond)
	defer cancel()
	if h.fs != nil {
		h.fs.Shutdown(ctx)
		h.fs = nil
	}
	err = h.s.Shutdown(ctx)
	h.cancel()
	return err
}

// Deploy installs the model package at pkgDir into the repository as the
// next version of model (writing its config.yaml if new) and returns the
// version number (serving/repository.Install).
func Deploy(pkgDir, repo, model string) (_ int64, err error) {
	defer guard(&err)
	inst, err := repository.Install(repo, model, pkgDir, repository.InstallOptions{})
	return inst.Version, err
}
