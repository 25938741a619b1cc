package registry

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math"
	"sort"
	"time"

	"github.com/kilnml/kiln/core"
)

// RunStatus is a run's state, as MLflow names them.
type RunStatus string

// Run states: a run starts Running and ends once in one of the others.
const (
	Running  RunStatus = "RUNNING"
	Finished RunStatus = "FINISHED"
	Failed   RunStatus = "FAILED"
	Killed   RunStatus = "KILLED"
)

// Run is one recorded job: a training, a model selection, an
// optimization.
type Run struct {
	// ID is 32 hex digits.
	ID string `json:"run_id"`
	// Kind is what ran: "train", "select", "optimize", ...
	Kind string `json:"kind"`
	// Model is the registered model the run is for, if any.
	Model  string            `json:"model,omitempty"`
	Status RunStatus         `json:"status"`
	Params map[string]string `json:"params,omitempty"`
	// Metrics are the final metrics.
	Metrics   map[string]float64 `json:"metrics,omitempty"`
	StartedAt time.Time          `json:"started_at"`
	EndedAt   *time.Time         `json:"ended_at,omitempty"`
	// Seconds is the run's duration (set when it ends).
	Seconds   float64 `json:"seconds,omitempty"`
	Error     string  `json:"error,omitempty"`
	CreatedBy string  `json:"created_by"`
}

// Metric is one logged value of a metric at a step (an epoch).
type Metric struct {
	Key   string    `json:"key"`
	Step  int       `json:"step"`
	Value float64   `json:"value"`
	At    time.Time `json:"at"`
}

// StartRun records a new running run of kind (for model, which may be ""
// and need not be registered yet) with its parameters.
func (r *Registry) StartRun(ctx context.Context, kind, model, actor string, params map[string]string) (Run, error) {
	if kind == "" {
		return Run{}, core.Errorf(core.InvalidArgument, "registry: a run needs a kind (train, select, optimize, ...)")
	}
	if model != "" {
		if err := checkModelName(model); err != nil {
			return Run{}, err
		}
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return Run{}, err
	}
	id := hex.EncodeToString(b[:])
	now := time.Now().UTC()
	err := r.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, r.q(`INSERT INTO runs (id, kind, model_name, status, started_at, created_by) VALUES (?, ?, ?, ?, ?, ?)`),
			id, kind, model, string(Running), r.ts(now), actorOr(actor)); err != nil {
			return dbErr(err, "start run")
		}
		return r.logParams(ctx, tx, id, params)
	})
	if err != nil {
		return Run{}, err
	}
	return r.Run(ctx, id)
}

// LogParams adds parameters to a run. A parameter is logged once: the same
// key again is AlreadyExists.
func (r *Registry) LogParams(ctx context.Context, runID string, params map[string]string) error {
	return r.tx(ctx, func(tx *sql.Tx) error {
		if err := r.runExists(ctx, tx, runID); err != nil {
			return err
		}
		return r.logParams(ctx, tx, runID, params)
	})
}

func (r *Registry) logParams(ctx context.Context, tx *sql.Tx, runID string, params map[string]string) error {
	keys := make([]string, 0, len(params))
	for k := range params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if k == "" {
			return core.Errorf(core.InvalidArgument, "registry: run %s: a parameter needs a name", runID)
		}
		_, err := tx.ExecContext(ctx, r.q(`INSERT INTO run_params (run_id, key, value) VALUES (?, ?, ?)`), runID, k, params[k])
		if isUnique(err) {
			return core.Errorf(core.AlreadyExists, "registry: run %s: parameter %q is already logged", runID, k)
		}
		if err != nil {
			return dbErr(err, "run %s: log parameter %q", runID, k)
		}
	}
	return nil
}

// LogMetrics records metric values at step (an epoch); a value logged
// again at the same step replaces the earlier one (a resumed training
// repeats an epoch). NaN and infinities are refused.
func (r *Registry) LogMetrics(ctx context.Context, runID string, step int, metrics map[string]float64) error {
	now := time.Now().UTC()
	return r.tx(ctx, func(tx *sql.Tx) error {
		if err := r.runExists(ctx, tx, runID); err != nil {
			return err
		}
		for k, v := range metrics {
			if k == "" || math.IsNaN(v) || math.IsInf(v, 0) {
				return core.Errorf(core.InvalidArgument, "registry: run %s: metric %q = %v: want a name and a finite value", runID, k, v)
			}
			if _, err := tx.ExecContext(ctx, r.q(`INSERT INTO run_metrics (run_id, key, step, value, logged_at) VALUES (?, ?, ?, ?, ?)
				ON CONFLICT (run_id, key, step) DO UPDATE SET value = excluded.value, logged_at = excluded.logged_at`),
				runID, k, step, v, r.ts(now)); err != nil {
				return dbErr(err, "run %s: log metric %q", runID, k)
			}
		}
		return nil
	})
}

