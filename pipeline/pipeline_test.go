package pipeline_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/pipeline"
	"github.com/kilnml/kiln/registry"
)

func TestMain(m *testing.M) {
	if os.Getenv("KILN_PIPELINE_TEST_CHILD") != "" {
		os.Exit(child())
	}
	testkit.Main(m)
}

// child runs a pipeline in this process (the kill -9 test's victim):
// KILN_PIPELINE_TEST_CHILD is "RUNS_DIR REGISTRY SPEC".
func child() int {
	f := strings.Fields(os.Getenv("KILN_PIPELINE_TEST_CHILD"))
	ctx := context.Background()
	reg, err := registry.Open(ctx, f[1], registry.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	raw, _ := os.ReadFile(f[2])
	run, err := pipeline.Start(ctx, raw, f[2], pipeline.Options{RunsDir: f[0], Registry: reg, BaseDir: filepath.Dir(f[2])})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(run.ID())
	if _, err := run.Execute(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// spec is a digits pipeline: candidates (name: [widths]) trained for
// epochs at lr, then an int8 variant.
func spec(data string, epochs int, lr float64, cands map[string]int, extra string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `name: digits
data: {path: %s, target: digit, holdout: 0.25, stratify: true, seed: 7}
train: {epochs: %d, batch_size: 32, seed: 1, optimizer: {type: adam, lr: %g}}
select:
  candidates:
`, data, epochs, lr)
	for _, name := range []string{"small", "wide", "tiny"} {
		if w, ok := cands[name]; ok {
			fmt.Fprintf(&b, "    - {name: %s, layers: [{type: linear, out: %d}, {type: relu}, {type: linear}]}\n", name, w)
		}
	}
	b.WriteString("optimize: {variants: [{quantize: int8}], max_accuracy_drop: 0.03}\n")
	b.WriteString("evaluate: {min_margin: 0.01, bootstrap: 200}\n")
	b.WriteString(extra)
	return b.String()
}

type env struct {
	dir, runs, dsn string
	reg            *registry.Registry
	logs           *bytes.Buffer
}

func newEnv(t *testing.T, dsn string) *env {
	dir := t.TempDir()
	if dsn == "" {
		dsn = filepath.Join(dir, "registry.db")
	}
	opts := registry.Options{}
	if strings.HasPrefix(dsn, "postgres") {
		opts.ArtifactDir = filepath.Join(dir, "artifacts")
	}
	reg, err := registry.Open(context.Background(), dsn, opts)
	require.NoError(t, err)
	t.Cleanup(func() { reg.Close() })
	digits := filepath.Join(testkit.Fixture(t, "datasets"), "digits.csv")
	b, err := os.ReadFile(digits)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "digits.csv"), b, 0o644))
	return &env{dir: dir, runs: filepath.Join(dir, "runs"), dsn: dsn, reg: reg, logs: &bytes.Buffer{}}
}

func (e *env) opts() pipeline.Options {
	return pipeline.Options{RunsDir: e.runs, Registry: e.reg, Actor: "test", BaseDir: e.dir,
		Logger: slog.New(slog.NewTextHandler(e.logs, nil))}
}

func (e *env) write(t *testing.T, name, text string) string {
	p := filepath.Join(e.dir, name)
	require.NoError(t, os.WriteFile(p, []byte(text), 0o644))
	return p
}

func (e *env) run(t *testing.T, text string) *pipeline.Result {
	t.Helper()
	ctx := context.Background()
	run, err := pipeline.Start(ctx, []byte(text), "pipeline.yaml", e.opts())
	require.NoError(t, err)
	res, err := run.Execute(ctx)
	require.NoError(t, err, e.logs.String())
	return res
}

// TestDigitsLifecycle: a first pipeline trains two candidates, selects,
// quantizes, and, with no production yet, registers and promotes; a worse
// one is rejected (production unchanged); a better one is promoted. The
// registry then holds each run, stage, version, parent, verdict and move.
func TestDigitsLifecycle(t *testing.T) {
	e := newEnv(t, "")
	testLifecycle(t, e)
}

// TestDigitsLifecyclePostgres is the first run of the lifecycle on
// PostgreSQL.
func TestDigitsLifecyclePostgres(t *testing.T) {
	if testing.Short() {
		t.Skip("PostgreSQL: the SQLite lifecycle covers the engine")
	}
	e := newEnv(t, testkit.PostgreSQL(t))
	ctx := context.Background()
	res := e.run(t, spec("digits.csv", 3, 0.01, map[string]int{"small": 32, "wide": 96}, ""))
	assert.Equal(t, "PROMOTE", res.Verdict)
	v, err := e.reg.Alias(ctx, "digits", "production")
	require.NoError(t, err)
	assert.Equal(t, res.Candidate.Version, v)
}

