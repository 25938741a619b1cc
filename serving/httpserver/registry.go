package httpserver

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strconv"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/auth"
)

// The model registry's REST API (issue 13), served when Options.Registry is
// set (kiln serve --registry). Every endpoint is an auth.Control call:
// with a token it needs the bearer token, without one it is taken only
// from loopback. Bodies and answers are JSON; errors carry the status of
// their code (unknown model, version or alias: 404; a bad body: 400), and
// a compare-and-swap that finds the alias moved is 409 Conflict.
//
//	GET  /v2/registry/models                               registered models
//	GET  /v2/registry/models/{model}                       a model and its versions
//	GET  /v2/registry/models/{model}/versions/{version}    a version and its evaluations
//	GET  /v2/registry/models/{model}/aliases/{alias}/history  the alias's moves
//	POST /v2/registry/models/{model}/aliases/{alias}       move the alias: AliasMove
//	GET  /v2/registry/runs[?model=NAME&limit=N]            runs, newest first
//	GET  /v2/registry/runs/{run}                           a run and its metrics per step
//	GET  /v2/registry/serving                              what the server serves (Options.RegistryStatus)
func (h *Handler) routeRegistry() {
	if h.opts.Registry == nil {
		return
	}
	get, post, control := http.MethodGet, http.MethodPost, auth.Control
	h.route(get, "/v2/registry/models", control, h.registryModels)
	h.route(get, "/v2/registry/models/{model}", control, h.registryModel)
	h.route(get, "/v2/registry/models/{model}/versions/{version}", control, h.registryVersion)
	h.route(get, "/v2/registry/models/{model}/aliases/{alias}/history", control, h.registryHistory)
	h.route(post, "/v2/registry/models/{model}/aliases/{alias}", control, h.registryMoveAlias)
	h.route(get, "/v2/registry/runs", control, h.registryRuns)
	h.route(get, "/v2/registry/runs/{run}", control, h.registryRun)
	if h.opts.RegistryStatus != nil {
		h.route(get, "/v2/registry/serving", control, func(w http.ResponseWriter, r *http.Request) {
			writeJSON(w, map[string]any{"models": h.opts.RegistryStatus()})
		})
	}
}

func (h *Handler) registryModels(w http.ResponseWriter, r *http.Request) {
	ms, err := h.opts.Registry.Models(r.Context())
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	writeJSON(w, map[string]any{"models": nonNil(ms)})
}

func (h *Handler) registryModel(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("model")
	m, err := h.opts.Registry.Model(r.Context(), name)
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	vs, err := h.opts.Registry.Versions(r.Context(), name)
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	writeJSON(w, map[string]any{"model": m, "versions": nonNil(vs)})
}

func (h *Handler) registryVersion(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("model")
	n, err := strconv.Atoi(r.PathValue("version"))
	if err != nil || n < 1 {
		writeError(w, http.StatusBadRequest, "version "+strconv.Quote(r.PathValue("version"))+" is not a positive integer")
		return
	}
	v, err := h.opts.Registry.Version(r.Context(), name, n)
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	evs, err := h.opts.Registry.Evaluations(r.Context(), name, n)
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	writeJSON(w, map[string]any{"version": v, "evaluations": nonNil(evs)})
}

func (h *Handler) registryHistory(w http.ResponseWriter, r *http.Request) {
	evs, err := h.opts.Registry.History(r.Context(), r.PathValue("model"), r.PathValue("alias"))
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	writeJSON(w, map[string]any{"events": nonNil(evs)})
}

func (h *Handler) registryRuns(w http.ResponseWriter, r *http.Request) {
	limit := 100
	if s := r.URL.Query().Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 10000 {
			writeError(w, http.StatusBadRequest, "limit "+strconv.Quote(s)+": want 1 to 10000")
			return
		}
		limit = n
	}
	runs, err := h.opts.Registry.Runs(r.Context(), r.URL.Query().Get("model"), limit)
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	writeJSON(w, map[string]any{"runs": nonNil(runs)})
}

// registryRun answers {"run": Run, "metrics": [Metric...]}: the run with
// its parameters and final metrics, and every metric it logged by step
// (a training's loss, lr and val_* per epoch), by key then step.
func (h *Handler) registryRun(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("run")
	run, err := h.opts.Registry.Run(r.Context(), id)
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	ms, err := h.opts.Registry.RunMetrics(r.Context(), id)
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	writeJSON(w, map[string]any{"run": run, "metrics": nonNil(ms)})
}

// AliasMove is the body of POST /v2/registry/models/{model}/aliases/{alias}:
// move the alias to Version (0 removes it) if it is at Expected now (0: the
// alias must not exist), a compare-and-swap recorded with Actor (default
// "http:<client address>"), Reason and Verdict.
type AliasMove struct {
	Version      int    `json:"version"`
	Expected     int    `json:"expected"`
	Actor        string `json:"actor,omitempty"`
	Reason       string `json:"reason,omitempty"`
	Verdict      string `json:"verdict,omitempty"`
	EvaluationID int64  `json:"evaluation_id,omitempty"`
}

// maxAliasMoveBytes bounds an AliasMove body.
const maxAliasMoveBytes = 64 << 10

// ParseAliasMove decodes an AliasMove: a JSON object with only its fields,
// of at most 64 KiB, versions ≥ 0. Errors are INVALID_ARGUMENT.
func ParseAliasMove(body []byte) (AliasMove, error) {
	var m AliasMove
	if len(body) > maxAliasMoveBytes {
		return m, core.Errorf(core.InvalidArgument, "alias move: body of %d bytes (at most %d)", len(body), maxAliasMoveBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return AliasMove{}, core.Errorf(core.InvalidArgument, "alias move: %v (want {\"version\": N, \"expected\": M, \"reason\": ...})", err)
	}
	if dec.More() {
		return AliasMove{}, core.Errorf(core.InvalidArgument, "alias move: more than one JSON value")
	}
	if m.Version < 0 || m.Expected < 0 || m.EvaluationID < 0 {
		return AliasMove{}, core.Errorf(core.InvalidArgument, "alias move: versions and evaluation ids are ≥ 0")
	}
	return m, nil
}

func (h *Handler) registryMoveAlias(w http.ResponseWriter, r *http.Request) {
	body, err := h.readBody(w, r)
	if err != nil {
		writeStatus(w, err)
		return
	}
	m, err := ParseAliasMove(body)
	if err != nil {
		writeStatus(w, err)
		return
	}
	if m.Actor == "" {
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			host = r.RemoteAddr
		}
		m.Actor = "http:" + host
	}
	ev, err := h.opts.Registry.CompareAndSwap(r.Context(), registry.Move{Model: r.PathValue("model"), Alias: r.PathValue("alias"),
		Expected: m.Expected, To: m.Version, Actor: m.Actor, Reason: m.Reason, Verdict: m.Verdict, EvaluationID: m.EvaluationID})
	if err != nil {
		writeRegistryError(w, err)
		return
	}
	h.log.Info("registry: alias moved over HTTP", "model", ev.Model, "alias", ev.Alias, "from", ev.From, "to", ev.To, "actor", ev.Actor)
	writeJSON(w, ev)
}

// writeRegistryError answers a lost compare-and-swap 409 and every other
// error by its code.
func writeRegistryError(w http.ResponseWriter, err error) {
	if errors.Is(err, registry.ErrConflict) {
		writeError(w, http.StatusConflict, err.Error())
		return
	}
	writeStatus(w, err)
}

// nonNil makes an empty list encode as [] rather than null.
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
