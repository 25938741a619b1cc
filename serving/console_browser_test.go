package serving

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnml/kiln/core/evaluate"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/auth"
	kflight "github.com/kilnml/kiln/serving/flightserver"
)

// chromiumPath is Debian's chromium (scripts/install-deps installs it);
// KILN_CHROMIUM overrides it.
func chromiumPath(t *testing.T) string {
	t.Helper()
	p := os.Getenv("KILN_CHROMIUM")
	if p == "" {
		p = "/usr/bin/chromium"
	}
	if _, err := exec.LookPath(p); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("chromium not found at %s (scripts/install-deps installs it): %v", p, err)
		}
		t.Skipf("chromium not found at %s (scripts/install-deps installs it)", p)
	}
	return p
}

// browser is one headless Chromium tab that records the page's uncaught
// exceptions, console.error calls and error entries of the browser log
// (failed loads).
type browser struct {
	ctx    context.Context
	mu     sync.Mutex
	errors []string
}

func newBrowser(t *testing.T) *browser {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(chromiumPath(t)),
		chromedp.NoSandbox, chromedp.WindowSize(1360, 900), chromedp.Flag("disable-gpu", true))
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelC := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelC(); cancelA() })
	b := &browser{ctx: ctx}
	msgs := chromedp.Console(ctx) // starts the browser and subscribes
	go func() {
		for m, err := range msgs {
			if err != nil {
				return
			}
			if m.Type == chromedp.ConsoleError || m.Type == chromedp.ConsoleException {
				b.mu.Lock()
				b.errors = append(b.errors, fmt.Sprintf("%s: %s (%s:%d)", m.Type, m.Text, m.URL, m.Line+1))
				b.mu.Unlock()
			}
		}
	}()
	return b
}

// do runs steps with a time limit.
func (b *browser) do(t *testing.T, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	require.NoError(t, chromedp.Do(ctx, steps...))
}

// eval evaluates a JavaScript expression in the page.
func eval[T any](t *testing.T, b *browser, expr string) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	require.NoError(t, err, "evaluating %s", expr)
	return v
}

// text is the text of the first element sel matches.
func (b *browser) text(t *testing.T, sel string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	require.NoError(t, err, "text of %s", sel)
	return s
}

// takeErrors returns and forgets the errors seen so far (after a moment
// for the last events to arrive).
func (b *browser) takeErrors() []string {
	time.Sleep(100 * time.Millisecond)
	b.mu.Lock()
	defer b.mu.Unlock()
	e := b.errors
	b.errors = nil
	return e
}

// open loads url and waits until the console says the page rendered
// (body[data-loaded=want]).
func (b *browser) open(t *testing.T, url, want string) {
	t.Helper()
	b.do(t, chromedp.Navigate(url), chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`body[data-loaded=%q]`, want))))
}

// shot saves a screenshot of the page to /tmp/console-shots/name.png.
func (b *browser) shot(t *testing.T, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	time.Sleep(150 * time.Millisecond)
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	require.NoError(t, err)
	dir := filepath.Join(os.TempDir(), "console-shots")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, name+".png"), png, 0o644))
}

// blobs is a three-class table of two features for the Flight train action.
func blobs(n int) arrow.RecordBatch {
	rng := rand.New(rand.NewPCG(1, 7))
	schema := arrow.NewSchema([]arrow.Field{
		{Name: "x0", Type: arrow.PrimitiveTypes.Float32},
		{Name: "x1", Type: arrow.PrimitiveTypes.Float32},
		{Name: "cls", Type: arrow.BinaryTypes.String},
	}, nil)
	b := array.NewRecordBuilder(memory.NewGoAllocator(), schema)
	defer b.Release()
	centers := map[string][2]float64{"north": {0, 3}, "east": {3, 0}, "south": {0, -3}}
	names := []string{"north", "east", "south"}
	for i := 0; i < n; i++ {
		c := centers[names[i%3]]
		b.Field(0).(*array.Float32Builder).Append(float32(c[0] + rng.NormFloat64()*0.5))
		b.Field(1).(*array.Float32Builder).Append(float32(c[1] + rng.NormFloat64()*0.5))
		b.Field(2).(*array.StringBuilder).Append(names[i%3])
	}
	return b.NewRecordBatch()
}