func testLifecycle(t *testing.T, e *env) {
	ctx := context.Background()
	var progress []pipeline.Progress
	// 1. Two candidates, two epochs: a modest first model.
	opts := e.opts()
	opts.Progress = func(p pipeline.Progress) { progress = append(progress, p) }
	run, err := pipeline.Start(ctx, []byte(spec("digits.csv", 1, 0.003, map[string]int{"small": 32, "wide": 128}, "")), "first.yaml", opts)
	require.NoError(t, err)
	first, err := run.Execute(ctx)
	require.NoError(t, err, e.logs.String())
	assert.Equal(t, "PROMOTE", first.Verdict)
	assert.True(t, first.First)
	assert.True(t, first.Promoted)
	assert.Equal(t, 1, first.Trained.Version)
	assert.Equal(t, 2, first.Candidate.Version, "the int8 variant is the candidate")
	assert.Equal(t, 2, first.Serving)
	logs := e.logs.String()
	assert.Contains(t, logs, "pipeline: stage started")
	assert.Contains(t, logs, "pipeline: epoch")
	assert.Contains(t, logs, "candidate=wide")
	var stagesSeen, epochs int
	for _, p := range progress {
		if p.Message == "started" {
			stagesSeen++
		}
		if p.Epoch > 0 {
			epochs++
		}
	}
	assert.Equal(t, 7, stagesSeen)
	assert.Equal(t, 2, epochs, "one epoch per candidate")

	opt, err := e.reg.Version(ctx, "digits", 2)
	require.NoError(t, err)
	require.NotNil(t, opt.Parent)
	assert.Equal(t, registry.Ref{Model: "digits", Version: 1}, *opt.Parent)
	assert.Equal(t, first.RunID, opt.RunID)
	assert.NotEmpty(t, opt.Lineage.DataSHA256)
	assert.Contains(t, string(opt.Lineage.Optimization), `"quantize":"int8"`)
	assert.NotEmpty(t, opt.Lineage.Spec)
	assert.NotEmpty(t, opt.Lineage.Hyperparameters)
	evs, err := e.reg.Evaluations(ctx, "digits", 2)
	require.NoError(t, err)
	require.Len(t, evs, 1)
	assert.Equal(t, "PROMOTE", evs[0].Verdict)
	assert.Contains(t, string(evs[0].Evidence), "the first model is promoted without a comparison")
	hist, err := e.reg.History(ctx, "digits", "production")
	require.NoError(t, err)
	require.Len(t, hist, 1)
	assert.Equal(t, 0, hist[0].From)
	assert.Equal(t, 2, hist[0].To)
	assert.Equal(t, evs[0].ID, hist[0].EvaluationID)

	// The run and its stages are recorded.
	r, err := e.reg.Run(ctx, first.RunID)
	require.NoError(t, err)
	assert.Equal(t, "pipeline", r.Kind)
	assert.Equal(t, registry.Finished, r.Status)
	st, err := pipeline.ReadState(e.runs, first.RunID)
	require.NoError(t, err)
	assert.Equal(t, pipeline.RunFinished, st.Status)
	for _, s := range st.Stages {
		assert.Equal(t, pipeline.StageDone, s.Status, s.Name)
		require.Len(t, s.RunIDs, 1, s.Name)
		cr, err := e.reg.Run(ctx, s.RunIDs[0])
		require.NoError(t, err)
		assert.Equal(t, "pipeline."+s.Name, cr.Kind)
		assert.Equal(t, registry.Finished, cr.Status)
		assert.Equal(t, first.RunID, cr.Params["pipeline_run"])
	}
	var text bytes.Buffer
	require.NoError(t, st.WriteText(&text, false))
	assert.Contains(t, text.String(), "selected")
	assert.Contains(t, text.String(), "kept int8")

	// 2. A worse model (a tiny network, one epoch at a tiny learning
	// rate): rejected, production stays.
	worse := e.run(t, spec("digits.csv", 1, 1e-5, map[string]int{"tiny": 2}, ""))
	assert.Contains(t, []string{"REJECT", "HOLD"}, worse.Verdict)
	assert.False(t, worse.Promoted)
	assert.Equal(t, 2, worse.Baseline)
	v, err := e.reg.Alias(ctx, "digits", "production")
	require.NoError(t, err)
	assert.Equal(t, 2, v)

	// 3. A better model: promoted over version 2.
	better := e.run(t, spec("digits.csv", 12, 0.01, map[string]int{"wide": 128}, ""))
	assert.Equal(t, "PROMOTE", better.Verdict, better.Reason)
	assert.False(t, better.First)
	assert.Equal(t, 2, better.Baseline)
	v, err = e.reg.Alias(ctx, "digits", "production")
	require.NoError(t, err)
	assert.Equal(t, better.Candidate.Version, v)
	hist, err = e.reg.History(ctx, "digits", "production")
	require.NoError(t, err)
	require.Len(t, hist, 2)
	assert.Equal(t, 2, hist[1].From)
	assert.Contains(t, hist[1].Reason, better.RunID)
}

