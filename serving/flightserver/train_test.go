package flightserver_test

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/core"
	kflight "github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
)

// blobCenters are the centers of the three classes of blobsBatch.
var blobCenters = map[string][2]float64{"north": {0, 4}, "east": {4, 0}, "south": {0, -4}}

// blobsBatch returns n rows of three well separated 2-D Gaussian blobs:
// float32 columns x0 and x1, and the class name in string column cls.
func blobsBatch(n int, seed uint64) arrow.RecordBatch {
	rng := rand.New(rand.NewPCG(seed, 7))
	mem := memory.NewGoAllocator()
	schema := arrow.NewSchema([]arrow.Field{
		{Name: "x0", Type: arrow.PrimitiveTypes.Float32},
		{Name: "x1", Type: arrow.PrimitiveTypes.Float32},
		{Name: "cls", Type: arrow.BinaryTypes.String},
	}, nil)
	b := array.NewRecordBuilder(mem, schema)
	defer b.Release()
	names := []string{"north", "east", "south"}
	for i := 0; i < n; i++ {
		c := names[i%3]
		ctr := blobCenters[c]
		b.Field(0).(*array.Float32Builder).Append(float32(ctr[0] + rng.NormFloat64()*0.5))
		b.Field(1).(*array.Float32Builder).Append(float32(ctr[1] + rng.NormFloat64()*0.5))
		b.Field(2).(*array.StringBuilder).Append(c)
	}
	return b.NewRecordBatch()
}

const blobsSpec = `
model:
  layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]
split: {val: 0.2, test: 0.2, stratify: true}
train: {batch_size: 16, optimizer: {type: adam, lr: 0.01}}
`