// FinishRun ends a running run with status (Finished, Failed or Killed),
// its final metrics (non-finite values are dropped) and, for a failure,
// the error; the duration is the time since it started. Ending a run
// twice is FailedPrecondition.
func (r *Registry) FinishRun(ctx context.Context, runID string, status RunStatus, metrics map[string]float64, runErr error) (Run, error) {
	if status != Finished && status != Failed && status != Killed {
		return Run{}, core.Errorf(core.InvalidArgument, "registry: run %s: end status %q: want FINISHED, FAILED or KILLED", runID, status)
	}
	final := map[string]float64{}
	for k, v := range metrics {
		if !math.IsNaN(v) && !math.IsInf(v, 0) {
			final[k] = v
		}
	}
	mj, _ := json.Marshal(final)
	msg := ""
	if runErr != nil {
		msg = runErr.Error()
	}
	now := time.Now().UTC()
	err := r.tx(ctx, func(tx *sql.Tx) error {
		run, err := r.run(ctx, tx, runID)
		if err != nil {
			return err
		}
		if run.Status != Running {
			return core.Errorf(core.FailedPrecondition, "registry: run %s already ended (%s)", runID, run.Status)
		}
		_, err = tx.ExecContext(ctx, r.q(`UPDATE runs SET status = ?, ended_at = ?, duration_seconds = ?, error = ?, final_metrics = ? WHERE id = ?`),
			string(status), r.ts(now), now.Sub(run.StartedAt).Seconds(), msg, string(mj), runID)
		return dbErr(err, "finish run %s", runID)
	})
	if err != nil {
		return Run{}, err
	}
	return r.Run(ctx, runID)
}

// Run returns a run with its parameters and final metrics; an unknown id
// is NotFound.
func (r *Registry) Run(ctx context.Context, id string) (Run, error) { return r.run(ctx, r.db, id) }

func (r *Registry) runExists(ctx context.Context, q querier, id string) error {
	var one int
	err := q.QueryRowContext(ctx, r.q(`SELECT 1 FROM runs WHERE id = ?`), id).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return core.Errorf(core.NotFound, "registry: run %q not found", id)
	}
	return dbErr(err, "look up run %q", id)
}

const runColumns = `id, kind, model_name, status, started_at, ended_at, duration_seconds, error, final_metrics, created_by FROM runs`

func (r *Registry) run(ctx context.Context, q querier, id string) (Run, error) {
	runs, err := r.runs(ctx, q, `WHERE id = ?`, 0, id)
	if err != nil {
		return Run{}, err
	}
	if len(runs) == 0 {
		return Run{}, core.Errorf(core.NotFound, "registry: run %q not found", id)
	}
	return runs[0], nil
}

// Runs returns runs, newest first: those for model when it is not "", at
// most limit when limit > 0.
func (r *Registry) Runs(ctx context.Context, model string, limit int) ([]Run, error) {
	where, args := ``, []any{}
	if model != "" {
		where, args = `WHERE model_name = ?`, append(args, model)
	}
	return r.runs(ctx, r.db, where, limit, args...)
}

// runs lists the runs matching where, newest first, at most limit (> 0).
func (r *Registry) runs(ctx context.Context, q querier, where string, limit int, args ...any) ([]Run, error) {
	query := `SELECT ` + runColumns + ` ` + where + ` ORDER BY started_at DESC, id`
	if limit > 0 {
		query += ` LIMIT ?`
		args = append(args, limit)
	}
	rows, err := q.QueryContext(ctx, r.q(query), args...)
	if err != nil {
		return nil, dbErr(err, "list runs")
	}
	var out []Run
	for rows.Next() {
		var run Run
		var status, metrics string
		var started, ended dbTime
		var secs sql.NullFloat64
		if err := rows.Scan(&run.ID, &run.Kind, &run.Model, &status, &started, &ended, &secs, &run.Error, &metrics, &run.CreatedBy); err != nil {
			rows.Close()
			return nil, dbErr(err, "list runs")
		}
		run.Status, run.StartedAt, run.Seconds = RunStatus(status), started.T, secs.Float64
		if ended.Valid {
			t := ended.T
			run.EndedAt = &t
		}
		if err := json.Unmarshal([]byte(metrics), &run.Metrics); err != nil {
			rows.Close()
			return nil, core.Errorf(core.Internal, "registry: run %s: stored metrics: %v", run.ID, err)
		}
		if len(run.Metrics) == 0 {
			run.Metrics = nil
		}
		out = append(out, run)
	}
	err = rows.Err()
	rows.Close()
	if err != nil {
		return nil, dbErr(err, "list runs")
	}
	for i := range out {
		prow, err := q.QueryContext(ctx, r.q(`SELECT key, value FROM run_params WHERE run_id = ?`), out[i].ID)
		if err != nil {
			return nil, dbErr(err, "run %s: parameters", out[i].ID)
		}
		for prow.Next() {
			var k, v string
			if err := prow.Scan(&k, &v); err != nil {
				prow.Close()
				return nil, dbErr(err, "run %s: parameters", out[i].ID)
			}
			if out[i].Params == nil {
				out[i].Params = map[string]string{}
			}
			out[i].Params[k] = v
		}
		prow.Close()
	}
	return out, nil
}

// RunMetrics returns a run's logged metric values, by key then step.
func (r *Registry) RunMetrics(ctx context.Context, runID string) ([]Metric, error) {
	if err := r.runExists(ctx, r.db, runID); err != nil {
		return nil, err
	}
	rows, err := r.db.QueryContext(ctx, r.q(`SELECT key, step, value, logged_at FROM run_metrics WHERE run_id = ? ORDER BY key, step`), runID)
	if err != nil {
		return nil, dbErr(err, "run %s: metrics", runID)
	}
	defer rows.Close()
	var out []Metric
	for rows.Next() {
		var m Metric
		var at dbTime
		if err := rows.Scan(&m.Key, &m.Step, &m.Value, &at); err != nil {
			return nil, dbErr(err, "run %s: metrics", runID)
		}
		m.At = at.T
		out = append(out, m)
	}
	return out, dbErr(rows.Err(), "run %s: metrics", runID)
}