// TestColumnsChecked: data that does not fit is refused before a run is
// recorded: a missing target, and data lacking the production model's
// input columns.
func TestColumnsChecked(t *testing.T) {
	e := newEnv(t, "")
	ctx := context.Background()
	_, err := pipeline.Start(ctx, []byte(strings.Replace(spec("digits.csv", 1, 0.01, map[string]int{"small": 8}, ""), "target: digit", "target: label", 1)), "p.yaml", e.opts())
	require.Error(t, err)
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
	assert.Contains(t, err.Error(), `data.target: column "label" is not in the data (its columns: p0, p1`)
	_, err = pipeline.Start(ctx, []byte(spec("missing.csv", 1, 0.01, map[string]int{"small": 8}, "")), "p.yaml", e.opts())
	assert.ErrorContains(t, err, "data.path: ")
	assert.ErrorContains(t, err, "missing.csv: no such file")

	e.run(t, spec("digits.csv", 1, 0.01, map[string]int{"small": 8}, ""))
	// A table without p63 (which production takes) is refused.
	b, err := os.ReadFile(filepath.Join(e.dir, "digits.csv"))
	require.NoError(t, err)
	var out bytes.Buffer
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		cells := strings.Split(line, ",")
		out.WriteString(strings.Join(append(cells[:63:63], cells[64]), ",") + "\n")
	}
	e.write(t, "narrow.csv", out.String())
	_, err = pipeline.Start(ctx, []byte(spec("narrow.csv", 1, 0.01, map[string]int{"small": 8}, "")), "p.yaml", e.opts())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the data lacks p63, input column(s) of models:/digits/")
	runs, err := e.reg.Runs(ctx, "digits", 100)
	require.NoError(t, err)
	n := 0
	for _, r := range runs {
		if r.Kind == "pipeline" {
			n++
		}
	}
	assert.Equal(t, 1, n, "no run was recorded for the refused files")
}

// TestResumeAfterKill9: a pipeline killed with SIGKILL during training
// resumes from the train stage (data and preprocess are not redone) and
// ends with one consistent record: the run FINISHED, the killed attempt's
// child run KILLED, one version per model registered.
func TestResumeAfterKill9(t *testing.T) {
	e := newEnv(t, "")
	text := spec("digits.csv", 1000, 0.01, map[string]int{"wide": 64}, "")
	text = strings.Replace(text, "optimizer:", "max_seconds: 4, optimizer:", 1)
	p := e.write(t, "slow.yaml", text)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "KILN_PIPELINE_TEST_CHILD="+e.runs+" "+e.dsn+" "+p)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	line := make([]byte, 33)
	_, err = io.ReadFull(stdout, line)
	require.NoError(t, err, stderr.String())
	id := strings.TrimSpace(string(line))
	// Kill it once it is training and has logged an epoch.
	deadline := time.Now().Add(60 * time.Second)
	for {
		st, err := pipeline.ReadState(e.runs, id)
		if err == nil && st.Stage("train").Status == pipeline.StageRunning {
			ms, _ := e.reg.RunMetrics(context.Background(), st.Stage("train").RunIDs[0])
			if len(ms) > 0 {
				break
			}
		}
		require.True(t, time.Now().Before(deadline), "the child never trained: %s", stderr.String())
		time.Sleep(20 * time.Millisecond)
	}
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	_ = cmd.Wait()

	ctx := context.Background()
	st, err := pipeline.ReadState(e.runs, id)
	require.NoError(t, err)
	assert.Equal(t, pipeline.RunRunning, st.Status)
	assert.False(t, pipeline.Active(e.runs, id))
	var text2 bytes.Buffer
	require.NoError(t, st.WriteText(&text2, false))
	assert.Contains(t, text2.String(), "INTERRUPTED (resume with: kiln pipeline run FILE --resume "+id+")")

	// Another file cannot resume it; the same one can.
	_, err = pipeline.Resume(ctx, id, []byte(text+"# changed\n"), e.opts())
	assert.True(t, core.HasCode(err, core.FailedPrecondition), "%v", err)
	run, err := pipeline.Resume(ctx, id, nil, e.opts())
	require.NoError(t, err)
	res, err := run.Execute(ctx)
	require.NoError(t, err, e.logs.String())
	assert.Equal(t, "PROMOTE", res.Verdict)
	assert.Contains(t, e.logs.String(), "stage=data summary=")
	assert.Contains(t, e.logs.String(), "pipeline: stage already done")

	st, err = pipeline.ReadState(e.runs, id)
	require.NoError(t, err)
	assert.Equal(t, pipeline.RunFinished, st.Status)
	assert.Equal(t, 1, st.Resumes)
	assert.Equal(t, 1, st.Stage("data").Attempts)
	tr := st.Stage("train")
	assert.Equal(t, 2, tr.Attempts)
	require.Len(t, tr.RunIDs, 2)
	killed, err := e.reg.Run(ctx, tr.RunIDs[0])
	require.NoError(t, err)
	assert.Equal(t, registry.Killed, killed.Status)
	assert.Contains(t, killed.Error, "interrupted")
	r, err := e.reg.Run(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, registry.Finished, r.Status)
	vs, err := e.reg.Versions(ctx, "digits")
	require.NoError(t, err)
	assert.Len(t, vs, 2, "the trained model and its int8 variant, once each")

	// A finished run does not resume.
	_, err = pipeline.Resume(ctx, id, nil, e.opts())
	assert.True(t, core.HasCode(err, core.FailedPrecondition), "%v", err)
}