// trainOverFlight stores the blobs dataset and trains a model on it for
// three epochs through the Flight train action (recorded as a registry
// run, registered as blobs-clf); it returns the run's id.
func trainOverFlight(t *testing.T, addr string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := flight.NewClientWithMiddleware(addr, nil, nil, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer c.Close()
	rec := blobs(150)
	defer rec.Release()
	put, err := c.DoPut(ctx)
	require.NoError(t, err)
	w := flight.NewRecordWriter(put, ipc.WithSchema(rec.Schema()))
	w.SetFlightDescriptor(&flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "blobs"}})
	require.NoError(t, w.Write(rec))
	require.NoError(t, w.Close())
	require.NoError(t, put.CloseSend())
	for {
		if _, err := put.Recv(); err != nil {
			break
		}
	}
	action := func(typ string, body []byte) []byte {
		s, err := c.DoAction(ctx, &flight.Action{Type: typ, Body: body})
		require.NoError(t, err)
		res, err := s.Recv()
		require.NoError(t, err)
		return res.GetBody()
	}
	body, _ := json.Marshal(map[string]any{"dataset": "blobs", "target": "cls", "epochs": 3, "seed": 3, "register": "blobs-clf",
		"spec": "model:\n  layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]\nsplit: {val: 0.2, test: 0.2}\ntrain: {batch_size: 16, optimizer: {type: adam, lr: 0.01}}\n"})
	var started struct {
		JobID string `json:"job_id"`
	}
	require.NoError(t, json.Unmarshal(action("train", body), &started))
	for {
		var st kflight.JobStatus
		require.NoError(t, json.Unmarshal(action("job-status", []byte(started.JobID)), &st))
		if st.State != kflight.JobRunning {
			require.Equal(t, kflight.JobSucceeded, st.State, "job %+v", st)
			require.NotEmpty(t, st.RunID)
			return st.RunID
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// consoleRegistry makes a SQLite registry with model m: v1 (production)
// and v2, v1's int8 variant (its optimization report), with an
// evaluation of v2 against production.
func consoleRegistry(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	db := filepath.Join(t.TempDir(), "registry.db")
	reg, err := registry.Open(ctx, db, registry.Options{})
	require.NoError(t, err)
	defer reg.Close()
	_, err = reg.RegisterVersion(ctx, "m", registeredPackage(t, "v1-float", "m"), registry.RegisterOptions{Actor: "test"})
	require.NoError(t, err)
	_, err = reg.RegisterVersion(ctx, "m", registeredPackage(t, "v1-int8", "m"), registry.RegisterOptions{Actor: "test", Parent: &registry.Ref{Model: "m", Version: 1}})
	require.NoError(t, err)
	_, err = reg.CompareAndSwap(ctx, registry.Move{Model: "m", Alias: "production", To: 1, Actor: "test"})
	require.NoError(t, err)
	ev, err := json.Marshal(evaluate.Evidence{Verdict: evaluate.Hold, Reason: "the candidate is not better by the margin",
		Metric: "accuracy", HigherIsBetter: true, Test: "mcnemar-exact", MinMargin: 0.01, Alpha: 0.05,
		Candidate: evaluate.ModelResult{Ref: "models:/m/2", Metrics: map[string]float64{"accuracy": 0.58, "f1_macro": 0.55}, Latency: evaluate.Latency{P50Ms: 0.04, P95Ms: 0.05}},
		Baseline:  evaluate.ModelResult{Ref: "models:/m@production", Metrics: map[string]float64{"accuracy": 0.58, "f1_macro": 0.56}, Latency: evaluate.Latency{P50Ms: 0.04, P95Ms: 0.06}}})
	require.NoError(t, err)
	_, err = reg.RecordEvaluation(ctx, registry.Evaluation{Model: "m", Version: 2, Verdict: string(evaluate.Hold), Evidence: ev, CreatedBy: "test"})
	require.NoError(t, err)
	return db
}

// TestConsoleInBrowser: kiln serve's console in headless Chromium. With
// auth off every page loads with no console error or exception, a training
// run of three epochs (Flight train action, recorded in the registry)
// draws exactly three points per curve, and the models, evaluations,
// datasets and optimization pages show what the registry and Flight hold;
// with a token, a page asks for it, and once given, loads.
func TestConsoleInBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("starts Chromium")
	}
	chromiumPath(t)
	db := consoleRegistry(t)

	cfg := testConfig(t.TempDir(), Config{})
	cfg.HTTPPort, cfg.FlightPort, cfg.DataDir = 0, 0, t.TempDir()
	cfg.Registry, cfg.RegistryPollInterval = db, 50*time.Millisecond
	srv := serve(t, cfg)
	runID := trainOverFlight(t, srv.FlightAddr().String())
	base := "http://" + srv.HTTPAddr().String()

	b := newBrowser(t)
	pages := []struct{ path, page string }{
		{"/", "models"}, {"/runs", "runs"}, {"/runs/" + runID, "runs"}, {"/evaluations", "evaluations"},
		{"/rollouts", "rollouts"}, {"/datasets", "datasets"}, {"/optimizations", "optimizations"},
	}
	for _, p := range pages {
		b.open(t, base+p.path, p.page)
		name := strings.Trim(strings.ReplaceAll(p.path, "/", "-"), "-")
		if strings.HasPrefix(p.path, "/runs/") {
			name = "run"
		}
		if name == "" {
			name = "models"
		}
		b.shot(t, name)
		assert.Empty(t, b.takeErrors(), "console errors on %s", p.path)
	}

	// The training run: one point per epoch on each curve.
	b.open(t, base+"/runs/"+runID, "runs")
	assert.Equal(t, 3, eval[int](t, b, `window.kilnCharts.loss.data[0].length`), "loss curve points")
	assert.Equal(t, 3, eval[int](t, b, `window.kilnCharts.metrics.data[0].length`), "validation curve points")
	lineage := b.text(t, "#lineage")
	assert.Contains(t, lineage, "blobs", "dataset in the lineage")
	assert.Contains(t, lineage, "blobs-clf v1", "registered version in the lineage")

	// What the other pages show.
	text := func(path, page, sel string) string {
		b.open(t, base+path, page)
		return b.text(t, sel)
	}
	models := text("/models", "models", "main")
	assert.Contains(t, models, "production → v1")
	assert.Contains(t, models, "blobs-clf")
	evals := text("/evaluations", "evaluations", "main")
	assert.Contains(t, evals, "HOLD")
	assert.Contains(t, evals, "mcnemar-exact")
	datasets := text("/datasets", "datasets", "#datasets")
	assert.Contains(t, datasets, "blobs")
	assert.Contains(t, datasets, "150")
	assert.Contains(t, datasets, "blobs-clf v1", "the version trained on it")
	b.open(t, base+"/optimizations", "optimizations")
	assert.Equal(t, 2, eval[int](t, b, `window.kilnCharts["size-m-v2"].data[0].length`), "v2's report has two variants (fp32, int8)")

	// Unload from the models page: the model the training loaded (the
	// repository's "blobs") leaves the served set.
	loaded, err := srv.Manager().Acquire("blobs", "")
	require.NoError(t, err, "the trained model is served")
	loaded.Release()
	b.open(t, base+"/models", "models")
	b.do(t, chromedp.Click(chromedp.CSS(`.model[data-model="blobs"] button[data-action="unload"]`)))
	require.Eventually(t, func() bool {
		v, err := srv.Manager().Acquire("blobs", "")
		if err == nil {
			v.Release()
		}
		return err != nil
	}, 10*time.Second, 50*time.Millisecond, "unload from the console")
	assert.Empty(t, b.takeErrors(), "console errors after unloading")

	// A rollout of m's v2 against production v1: the page shows the split;
	// Abort moves every request back to production.
	post := func(path, body string) (int, []byte) {
		resp, err := http.Post(base+path, "application/json", strings.NewReader(body))
		require.NoError(t, err)
		defer resp.Body.Close()
		out, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, out
	}
	infer := func() string {
		code, out := post("/v2/models/m/infer", `{"inputs":[{"name":"a","datatype":"FP32","shape":[1,1],"data":[1]},{"name":"b","datatype":"FP32","shape":[1,1],"data":[2]},{"name":"colour","datatype":"BYTES","shape":[1,1],"data":["blue"]}]}`)
		require.Equal(t, 200, code, string(out))
		var r struct {
			ModelVersion string `json:"model_version"`
		}
		require.NoError(t, json.Unmarshal(out, &r))
		return r.ModelVersion
	}
	checkRolloutAbort(t, b, base, post, infer)

	// Auth on: the pages ask for the token, then load with it.
	acfg := testConfig(t.TempDir(), Config{Auth: auth.Config{Token: testToken}})
	acfg.HTTPPort, acfg.Registry, acfg.RegistryPollInterval = 0, db, 50*time.Millisecond
	asrv := serve(t, acfg)
	abase := "http://" + asrv.HTTPAddr().String()
	b.open(t, abase+"/models", "token")
	b.shot(t, "token")
	b.takeErrors() // the 401 that asked for the token
	b.do(t, chromedp.SendKeys(chromedp.CSS("#token"), testToken), chromedp.Click(chromedp.CSS("#token-submit")),
		chromedp.WaitVisible(chromedp.CSS(`body[data-loaded="models"]`)))
	models = text("/models", "models", "main")
	assert.Contains(t, models, "production → v1", "the token is kept for the tab's next pages")
	assert.Empty(t, b.takeErrors(), "console errors with the token")
}

