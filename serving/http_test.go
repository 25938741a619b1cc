package serving

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnml/kiln/serving/auth"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
)

// startAll starts a server on a copy of the test repository (prepare, when
// given, edits the copy first) with gRPC, HTTP and metrics on loopback.
func startAll(t *testing.T, opts Config, prepare func(root string)) (*Server, string) {
	t.Helper()
	root := t.TempDir()
	require.NoError(t, os.CopyFS(root, os.DirFS(built)))
	if prepare != nil {
		prepare(root)
	}
	cfg := testConfig(root, opts)
	cfg.HTTPPort, cfg.MetricsPort = 0, 0
	srv, err := New(cfg)
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background()))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		assert.NoError(t, srv.Shutdown(ctx))
	})
	scheme := "http"
	if srv.TLS() {
		scheme = "https"
	}
	return srv, scheme + "://" + srv.HTTPAddr().String()
}

type httpResult struct {
	code   int
	header http.Header
	body   []byte
}

func (r httpResult) json(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	require.NoError(t, json.Unmarshal(r.body, &m), string(r.body))
	return m
}

func do(t *testing.T, c *http.Client, method, url string, body []byte, header map[string]string) httpResult {
	t.Helper()
	if c == nil {
		c = http.DefaultClient
	}
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	require.NoError(t, err)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return httpResult{resp.StatusCode, resp.Header, b}
}

func requireHTTPError(t *testing.T, r httpResult, code int, fragments ...string) {
	t.Helper()
	require.Equal(t, code, r.code, string(r.body))
	assert.Equal(t, "application/json", r.header.Get("Content-Type"))
	msg, _ := r.json(t)["error"].(string)
	require.NotEmpty(t, msg, string(r.body))
	for _, f := range fragments {
		assert.Contains(t, msg, f)
	}
}

