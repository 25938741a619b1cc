package bindings

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/serving"
	"github.com/kilnml/kiln/serving/repository"
)

// serveOptions is what Python's kiln.serve passes, as JSON: the fields of
// serving.Config under the names of `kiln serve`'s flags (snake_case).
// An option Python leaves out keeps serving.DefaultConfig's value, so the
// defaults are the CLI's.
type serveOptions struct {
	serving.Config
	PollSecs          *float64 `json:"repository_poll_secs"`
	ShutdownTimeoutMs *int64   `json:"shutdown_timeout_ms"`
	AuthToken         string   `json:"auth_token"`
	AuthTokenFile     string   `json:"auth_token_file"`
	AuthInference     bool     `json:"auth_inference"`
}

// Server is a Kiln server running inside this process: serving.Run (gRPC,
// HTTP, metrics and Arrow Flight over one model manager) in a goroutine.
type Server struct {
	s      *serving.Server
	cancel context.CancelFunc
	done   chan error
}

// Serve starts serving.Run in the background with the options in
// optionsJSON (see kiln.serve) and returns once the server has started
// (or failed to); a port of 0 picks a free one, -1 turns that listener
// off.
func Serve(optionsJSON string) (_ *Server, err error) {
	defer guard(&err)
	o := serveOptions{Config: serving.DefaultConfig()}
	if err := json.Unmarshal([]byte(optionsJSON), &o); err != nil {
		return nil, fmt.Errorf("kiln: serve: bad options: %w", err)
	}
	cfg := o.Config
	if o.PollSecs != nil {
		cfg.PollInterval = time.Duration(*o.PollSecs * float64(time.Second))
	}
	if o.ShutdownTimeoutMs != nil {
		cfg.ShutdownTimeout = time.Duration(*o.ShutdownTimeoutMs) * time.Millisecond
	}
	cfg.Auth.Token, cfg.Auth.TokenFile, cfg.Auth.Inference = o.AuthToken, o.AuthTokenFile, o.AuthInference
	vars, err := kilnenv.Load(os.Getenv)
	if err != nil {
		return nil, fmt.Errorf("kiln: serve: %w", err)
	}
	cfg.ApplyEnv(vars)
	started := make(chan *serving.Server, 1)
	cfg.Started = func(s *serving.Server) { started <- s }
	ctx, cancel := context.WithCancel(context.Background())
	h := &Server{cancel: cancel, done: make(chan error, 1)}
	go func() {
		defer func() {
			if r := recover(); r != nil {
				h.done <- fmt.Errorf("kiln: serve: internal error: %v", r)
			}
		}()
		h.done <- serving.Run(ctx, cfg)
	}()
	select {
	case h.s = <-started:
		return h, nil
	case err := <-h.done:
		cancel()
		if err == nil {
			err = fmt.Errorf("kiln: serve: the server stopped before it started")
		}
		return nil, err
	}
}

// AddressesJSON returns {"grpc": ..., "http": ..., "metrics": ...,
// "flight": ...} with the addresses actually listened on ("" when off).
func (h *Server) AddressesJSON() string {
	m := map[string]string{}
	for k, a := range map[string]net.Addr{
		"grpc": h.s.GRPCAddr(), "http": h.s.HTTPAddr(), "metrics": h.s.MetricsAddr(), "flight": h.s.FlightAddr(),
	} {
		m[k] = ""
		if a != nil {
			m[k] = a.String()
		}
	}
	b, _ := json.Marshal(m)
	return string(b)
}

// Ready reports whether every model is loaded and warm.
func (h *Server) Ready() bool { return h.s.Ready() }

// TLS reports whether the server serves TLS.
func (h *Server) TLS() bool { return h.s.TLS() }

// Stop shuts the server down gracefully, waiting at most timeoutMs for
// requests in flight (then they are cancelled), and returns Run's error.
// A second Stop returns nil.
func (h *Server) Stop(timeoutMs int) (err error) {
	defer guard(&err)
	if h.cancel == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(timeoutMs)*time.Millisecond)
	defer cancel()
	h.s.Stop(ctx)
	err = <-h.done
	h.cancel()
	h.cancel = nil
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
