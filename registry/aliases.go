package registry

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/kilnml/kiln/core"
)

// Alias returns the version alias points at; an unknown model or alias is
// NotFound.
func (r *Registry) Alias(ctx context.Context, name, alias string) (int, error) {
	if err := checkAlias(alias); err != nil {
		return 0, err
	}
	id, err := r.modelID(ctx, r.db, name)
	if err != nil {
		return 0, err
	}
	v, ok, err := r.aliasVersion(ctx, r.db, id, alias)
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, core.Errorf(core.NotFound, "registry: model %q has no alias %q", name, alias)
	}
	return v, nil
}

func (r *Registry) aliasVersion(ctx context.Context, q querier, modelID int64, alias string) (int, bool, error) {
	var v int
	err := q.QueryRowContext(ctx, r.q(`SELECT version FROM aliases WHERE model_id = ? AND alias = ?`), modelID, alias).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, dbErr(err, "look up alias %q", alias)
	}
	return v, true, nil
}

// Move is one compare-and-swap of an alias.
type Move struct {
	Model, Alias string
	// Expected is the version the alias must point at now; 0: the alias
	// must not exist.
	Expected int
	// To is the version it then points at; 0 removes the alias.
	To int
	// Actor moves it (a user, a token's name); Reason and Verdict say
	// why (Verdict: an evaluation gate's verdict, e.g. "pass").
	Actor, Reason, Verdict string
	// EvaluationID is the evaluation (RecordEvaluation) that decided the
	// move, if any.
	EvaluationID int64
}

// AliasEvent is one move of an alias, as the audit history keeps it.
type AliasEvent struct {
	ID    int64  `json:"id"`
	Model string `json:"model"`
	Alias string `json:"alias"`
	// From and To are the versions before and after (0: none).
	From         int       `json:"from"`
	To           int       `json:"to"`
	Actor        string    `json:"actor"`
	Reason       string    `json:"reason,omitempty"`
	Verdict      string    `json:"verdict,omitempty"`
	EvaluationID int64     `json:"evaluation_id,omitempty"`
	At           time.Time `json:"at"`
}

// CompareAndSwap moves an alias from m.Expected to m.To when it is still
// at m.Expected, and records the move as an audit event, in one
// transaction: a crash leaves the alias and its history at the old state
// or the new one. When another writer moved it first the error wraps
// ErrConflict (FailedPrecondition) and says where the alias is now. An
// unknown model or target version is NotFound.
func (r *Registry) CompareAndSwap(ctx context.Context, m Move) (AliasEvent, error) {
	if err := checkAlias(m.Alias); err != nil {
		return AliasEvent{}, err
	}
	if m.Expected < 0 || m.To < 0 || (m.Expected == 0 && m.To == 0) {
		return AliasEvent{}, core.Errorf(core.InvalidArgument, "registry: alias %q: move from version %d to %d: want versions ≥ 1 (0: none) and not none to none", m.Alias, m.Expected, m.To)
	}
	ev := AliasEvent{Model: m.Model, Alias: m.Alias, From: m.Expected, To: m.To, Actor: actorOr(m.Actor),
		Reason: m.Reason, Verdict: m.Verdict, EvaluationID: m.EvaluationID, At: time.Now().UTC()}
	var modelID int64
	conflict := false
	err := r.tx(ctx, func(tx *sql.Tx) error {
		var err error
		if modelID, err = r.modelID(ctx, tx, m.Model); err != nil {
			return err
		}
		if m.To > 0 {
			if _, err := r.versionID(ctx, tx, Ref{m.Model, m.To}); err != nil {
				return err
			}
		}
		var res sql.Result
		switch {
		case m.Expected == 0:
			res, err = tx.ExecContext(ctx, r.q(`INSERT INTO aliases (model_id, alias, version, revision, updated_at, updated_by) VALUES (?, ?, ?, 1, ?, ?)
				ON CONFLICT (model_id, alias) DO NOTHING`), modelID, m.Alias, m.To, r.ts(ev.At), ev.Actor)
		case m.To == 0:
			res, err = tx.ExecContext(ctx, r.q(`DELETE FROM aliases WHERE model_id = ? AND alias = ? AND version = ?`), modelID, m.Alias, m.Expected)
		default:
			res, err = tx.ExecContext(ctx, r.q(`UPDATE aliases SET version = ?, revision = revision + 1, updated_at = ?, updated_by = ?
				WHERE model_id = ? AND alias = ? AND version = ?`), m.To, r.ts(ev.At), ev.Actor, modelID, m.Alias, m.Expected)
		}
		if err != nil {
			return dbErr(err, "move alias %q of %q", m.Alias, m.Model)
		}
		if n, err := res.RowsAffected(); err != nil || n != 1 {
			conflict = true
			return ErrConflict
		}
		var evalID any
		if m.EvaluationID != 0 {
			evalID = m.EvaluationID
		}
		if err := tx.QueryRowContext(ctx, r.q(`INSERT INTO alias_events (model_id, alias, from_version, to_version, actor, reason, verdict, evaluation_id, at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id`),
			modelID, m.Alias, nullVersion(m.Expected), nullVersion(m.To), ev.Actor, m.Reason, m.Verdict, evalID, r.ts(ev.At)).Scan(&ev.ID); err != nil {
			return dbErr(err, "record the move of alias %q", m.Alias)
		}
		if r.beforeCommit != nil {
			r.beforeCommit()
		}
		return nil
	})
	if conflict {
		now, ok, lerr := r.aliasVersion(ctx, r.db, modelID, m.Alias)
		where := "does not exist"
		if lerr != nil {
			where = "cannot be read: " + lerr.Error()
		} else if ok {
			where = fmt.Sprintf("is at version %d", now)
		}
		want := "not to exist"
		if m.Expected > 0 {
			want = fmt.Sprintf("at version %d", m.Expected)
		}
		return AliasEvent{}, fmt.Errorf("%w: alias %q of model %q %s; expected it %s", ErrConflict, m.Alias, m.Model, where, want)
	}
	if err != nil {
		return AliasEvent{}, err
	}
	r.log.Info("registry: alias moved", "model", m.Model, "alias", m.Alias, "from", m.Expected, "to", m.To, "actor", ev.Actor, "reason", m.Reason, "verdict", m.Verdict)
	return ev, nil
}