func TestHTTPEndToEnd(t *testing.T) {
	_, base := startAll(t, Config{}, nil)
	v2 := base + "/v2"

	assert.Equal(t, 200, do(t, nil, "GET", v2+"/health/live", nil, nil).code)
	requireHTTPError(t, do(t, nil, "GET", v2+"/health/ready", nil, nil), 503, "not ready")
	idx := do(t, nil, "POST", v2+"/repository/index", nil, nil)
	require.Equal(t, 200, idx.code)
	var entries []map[string]string
	require.NoError(t, json.Unmarshal(idx.body, &entries))
	assert.Contains(t, entries, map[string]string{"name": "affine", "version": "2", "state": "READY"})
	require.Equal(t, 200, do(t, nil, "POST", v2+"/repository/models/corrupt/unload", []byte(`{"parameters":{"unload_dependents":false}}`), nil).code)
	assert.Equal(t, 200, do(t, nil, "GET", v2+"/health/ready", nil, nil).code)

	meta := do(t, nil, "GET", v2, nil, nil).json(t)
	assert.Equal(t, "kiln", meta["name"])
	assert.Contains(t, meta["extensions"], "binary_tensor_data")
	mm := do(t, nil, "GET", v2+"/models/affine", nil, nil).json(t)
	assert.Equal(t, []any{"1", "2"}, mm["versions"])
	assert.Equal(t, []any{map[string]any{"name": "x", "datatype": "FP32", "shape": []any{-1.0, 4.0}}}, mm["inputs"])
	assert.Equal(t, 200, do(t, nil, "GET", v2+"/models/affine/versions/1", nil, nil).code)
	assert.Equal(t, 200, do(t, nil, "GET", v2+"/models/affine/versions/1/ready", nil, nil).code)
	requireHTTPError(t, do(t, nil, "GET", v2+"/models/affine/versions/7/ready", nil, nil), 503, "version 7")
	cfg := do(t, nil, "GET", v2+"/models/affine/config", nil, nil).json(t)
	assert.Equal(t, 8.0, cfg["max_batch_size"])

	// JSON in, JSON out (the outputs listed, nested data accepted).
	r := do(t, nil, "POST", v2+"/models/affine/versions/1/infer", []byte(`{"id":"r1",
		"inputs":[{"name":"x","datatype":"FP32","shape":[2,4],"data":[[1,2,3,4],[0,0,0,0.5]]}],
		"outputs":[{"name":"s"},{"name":"y"}]}`), nil)
	require.Equal(t, 200, r.code, string(r.body))
	assert.Empty(t, r.header.Get("Inference-Header-Content-Length"))
	var resp struct {
		Outputs []struct {
			Name       string
			Datatype   string
			Shape      []int64
			Data       []float64
			Parameters map[string]any
		}
	}
	require.NoError(t, json.Unmarshal(r.body, &resp))
	m := r.json(t)
	assert.Equal(t, "affine", m["model_name"])
	assert.Equal(t, "1", m["model_version"])
	assert.Equal(t, "r1", m["id"])
	require.Len(t, resp.Outputs, 2)
	assert.Equal(t, "s", resp.Outputs[0].Name)
	assert.Equal(t, []float64{10, 0.5}, resp.Outputs[0].Data)
	assert.Equal(t, []int64{2, 4}, resp.Outputs[1].Shape)
	assert.Equal(t, []float64{3, 5, 7, 9, 1, 1, 1, 2}, resp.Outputs[1].Data)

	// Binary data extension both ways: the JSON header, then raw inputs.
	hdr := []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"parameters":{"binary_data_size":16}}],
		"parameters":{"binary_data_output":true}}`)
	r = do(t, nil, "POST", v2+"/models/affine/infer", append(append([]byte{}, hdr...), rawF32(1, 2, 3, 4)...),
		map[string]string{"Inference-Header-Content-Length": strconv.Itoa(len(hdr))})
	require.Equal(t, 200, r.code, string(r.body))
	n, err := strconv.Atoi(r.header.Get("Inference-Header-Content-Length"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(r.body[:n], &resp))
	require.Len(t, resp.Outputs, 2)
	assert.Equal(t, 16.0, resp.Outputs[0].Parameters["binary_data_size"])
	assert.Equal(t, 4.0, resp.Outputs[1].Parameters["binary_data_size"])
	bin := r.body[n:]
	require.Len(t, bin, 20)
	assert.Equal(t, []float32{4, 7, 10, 13}, f32s(bin[:16]), "version 2 by default (scale 3)")
	assert.Equal(t, []float32{10}, f32s(bin[16:]))

	// INT64 without batching, as JSON.
	r = do(t, nil, "POST", v2+"/models/int_ops/infer", []byte(`{"inputs":[{"name":"ids","datatype":"INT64","shape":[3],"data":[1,-2,9007199254740993]}],
		"outputs":[{"name":"doubled"}]}`), nil)
	require.Equal(t, 200, r.code, string(r.body))
	assert.Contains(t, string(r.body), `"data":[2,-4,18014398509481986]`, "int64 values survive exactly")

	// Classification and softmax post-processing.
	r = do(t, nil, "POST", v2+"/models/classifier/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[0.1,0.9,0.5,7]}],
		"outputs":[{"name":"scores","parameters":{"classification":2}}]}`), nil)
	require.Equal(t, 200, r.code, string(r.body))
	assert.Contains(t, string(r.body), `"datatype":"BYTES","shape":[1,2],"data":["0.900000:1:dog","0.500000:2:bird"]`)
	r = do(t, nil, "POST", v2+"/models/probs/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,100]}]}`), nil)
	require.Equal(t, 200, r.code, string(r.body))
	require.NoError(t, json.Unmarshal(r.body, &resp))
	assert.InDeltaSlice(t, []float64{0.09003057, 0.24472847, 0.66524096}, resp.Outputs[0].Data, 1e-6)

	stats := do(t, nil, "GET", v2+"/models/affine/versions/2/stats", nil, nil)
	require.Equal(t, 200, stats.code)
	assert.Contains(t, string(stats.body), `"inference_count":"1"`)
	assert.Equal(t, 200, do(t, nil, "GET", v2+"/models/stats", nil, nil).code)

	// Errors: JSON bodies with the status the gRPC code maps to; the
	// server keeps serving.
	requireHTTPError(t, do(t, nil, "POST", v2+"/models/affine/infer", []byte(`{"inputs":[{"name":"x","datatype":"INT32","shape":[1,4],"data":[1,2,3,4]}]}`), nil),
		400, `input "x"`, "expected datatype FP32")
	requireHTTPError(t, do(t, nil, "POST", v2+"/models/affine/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[2,5],"data":[1,2,3,4,5,6,7,8,9,10]}]}`), nil),
		400, "expected shape [-1,4], received [2,5]")
	requireHTTPError(t, do(t, nil, "POST", v2+"/models/affine/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[2,4],"data":[1,2,3,4]}]}`), nil),
		400, `input "x"`, "4 values", "needs 8")
	requireHTTPError(t, do(t, nil, "POST", v2+"/models/affine/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":["a",2,3,4]}]}`), nil),
		400, `input "x"`, "numbers")
	requireHTTPError(t, do(t, nil, "POST", v2+"/models/affine/infer", []byte(`{"inputs":`), nil), 400, "invalid inference request JSON")
	requireHTTPError(t, do(t, nil, "POST", v2+"/models/affine/infer", append(append([]byte{}, hdr...), 1, 2, 3),
		map[string]string{"Inference-Header-Content-Length": strconv.Itoa(len(hdr))}), 400, "binary_data_size is 16 but only 3 bytes")
	requireHTTPError(t, do(t, nil, "POST", v2+"/models/affine/infer", hdr, map[string]string{"Inference-Header-Content-Length": "99999"}),
		400, "Inference-Header-Content-Length")
	requireHTTPError(t, do(t, nil, "POST", v2+"/models/nope/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}`), nil), 404, `"nope"`)
	requireHTTPError(t, do(t, nil, "POST", v2+"/models/affine/versions/9/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`), nil), 404, "version 9")
	requireHTTPError(t, do(t, nil, "GET", v2+"/models/nope", nil, nil), 404, "nope")
	requireHTTPError(t, do(t, nil, "GET", v2+"/models/affine/infer", nil, nil), 405, "POST")
	requireHTTPError(t, do(t, nil, "GET", v2+"/nothing/here", nil, nil), 404, "no endpoint")
	requireHTTPError(t, do(t, nil, "POST", v2+"/repository/models/nope/load", nil, nil), 404, "nope")
	requireHTTPError(t, do(t, nil, "POST", v2+"/repository/models/corrupt/load", []byte(`{}`), nil), 500, "corrupt")
	requireHTTPError(t, do(t, nil, "POST", v2+"/repository/models/affine/load", []byte(`{"parameters":{"config":"{}"}}`), nil), 400, "not supported")
	r = do(t, nil, "POST", v2+"/models/affine/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`), nil)
	require.Equal(t, 200, r.code, string(r.body))
}

// TestHTTPQueueFull answers 429 (gRPC: RESOURCE_EXHAUSTED) when a model's
// queue is full: "slow" queues one request for up to 5 s.
func TestHTTPQueueFull(t *testing.T) {
	srv, base := startAll(t, Config{StartupModels: []string{"slow"}, ModelControl: ControlExplicit}, func(root string) {
		require.NoError(t, os.CopyFS(filepath.Join(root, "slow"), os.DirFS(filepath.Join(root, "affine"))))
		require.NoError(t, os.WriteFile(filepath.Join(root, "slow", "config.yaml"), []byte(`
max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}, {name: s, datatype: FP32, dims: []}]
dynamic_batching: {max_queue_delay_us: 5000000, max_queue_size: 1}
warmup: false
`), 0o644))
	})
	body := []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`)
	first := make(chan httpResult, 1)
	go func() { first <- do(t, nil, "POST", base+"/v2/models/slow/infer", body, nil) }()
	v, err := srv.Manager().Acquire("slow", "")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return v.QueueLen() == 1 }, 30*time.Second, time.Millisecond)
	v.Release()
	requireHTTPError(t, do(t, nil, "POST", base+"/v2/models/slow/infer", body, nil), 429, "queue is full")
	require.Equal(t, 200, (<-first).code)
}

func TestAuthToken(t *testing.T) {
	srv, base := startAll(t, Config{Auth: auth.Config{Token: testToken}}, nil)
	conn, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	c := pb.NewGRPCInferenceServiceClient(conn)
	ctx := context.Background()
	_, err = c.RepositoryIndex(ctx, &pb.RepositoryIndexRequest{})
	requireCode(t, err, codes.Unauthenticated, "bearer token")
	_, err = c.RepositoryModelUnload(withAuth(ctx, "Bearer wrong"), &pb.RepositoryModelUnloadRequest{ModelName: "affine"})
	requireCode(t, err, codes.Unauthenticated, "bearer token")
	_, err = c.RepositoryModelLoad(ctx, &pb.RepositoryModelLoadRequest{ModelName: "affine"})
	requireCode(t, err, codes.Unauthenticated, "bearer token")
	_, err = c.RepositoryIndex(withAuth(ctx, "Bearer "+testToken), &pb.RepositoryIndexRequest{})
	require.NoError(t, err)
	_, err = c.ModelInfer(ctx, affineReq("", 1, 1, 2, 3, 4))
	require.NoError(t, err, "inference needs no token")

	requireHTTPError(t, do(t, nil, "POST", base+"/v2/repository/index", nil, nil), 401, "bearer token")
	r := do(t, nil, "POST", base+"/v2/repository/models/affine/unload", nil, map[string]string{"Authorization": "Bearer nope"})
	requireHTTPError(t, r, 401)
	assert.Contains(t, r.header.Get("WWW-Authenticate"), "Bearer")
	assert.Equal(t, 200, do(t, nil, "POST", base+"/v2/repository/index", nil, map[string]string{"Authorization": "bearer " + testToken}).code)
	assert.Equal(t, 200, do(t, nil, "POST", base+"/v2/models/affine/infer",
		[]byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`), nil).code)
}