// checkRolloutAbort starts a rollout of m's v2 against production v1 (half
// the traffic), checks that the rollouts page shows the split, clicks
// Abort and checks that the rollout is aborted and every request goes to
// production again.
func checkRolloutAbort(t *testing.T, b *browser, base string, post func(path, body string) (int, []byte), infer func() string) {
	t.Helper()
	code, out := post("/v2/rollouts/m/start", `{"candidate":2,"steps":[50,100],"window":"1h"}`)
	require.Equal(t, 200, code, string(out))
	for range 30 {
		infer() // traffic for the live windows
	}
	b.open(t, base+"/rollouts", "rollouts")
	b.do(t, chromedp.WaitVisible(chromedp.CSS(`.rollout[data-model="m"][data-state="running"] .split[data-weight="0.5"]`)))
	b.shot(t, "rollouts")
	b.do(t, chromedp.Click(chromedp.CSS(`.rollout[data-model="m"] button[data-action="abort"]`)),
		chromedp.WaitVisible(chromedp.CSS(`.rollout[data-model="m"][data-state="aborted"]`)))
	b.shot(t, "rollouts-aborted")
	resp, err := http.Get(base + "/v2/rollouts/m")
	require.NoError(t, err)
	var st struct{ State string }
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&st))
	resp.Body.Close()
	assert.Equal(t, "aborted", st.State)
	for range 20 {
		require.Equal(t, "1", infer(), "after abort every request goes to production")
	}
	assert.Empty(t, b.takeErrors(), "console errors on the rollout")
}