// waitJob polls job-status until the job has finished.
func (e *env) waitJob(t *testing.T, ctx context.Context, id string) (kflight.JobStatus, []kflight.JobStatus) {
	t.Helper()
	var seen []kflight.JobStatus
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		st := e.jobStatus(t, ctx, "job-status", id)
		seen = append(seen, st)
		if st.State != kflight.JobRunning {
			return st, seen
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("job %s still running after 3 minutes", id)
	return kflight.JobStatus{}, nil
}

func (e *env) startTrain(t *testing.T, ctx context.Context, body any) string {
	t.Helper()
	raw, err := e.action(ctx, "train", body)
	require.NoError(t, err)
	var started struct {
		JobID string `json:"job_id"`
	}
	require.NoError(t, json.Unmarshal(raw, &started))
	require.NotEmpty(t, started.JobID)
	return started.JobID
}

func TestModelTrainer(t *testing.T) {
	repoRoot := t.TempDir()
	repo, err := repository.Open(repoRoot)
	require.NoError(t, err)
	mgr := manager.New(repo, manager.Options{Logger: quietLogger()})
	t.Cleanup(mgr.Close)
	mt, err := kflight.NewModelTrainer(kflight.ModelTrainerOptions{Repository: repoRoot, Load: mgr.Load})
	require.NoError(t, err)
	e := start(t, kflight.Options{Trainer: mt, Models: kflight.ManagerModels(mgr)})
	ctx := ctxT(t)
	_, err = e.put(ctx, "blobs", blobsBatch(150, 1), blobsBatch(150, 2))
	require.NoError(t, err)

	// Train to completion, twice: versions 1 and 2 of model "blobs", the
	// second with two data-parallel workers.
	for version := int64(1); version <= 2; version++ {
		id := e.startTrain(t, ctx, map[string]any{
			"dataset": "blobs", "target": "cls", "spec": blobsSpec, // YAML text
			"epochs": 15, "seed": 3, "lr": 0.02, "workers": version,
		})
		st, seen := e.waitJob(t, ctx, id)
		require.Equal(t, kflight.JobSucceeded, st.State, "status %+v", st)
		var sawEpoch bool
		for _, s := range seen {
			if s.State == kflight.JobRunning && s.Progress.Total == 15 && s.Progress.Metrics["val_accuracy"] > 0 {
				sawEpoch = true
			}
		}
		if !sawEpoch {
			t.Logf("no poll saw an epoch's validation metrics (the job was fast); progress seen: %d polls", len(seen))
		}
		var res kflight.TrainResult
		require.NoError(t, json.Unmarshal(st.Result, &res))
		require.Equal(t, "blobs", res.Model)
		require.Equal(t, version, res.Version)
		require.Equal(t, version == 1, res.ConfigCreated)
		require.True(t, res.Loaded, "load error: %s", res.LoadError)
		require.Equal(t, "classification", res.Task)
		require.Equal(t, []string{"east", "north", "south"}, res.Labels)
		require.Equal(t, 15, res.Epochs)
		require.GreaterOrEqual(t, res.Test["accuracy"], 0.95, "test metrics %v", res.Test)
		require.GreaterOrEqual(t, st.Progress.Metrics["test_accuracy"], 0.95)
		require.Equal(t, filepath.Join(repoRoot, "blobs", strconv.FormatInt(version, 10)), res.Dir)
		for _, f := range []string{"model.pt", "manifest.json"} {
			_, err := os.Stat(filepath.Join(res.Dir, f))
			require.NoError(t, err)
		}
	}
	// Nothing left over in the model directory but config, labels and
	// versions.
	ents, err := os.ReadDir(filepath.Join(repoRoot, "blobs"))
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	require.ElementsMatch(t, []string{"1", "2", "config.yaml", "labels.txt"}, names)

	// The repository accepts the model; labels in class order.
	rm, err := repo.Model("blobs")
	require.NoError(t, err)
	require.Equal(t, []int64{1, 2}, rm.Versions)
	require.Equal(t, []string{"east", "north", "south"}, rm.Labels["y"])
	require.Equal(t, []int64{2}, rm.Config.Inputs[0].Dims)
	require.Equal(t, []int64{3}, rm.Config.Outputs[0].Dims)

	// The package predicts: core.LoadModule on raw features.
	m, err := core.LoadModule(filepath.Join(repoRoot, "blobs", "2", "model.pt"))
	require.NoError(t, err)
	defer m.Close()
	x, err := core.NewTensor([]float32{0, 4, 4, 0, 0, -4, 0.2, 3.5}, 4, 2)
	require.NoError(t, err)
	defer x.Close()
	outs, err := m.Forward(x)
	require.NoError(t, err)
	logits, err := core.CopyData[float32](outs[0])
	require.NoError(t, err)
	for _, o := range outs {
		o.Close()
	}
	labels := []string{"east", "north", "south"}
	want := []string{"north", "east", "south", "north"}
	for i := range want {
		row := logits[i*3 : i*3+3]
		best := 0
		for j := range row {
			if row[j] > row[best] {
				best = j
			}
		}
		require.Equal(t, want[i], labels[best], "row %d logits %v", i, row)
	}

	// The serving manager serves it: DoExchange with the features stacked.
	stream, err := e.client.DoExchange(ctx)
	require.NoError(t, err)
	in := blobsBatch(30, 9)
	feats := array.NewRecordBatch(arrow.NewSchema(in.Schema().Fields()[:2], nil), in.Columns()[:2], in.NumRows())
	w := flight.NewRecordWriter(stream, ipc.WithSchema(feats.Schema()))
	w.SetFlightDescriptor(modelDesc("blobs"))
	require.NoError(t, w.Write(feats))
	require.NoError(t, w.Close())
	require.NoError(t, stream.CloseSend())
	rdr, err := flight.NewRecordReader(stream)
	require.NoError(t, err)
	defer rdr.Release()
	require.True(t, rdr.Next(), "err %v", rdr.Err())
	out := rdr.RecordBatch()
	require.EqualValues(t, 30, out.NumRows())
	y := out.Column(0)
	correct := 0
	cls := in.Column(2).(*array.String)
	for i := 0; i < 30; i++ {
		v, err := tensorRow(y, i, 3)
		require.NoError(t, err)
		best := 0
		for j := range v {
			if v[j] > v[best] {
				best = j
			}
		}
		if labels[best] == cls.Value(i) {
			correct++
		}
	}
	require.GreaterOrEqual(t, correct, 28)
}

// tensorRow returns row i of a fixed_shape_tensor or FixedSizeList column
// of k float32 values.
func tensorRow(col arrow.Array, i, k int) ([]float32, error) {
	if ext, ok := col.(array.ExtensionArray); ok {
		col = ext.Storage()
	}
	l := col.(*array.FixedSizeList)
	vals := l.ListValues().(*array.Float32).Float32Values()
	off := (l.Offset() + i) * k
	return vals[off : off+k], nil
}

func TestModelTrainerCancelAndErrors(t *testing.T) {
	repoRoot := t.TempDir()
	mt, err := kflight.NewModelTrainer(kflight.ModelTrainerOptions{Repository: repoRoot})
	require.NoError(t, err)
	e := start(t, kflight.Options{Trainer: mt})
	ctx := ctxT(t)
	_, err = e.put(ctx, "blobs", blobsBatch(300, 1))
	require.NoError(t, err)

	// A long job, cancelled once it has made progress.
	id := e.startTrain(t, ctx, map[string]any{
		"dataset": "blobs", "target": "cls", "model": "long",
		"spec":   json.RawMessage(`{"model": {"layers": [{"type": "linear", "out": 64}, {"type": "relu"}, {"type": "linear"}]}}`),
		"epochs": 1000000, "batch_size": 4,
	})
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st := e.jobStatus(t, ctx, "job-status", id)
		require.Equal(t, kflight.JobRunning, st.State, "status %+v", st)
		if st.Progress.Metrics["loss"] > 0 {
			require.EqualValues(t, 1000000, st.Progress.Total)
			break
		}
		require.True(t, time.Now().Before(deadline), "no progress: %+v", st)
		time.Sleep(20 * time.Millisecond)
	}
	e.jobStatus(t, ctx, "cancel", id)
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	st, err := e.srv.Jobs().Wait(wctx, id)
	require.NoError(t, err)
	require.Equal(t, kflight.JobCancelled, st.State, "status %+v", st)
	requireRepo(t, repoRoot, nil, "a cancelled job leaves nothing in the repository")

	// Bad requests fail the action itself, with errors that name the
	// problem, and start no job.
	_, err = e.put(ctx, "tensors", mixedBatch(t, 0, 6))
	require.NoError(t, err)
	jobs := len(e.srv.Jobs().List())
	for _, c := range []struct {
		body map[string]any
		code codes.Code
		want string
	}{
		{map[string]any{"dataset": "blobs", "target": "klass", "spec": blobsSpec}, codes.InvalidArgument, `target column "klass" not found`},
		{map[string]any{"dataset": "blobs", "target": "cls", "features": []string{"x0", "x9"}, "spec": blobsSpec}, codes.InvalidArgument, `column "x9" not found`},
		{map[string]any{"dataset": "blobs", "target": "cls"}, codes.InvalidArgument, "no model layers"},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "model": "../evil"}, codes.InvalidArgument, "model name"},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "model": ".hidden"}, codes.InvalidArgument, "model name"},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "epochz": 3}, codes.InvalidArgument, `unknown field "epochz"`},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": "model: {layers: [{type: linear}]}\ntrain: {checkpoint_dir: /tmp/x}"}, codes.InvalidArgument, "checkpoint_dir"},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": "model: {layers: [{type: linear}]}\ntrain: {resume: true}"}, codes.InvalidArgument, "resume"},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": "model: [1, 2]"}, codes.InvalidArgument, "spec"},
		// A target of a type training cannot read: a 2x2 tensor column.
		{map[string]any{"dataset": "tensors", "target": "t", "spec": blobsSpec}, codes.InvalidArgument, `"t"`},
		{map[string]any{"dataset": "nosuch", "target": "cls", "spec": blobsSpec}, codes.NotFound, `"nosuch"`},
		// The layers and hyper-parameters, checked without the data.
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": "model: {layers: [{type: linearr}]}"}, codes.InvalidArgument, "linearr"},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": "model: {layers: [{type: linear}]}\ntrain: {optimizer: {type: adamm}}"}, codes.InvalidArgument, "adamm"},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": "model: {layers: [{type: linear}]}\ntrain: {batch_size: -3}"}, codes.InvalidArgument, "batch"},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "device": "gpu"}, codes.InvalidArgument, `device "gpu": want cpu, cuda or cuda:N`},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "amp": "fp16"}, codes.InvalidArgument, "amp fp16 needs a CUDA device"},
		// A Keras loss without its activation, and a double sigmoid.
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": "model: {layers: [{type: linear}]}\ntrain: {loss: {type: binary_crossentropy}}"}, codes.InvalidArgument, "takes the output of a sigmoid"},
		{map[string]any{"dataset": "blobs", "target": "cls", "spec": "model: {layers: [{type: linear}, {type: sigmoid}]}\ntrain: {loss: {type: bce_with_logits}}"}, codes.InvalidArgument, "applied twice"},
	} {
		_, err := e.action(ctx, "train", c.body)
		requireCode(t, err, c.code, c.want)
	}
	if core.CUDADeviceCount() == 0 {
		// A GPU this server lacks: UNIMPLEMENTED without CUDA in libtorch,
		// UNAVAILABLE without the GPU, naming the device.
		_, err := e.action(ctx, "train", map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "device": "cuda:0"})
		require.Error(t, err)
		require.Contains(t, []codes.Code{codes.Unimplemented, codes.Unavailable}, status.Code(err), "%v", err)
		require.ErrorContains(t, err, "device cuda:0")
	}
	require.Len(t, e.srv.Jobs().List(), jobs, "no job started")
	requireRepo(t, repoRoot, nil, "nothing written for refused requests")

	// A job that passes the checks but fails later (a layer whose "in"
	// does not fit the data's width, known only once the data is read)
	// leaves nothing in the repository: no model directory, no staging
	// directory.
	id = e.startTrain(t, ctx, map[string]any{"dataset": "blobs", "target": "cls", "model": "doomed",
		"spec": "model: {layers: [{type: linear, in: 999}]}", "epochs": 1})
	st, _ = e.waitJob(t, ctx, id)
	require.Equal(t, kflight.JobFailed, st.State, "status %+v", st)
	require.Contains(t, st.Error, "in=999")
	requireRepo(t, repoRoot, nil, "a failed job leaves nothing in the repository")

	// A package that does not fit an existing model's config is refused.
	require.NoError(t, os.MkdirAll(filepath.Join(repoRoot, "other"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(repoRoot, "other", "config.yaml"), []byte(
		"max_batch_size: 8\ninputs: [{name: x, datatype: FP32, dims: [5]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\n"), 0o644))
	id = e.startTrain(t, ctx, map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "model": "other", "epochs": 1})
	st, _ = e.waitJob(t, ctx, id)
	require.Equal(t, kflight.JobFailed, st.State)
	require.Contains(t, st.Error, "does not fit the model's config.yaml")
	ents, err := os.ReadDir(filepath.Join(repoRoot, "other"))
	require.NoError(t, err)
	require.Len(t, ents, 1, "only config.yaml")
	requireRepo(t, repoRoot, []string{"other"}, "no staging directory left")
}