func TestMetricsMoveWithRequests(t *testing.T) {
	srv, base := startAll(t, Config{}, nil)
	scrape := func() map[string]float64 {
		r := do(t, nil, "GET", "http://"+srv.MetricsAddr().String()+"/metrics", nil, nil)
		require.Equal(t, 200, r.code)
		out := map[string]float64{}
		for _, line := range strings.Split(string(r.body), "\n") {
			if strings.HasPrefix(line, "#") || !strings.Contains(line, `model="affine",version="2"`) {
				continue
			}
			name, val, ok := strings.Cut(line, " ")
			require.True(t, ok, line)
			f, err := strconv.ParseFloat(val, 64)
			require.NoError(t, err, line)
			out[name] = f
		}
		return out
	}
	before := scrape()
	for _, name := range []string{"nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
		"nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
		"nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count", "kiln_inference_batch_size_count"} {
		_, ok := before[name+`{model="affine",version="2"}`]
		assert.True(t, ok, "metric %s is exported", name)
	}
	key := func(n string) string { return n + `{model="affine",version="2"}` }
	assert.Zero(t, before[key("nv_inference_count")])
	for range 3 {
		r := do(t, nil, "POST", base+"/v2/models/affine/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[2,4],"data":[1,2,3,4,5,6,7,8]}]}`), nil)
		require.Equal(t, 200, r.code, string(r.body))
	}
	r := do(t, nil, "POST", base+"/v2/models/affine/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,5],"data":[1,2,3,4,5]}]}`), nil)
	require.Equal(t, 400, r.code)
	after := scrape()
	assert.Equal(t, 3.0, after[key("nv_inference_request_success")])
	assert.Equal(t, 1.0, after[key("nv_inference_request_failure")])
	assert.Equal(t, 6.0, after[key("nv_inference_count")], "2 rows per request")
	execs := after[key("nv_inference_exec_count")]
	assert.True(t, execs >= 1 && execs <= 3, "executions %v", execs)
	assert.Greater(t, after[key("nv_inference_request_duration_us")], 0.0)
	assert.Greater(t, after[key("nv_inference_compute_infer_duration_us")], 0.0)
	assert.Equal(t, execs, after[key("kiln_inference_batch_size_count")])
	assert.Equal(t, 6.0, after[key("kiln_inference_batch_size_sum")], "rows executed")
	assert.Zero(t, after[`kiln_inference_batch_size_bucket{model="affine",version="2",le="1"}`])
	assert.Equal(t, execs, after[`kiln_inference_batch_size_bucket{model="affine",version="2",le="+Inf"}`])
}

func TestPollModeFollowsTheRepository(t *testing.T) {
	var root string
	srv, base := startAll(t, Config{ModelControl: ControlPoll, PollInterval: 50 * time.Millisecond}, func(r string) {
		root = r
		require.NoError(t, os.RemoveAll(filepath.Join(r, "corrupt")))
	})
	assert.True(t, srv.Ready())
	versions := func() []any {
		r := do(t, nil, "GET", base+"/v2/models/affine", nil, nil)
		if r.code != 200 {
			return nil
		}
		v, _ := r.json(t)["versions"].([]any)
		return v
	}
	require.Equal(t, []any{"1", "2"}, versions())
	v2, err := srv.Manager().Acquire("affine", "2")
	require.NoError(t, err)
	v2.Release()

	// Traffic to version 2 never fails while the repository changes.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var failures []string
	var mu sync.Mutex
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			r := do(t, nil, "POST", base+"/v2/models/affine/versions/2/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`), nil)
			if r.code != 200 || !strings.Contains(string(r.body), `"data":[4,7,10,13]`) {
				mu.Lock()
				failures = append(failures, fmt.Sprintf("%d %s", r.code, r.body))
				mu.Unlock()
			}
			time.Sleep(5 * time.Millisecond)
		}
	})

	// A new version appears: it loads and warms up, the others keep serving.
	require.NoError(t, os.CopyFS(filepath.Join(root, "affine", "3"), os.DirFS(filepath.Join(root, "affine", "1"))))
	require.Eventually(t, func() bool { return fmt.Sprint(versions()) == "[1 2 3]" }, 60*time.Second, 20*time.Millisecond)
	// A version is removed: it goes.
	require.NoError(t, os.RemoveAll(filepath.Join(root, "affine", "1")))
	require.Eventually(t, func() bool { return fmt.Sprint(versions()) == "[2 3]" }, 60*time.Second, 20*time.Millisecond)
	// A model is removed: it unloads; a new model appears: it loads.
	require.NoError(t, os.Rename(filepath.Join(root, "classifier"), filepath.Join(root, "classifier2")))
	require.NoError(t, os.WriteFile(filepath.Join(root, "classifier2", "config.json"), []byte(`{"max_batch_size": 4,
 "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
 "outputs": [{"name": "scores", "datatype": "FP32", "dims": [3], "labels": "labels.txt"}]}`), 0o644))
	require.Eventually(t, func() bool {
		return do(t, nil, "GET", base+"/v2/models/classifier2/ready", nil, nil).code == 200 &&
			do(t, nil, "GET", base+"/v2/models/classifier", nil, nil).code == 404
	}, 60*time.Second, 20*time.Millisecond)
	close(stop)
	wg.Wait()
	assert.Empty(t, failures)

	v2again, err := srv.Manager().Acquire("affine", "2")
	require.NoError(t, err)
	v2again.Release()
	assert.Same(t, v2, v2again, "the unchanged version kept its instance")
	assert.True(t, srv.Ready())
}