func nullVersion(v int) any {
	if v == 0 {
		return nil
	}
	return v
}

// History returns the moves of a model's aliases, oldest first: of one
// alias, or of all when alias is "". An unknown model is NotFound.
func (r *Registry) History(ctx context.Context, name, alias string) ([]AliasEvent, error) {
	id, err := r.modelID(ctx, r.db, name)
	if err != nil {
		return nil, err
	}
	query, args := `SELECT id, alias, from_version, to_version, actor, reason, verdict, evaluation_id, at FROM alias_events WHERE model_id = ?`, []any{id}
	if alias != "" {
		if err := checkAlias(alias); err != nil {
			return nil, err
		}
		query += ` AND alias = ?`
		args = append(args, alias)
	}
	rows, err := r.db.QueryContext(ctx, r.q(query+` ORDER BY id`), args...)
	if err != nil {
		return nil, dbErr(err, "alias history of %q", name)
	}
	defer rows.Close()
	var out []AliasEvent
	for rows.Next() {
		e := AliasEvent{Model: name}
		var from, to, evalID sql.NullInt64
		var at dbTime
		if err := rows.Scan(&e.ID, &e.Alias, &from, &to, &e.Actor, &e.Reason, &e.Verdict, &evalID, &at); err != nil {
			return nil, dbErr(err, "alias history of %q", name)
		}
		e.From, e.To, e.EvaluationID, e.At = int(from.Int64), int(to.Int64), evalID.Int64, at.T
		out = append(out, e)
	}
	return out, dbErr(rows.Err(), "alias history of %q", name)
}

// Evaluation is a verdict on a model version with the evidence behind it
// (an evaluation gate's metrics, thresholds and comparisons, as JSON).
type Evaluation struct {
	ID      int64  `json:"id"`
	Model   string `json:"model"`
	Version int    `json:"version"`
	// Verdict is the gate's decision, e.g. "pass" or "fail".
	Verdict string `json:"verdict"`
	// Evidence is a JSON value.
	Evidence json.RawMessage `json:"evidence"`
	// RunID is the run that evaluated, if recorded.
	RunID     string    `json:"run_id,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by"`
}

// RecordEvaluation stores a verdict on e.Model's version e.Version with
// its evidence (valid JSON; null when empty) and returns it with its ID,
// which a CompareAndSwap's Move.EvaluationID can cite.
func (r *Registry) RecordEvaluation(ctx context.Context, e Evaluation) (Evaluation, error) {
	if e.Verdict == "" {
		return Evaluation{}, core.Errorf(core.InvalidArgument, "registry: an evaluation needs a verdict")
	}
	if len(e.Evidence) == 0 {
		e.Evidence = json.RawMessage("null")
	}
	if !json.Valid(e.Evidence) {
		return Evaluation{}, core.Errorf(core.InvalidArgument, "registry: evaluation of %s: evidence is not valid JSON", Ref{e.Model, e.Version})
	}
	e.CreatedBy, e.CreatedAt = actorOr(e.CreatedBy), time.Now().UTC()
	err := r.tx(ctx, func(tx *sql.Tx) error {
		id, err := r.versionID(ctx, tx, Ref{e.Model, e.Version})
		if err != nil {
			return err
		}
		var runID any
		if e.RunID != "" {
			if err := r.runExists(ctx, tx, e.RunID); err != nil {
				return err
			}
			runID = e.RunID
		}
		return dbErr(tx.QueryRowContext(ctx, r.q(`INSERT INTO evaluations (model_id, version, verdict, evidence, run_id, created_at, created_by)
			VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id`), id, e.Version, e.Verdict, string(e.Evidence), runID, r.ts(e.CreatedAt), e.CreatedBy).Scan(&e.ID),
			"record evaluation of %s", Ref{e.Model, e.Version})
	})
	if err != nil {
		return Evaluation{}, err
	}
	return e, nil
}

// Evaluations returns the evaluations of a model's version (of all its
// versions when version is 0), oldest first.
func (r *Registry) Evaluations(ctx context.Context, name string, version int) ([]Evaluation, error) {
	id, err := r.modelID(ctx, r.db, name)
	if err != nil {
		return nil, err
	}
	query, args := `SELECT id, version, verdict, evidence, run_id, created_at, created_by FROM evaluations WHERE model_id = ?`, []any{id}
	if version > 0 {
		query += ` AND version = ?`
		args = append(args, version)
	}
	rows, err := r.db.QueryContext(ctx, r.q(query+` ORDER BY id`), args...)
	if err != nil {
		return nil, dbErr(err, "evaluations of %q", name)
	}
	defer rows.Close()
	var out []Evaluation
	for rows.Next() {
		e := Evaluation{Model: name}
		var evidence string
		var runID sql.NullString
		var at dbTime
		if err := rows.Scan(&e.ID, &e.Version, &e.Verdict, &evidence, &runID, &at, &e.CreatedBy); err != nil {
			return nil, dbErr(err, "evaluations of %q", name)
		}
		e.Evidence, e.RunID, e.CreatedAt = json.RawMessage(evidence), runID.String, at.T
		out = append(out, e)
	}
	return out, dbErr(rows.Err(), "evaluations of %q", name)
}