// TestResumeAfterRegisterAndPromote: a process that died after
// registering and moving the alias, before it checkpointed those stages,
// resumes without registering twice or moving the alias again.
func TestResumeAfterRegisterAndPromote(t *testing.T) {
	e := newEnv(t, "")
	ctx := context.Background()
	res := e.run(t, spec("digits.csv", 1, 0.01, map[string]int{"small": 32}, ""))
	// Rewind the state file to "register running, promote pending": what
	// a kill -9 right after the alias moved leaves.
	path := filepath.Join(e.runs, res.RunID, "state.json")
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var st map[string]any
	require.NoError(t, json.Unmarshal(b, &st))
	st["status"] = pipeline.RunRunning
	stages := st["stages"].([]any)
	for _, s := range stages {
		m := s.(map[string]any)
		switch m["name"] {
		case "register":
			m["status"] = pipeline.StageRunning
		case "promote":
			m["status"], m["output"], m["run_ids"], m["attempts"] = pipeline.StagePending, nil, nil, 0
		}
	}
	b, err = json.Marshal(st)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, b, 0o644))
	// The registry run ended already (FinishRun came before the kill in
	// this scenario's worst case): the resume accepts that.
	run, err := pipeline.Resume(ctx, res.RunID, nil, e.opts())
	require.NoError(t, err)
	again, err := run.Execute(ctx)
	require.NoError(t, err, e.logs.String())
	assert.Equal(t, res.Candidate, again.Candidate)
	assert.Equal(t, res.EvaluationID, again.EvaluationID)
	assert.True(t, again.Promoted)
	vs, err := e.reg.Versions(ctx, "digits")
	require.NoError(t, err)
	assert.Len(t, vs, 2)
	hist, err := e.reg.History(ctx, "digits", "production")
	require.NoError(t, err)
	assert.Len(t, hist, 1, "the alias moved once")
	evs, err := e.reg.Evaluations(ctx, "digits", res.Candidate.Version)
	require.NoError(t, err)
	assert.Len(t, evs, 1)
	assert.Contains(t, e.logs.String(), "already at version")
}

// TestPromoteAliasHandsOverToARollout: with evaluate.promote_alias, a
// PROMOTE moves that alias (the server's rollout takes it from there) and
// leaves production; the first model of a name still becomes production.
func TestPromoteAliasHandsOverToARollout(t *testing.T) {
	e := newEnv(t, "")
	ctx := context.Background()
	withCandidate := func(s string) string {
		return strings.Replace(s, "evaluate: {min_margin: 0.01, bootstrap: 200}", "evaluate: {min_margin: 0.01, bootstrap: 200, promote_alias: candidate}", 1)
	}
	first := e.run(t, withCandidate(spec("digits.csv", 1, 1e-3, map[string]int{"tiny": 4}, "")))
	require.Equal(t, "PROMOTE", first.Verdict)
	prod, err := e.reg.Alias(ctx, "digits", "production")
	require.NoError(t, err)
	assert.Equal(t, first.Candidate.Version, prod, "the first model becomes production")
	_, err = e.reg.Alias(ctx, "digits", "candidate")
	assert.Error(t, err, "no candidate alias for the first model")

	better := e.run(t, withCandidate(spec("digits.csv", 6, 0.01, map[string]int{"wide": 64}, "")))
	require.Equal(t, "PROMOTE", better.Verdict, better.Reason)
	cand, err := e.reg.Alias(ctx, "digits", "candidate")
	require.NoError(t, err)
	assert.Equal(t, better.Candidate.Version, cand)
	prod, err = e.reg.Alias(ctx, "digits", "production")
	require.NoError(t, err)
	assert.Equal(t, first.Candidate.Version, prod, "production stays until the rollout promotes")
	assert.Equal(t, first.Candidate.Version, better.Serving)
}