// requireRepo checks that the repository directory holds exactly names,
// hidden entries included.
func requireRepo(t *testing.T, repoRoot string, names []string, msg string) {
	t.Helper()
	ents, err := os.ReadDir(repoRoot)
	require.NoError(t, err)
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	require.ElementsMatch(t, names, got, msg)
}

// The train action's workers and sync_batchnorm reach the job's config;
// an unknown field is refused.
func TestParseTrainRequestDistributed(t *testing.T) {
	body, err := json.Marshal(map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec,
		"workers": 2, "sync_batchnorm": true})
	require.NoError(t, err)
	req, job, err := kflight.ParseTrainRequest(body)
	require.NoError(t, err)
	require.True(t, req.SyncBatchNorm)
	require.Equal(t, 2, job.Train.Workers)
	require.True(t, job.Train.SyncBatchNorm)

	_, job, err = kflight.ParseTrainRequest([]byte(`{"dataset": "blobs", "target": "cls", "spec": ` + strconv.Quote(blobsSpec) + `}`))
	require.NoError(t, err)
	require.False(t, job.Train.SyncBatchNorm, "per-rank statistics by default")

	_, _, err = kflight.ParseTrainRequest([]byte(`{"dataset": "blobs", "sync_batchnorms": true}`))
	require.Error(t, err)
}