// TestNotReadyUntilWarm: the server is live at once but ready only after
// every model has loaded and warmed up ("slow" holds its warmup request in
// the queue for 5 s).
func TestNotReadyUntilWarm(t *testing.T) {
	root := t.TempDir()
	require.NoError(t, os.CopyFS(root, os.DirFS(built)))
	require.NoError(t, os.RemoveAll(filepath.Join(root, "corrupt")))
	require.NoError(t, os.CopyFS(filepath.Join(root, "slow"), os.DirFS(filepath.Join(root, "affine"))))
	require.NoError(t, os.WriteFile(filepath.Join(root, "slow", "config.yaml"), []byte(`
max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}, {name: s, datatype: FP32, dims: []}]
dynamic_batching: {max_queue_delay_us: 5000000}
`), 0o644))
	cfg := testConfig(root, Config{})
	cfg.HTTPPort = 0
	srv, err := New(cfg)
	require.NoError(t, err)
	started := make(chan error, 1)
	go func() { started <- srv.Start(context.Background()) }()
	t.Cleanup(func() { assert.NoError(t, srv.Shutdown(context.Background())) })
	require.Eventually(t, func() bool { return srv.HTTPAddr() != nil }, 60*time.Second, time.Millisecond)
	base := "http://" + srv.HTTPAddr().String() + "/v2"
	sawNotReady := false
	for done := false; !done; {
		live := do(t, nil, "GET", base+"/health/live", nil, nil).code
		ready := do(t, nil, "GET", base+"/health/ready", nil, nil).code
		model := do(t, nil, "GET", base+"/models/slow/ready", nil, nil).code
		select {
		case err := <-started:
			require.NoError(t, err)
			done = true
		default:
			assert.Equal(t, 200, live, "live while loading")
			if ready == 200 || model == 200 {
				// Readiness turns true just before Start returns; the
				// warmup takes 5 s, so a premature "ready" shows as a
				// Start that does not return soon after.
				select {
				case err := <-started:
					require.NoError(t, err)
					done = true
				case <-time.After(2 * time.Second):
					t.Fatalf("ready (server %d, model %d) while the model is still warming up", ready, model)
				}
				continue
			}
			assert.Equal(t, 503, ready)
			assert.Equal(t, 503, model)
			sawNotReady = true
			time.Sleep(20 * time.Millisecond)
		}
	}
	assert.True(t, sawNotReady)
	assert.Equal(t, 200, do(t, nil, "GET", base+"/health/ready", nil, nil).code)
	assert.Equal(t, 200, do(t, nil, "GET", base+"/models/slow/ready", nil, nil).code)
}
