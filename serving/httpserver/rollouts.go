package httpserver

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/auth"
	"github.com/kilnml/kiln/serving/rollout"
)

// maxRolloutBody bounds a rollout request's JSON body.
const maxRolloutBody = 64 << 10

// The rollouts' REST API (issue 14), served when Options.Rollouts is set.
// Reading is an auth.Inference call, changing an auth.Control call. A
// status is rollout.Status as JSON.
//
//	GET  /v2/rollouts                      {"rollouts": [status...]}, the latest of each model
//	GET  /v2/rollouts/{model}              the model's latest rollout (404: none)
//	POST /v2/rollouts/{model}/start        start one: rollout.StartRequest, e.g.
//	                                       {"candidate": 3, "steps": [5, 25, 50, 100], "window": "30s", "shadow": 0.1}
//	                                       (409 when one is running; 400 for a bad policy)
//	POST /v2/rollouts/{model}/abort        all traffic back to production: {"reason": "..."} (optional)
//	POST /v2/rollouts/{model}/promote      promote the candidate now
//
// abort and promote answer 409 when no rollout is running.
func (h *Handler) routeRollouts() {
	if h.opts.Rollouts == nil {
		return
	}
	get, post := http.MethodGet, http.MethodPost
	h.route(get, "/v2/rollouts", auth.Inference, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{"rollouts": h.opts.Rollouts.List()})
	})
	h.route(get, "/v2/rollouts/{model}", auth.Inference, func(w http.ResponseWriter, r *http.Request) {
		st, ok := h.opts.Rollouts.Status(r.PathValue("model"))
		if !ok {
			writeError(w, http.StatusNotFound, "model "+r.PathValue("model")+" has had no rollout")
			return
		}
		writeJSON(w, st)
	})
	h.route(post, "/v2/rollouts/{model}/start", auth.Control, func(w http.ResponseWriter, r *http.Request) {
		var req rollout.StartRequest
		if err := decodeRolloutBody(w, r, &req); err != nil {
			writeStatus(w, err)
			return
		}
		if req.Actor == "" {
			req.Actor = httpActor(r)
		}
		st, err := h.opts.Rollouts.Start(r.Context(), r.PathValue("model"), req)
		writeRollout(w, st, err)
	})
	h.route(post, "/v2/rollouts/{model}/abort", auth.Control, func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Reason string `json:"reason"`
		}
		if err := decodeRolloutBody(w, r, &req); err != nil {
			writeStatus(w, err)
			return
		}
		reason := req.Reason
		if reason == "" {
			reason = "aborted by " + httpActor(r)
		}
		st, err := h.opts.Rollouts.Abort(r.Context(), r.PathValue("model"), reason)
		writeRollout(w, st, err)
	})
	h.route(post, "/v2/rollouts/{model}/promote", auth.Control, func(w http.ResponseWriter, r *http.Request) {
		st, err := h.opts.Rollouts.Promote(r.Context(), r.PathValue("model"))
		writeRollout(w, st, err)
	})
}

func httpActor(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	return "http:" + host
}

// decodeRolloutBody reads an optional JSON body (empty is {}), refusing
// unknown fields and bodies over maxRolloutBody.
func decodeRolloutBody(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRolloutBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return invalid("rollout request body: %v", err)
	}
	return nil
}

func writeRollout(w http.ResponseWriter, st rollout.Status, err error) {
	switch {
	case err == nil:
		writeJSON(w, st)
	case core.HasCode(err, core.AlreadyExists), core.HasCode(err, core.FailedPrecondition):
		writeError(w, http.StatusConflict, err.Error())
	default:
		writeStatus(w, err)
	}
}
