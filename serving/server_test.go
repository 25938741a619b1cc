package serving

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/limits"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { testkit.Main(m) }

// testToken is a bearer token long enough for auth.MinTokenLength.
const testToken = "s3cret-test-token-0123"

// testConfig is DefaultConfig serving root with gRPC on a free loopback
// port, HTTP, metrics and Flight off, and the fields opts sets (model
// control, startup models, strictness, auth, TLS, message size).
func testConfig(root string, opts Config) Config {
	cfg := DefaultConfig()
	cfg.ModelRepository = root
	cfg.Host, cfg.GRPCPort = "127.0.0.1", 0
	cfg.HTTPPort, cfg.MetricsPort, cfg.FlightPort = PortOff, PortOff, PortOff
	if opts.ModelControl != "" {
		cfg.ModelControl = opts.ModelControl
	}
	if opts.PollInterval != 0 {
		cfg.PollInterval = opts.PollInterval
	}
	cfg.StartupModels, cfg.StrictModelLoad, cfg.Auth = opts.StartupModels, opts.StrictModelLoad, opts.Auth
	cfg.TLSCertFile, cfg.TLSKeyFile = opts.TLSCertFile, opts.TLSKeyFile
	if opts.MaxMessageBytes != 0 {
		cfg.MaxMessageBytes = opts.MaxMessageBytes
	}
	if opts.Limits != (limits.Limits{}) {
		cfg.Limits = opts.Limits.WithDefaults()
	}
	if !testing.Verbose() {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

func start(t *testing.T, opts Config) (*Server, pb.GRPCInferenceServiceClient, *grpc.ClientConn) {
	t.Helper()
	srv := serve(t, testConfig(testkit.CopyFixture(t, "serving-repo"), opts))
	conn := dial(t, srv)
	return srv, pb.NewGRPCInferenceServiceClient(conn), conn
}

// serve starts a server with cfg; the test's cleanup shuts it down
// (failing the test when that takes more than 30 s).
func serve(t *testing.T, cfg Config) *Server {
	t.Helper()
	srv, err := New(cfg)
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background()))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		assert.NoError(t, srv.Shutdown(ctx))
	})
	return srv
}

// dial connects to srv's gRPC port; the connection closes at cleanup,
// before the server shuts down.
func dial(t *testing.T, srv *Server) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

func rawF32(vals ...float32) []byte {
	b := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

func f32s(b []byte) []float32 {
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}

func affineReq(version string, rows int, vals ...float32) *pb.ModelInferRequest {
	return &pb.ModelInferRequest{
		ModelName: "affine", ModelVersion: version,
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{int64(rows), 4}}},
		RawInputContents: [][]byte{rawF32(vals...)},
	}
}

func requireCode(t *testing.T, err error, code codes.Code, contains string) {
	t.Helper()
	require.Error(t, err)
	st, ok := status.FromError(err)
	require.True(t, ok, err)
	assert.Equal(t, code, st.Code(), st.Message())
	assert.Contains(t, st.Message(), contains)
}

func TestServerEndToEnd(t *testing.T) {
	srv, c, conn := start(t, Config{})
	ctx := context.Background()

	live, err := c.ServerLive(ctx, &pb.ServerLiveRequest{})
	require.NoError(t, err)
	assert.True(t, live.Live)
	ready, err := c.ServerReady(ctx, &pb.ServerReadyRequest{})
	require.NoError(t, err)
	assert.False(t, ready.Ready, "model corrupt failed to load")
	hc := healthpb.NewHealthClient(conn)
	h, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	assert.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, h.Status)

	idx, err := c.RepositoryIndex(ctx, &pb.RepositoryIndexRequest{})
	require.NoError(t, err)
	var corrupt *pb.RepositoryIndexResponse_ModelIndex
	for _, m := range idx.Models {
		if m.Name == "corrupt" {
			corrupt = m
		}
	}
	require.NotNil(t, corrupt)
	assert.Equal(t, "UNAVAILABLE", corrupt.State)
	assert.NotEmpty(t, corrupt.Reason)
	_, err = c.ModelInfer(ctx, &pb.ModelInferRequest{ModelName: "corrupt"})
	requireCode(t, err, codes.Unavailable, "not ready")

	_, err = c.RepositoryModelUnload(ctx, &pb.RepositoryModelUnloadRequest{ModelName: "corrupt"})
	require.NoError(t, err)
	ready, err = c.ServerReady(ctx, &pb.ServerReadyRequest{})
	require.NoError(t, err)
	assert.True(t, ready.Ready)
	assert.True(t, srv.Ready())
	h, err = hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "inference.GRPCInferenceService"})
	require.NoError(t, err)
	assert.Equal(t, healthpb.HealthCheckResponse_SERVING, h.Status)

	meta, err := c.ServerMetadata(ctx, &pb.ServerMetadataRequest{})
	require.NoError(t, err)
	assert.Equal(t, "kiln", meta.Name)
	assert.Contains(t, meta.Extensions, "classification")

	mm, err := c.ModelMetadata(ctx, &pb.ModelMetadataRequest{Name: "affine"})
	require.NoError(t, err)
	assert.Equal(t, []string{"1", "2"}, mm.Versions)
	require.Len(t, mm.Inputs, 1)
	assert.Equal(t, "FP32", mm.Inputs[0].Datatype)
	assert.Equal(t, []int64{-1, 4}, mm.Inputs[0].Shape)
	assert.Equal(t, []int64{-1}, mm.Outputs[1].Shape)

	cfg, err := c.ModelConfig(ctx, &pb.ModelConfigRequest{Name: "affine"})
	require.NoError(t, err)
	assert.Equal(t, int32(8), cfg.Config.MaxBatchSize)
	assert.Equal(t, pb.DataType_TYPE_FP32, cfg.Config.Input[0].DataType)
	assert.Equal(t, uint64(2000), cfg.Config.GetDynamicBatching().MaxQueueDelayMicroseconds)

	mr, err := c.ModelReady(ctx, &pb.ModelReadyRequest{Name: "affine", Version: "1"})
	require.NoError(t, err)
	assert.True(t, mr.Ready)
	mr, err = c.ModelReady(ctx, &pb.ModelReadyRequest{Name: "affine", Version: "9"})
	require.NoError(t, err)
	assert.False(t, mr.Ready)

	// Raw FP32 in, a batch of 2; version 2 (scale 3) by default.
	resp, err := c.ModelInfer(ctx, func() *pb.ModelInferRequest {
		r := affineReq("", 2, 1, 2, 3, 4, 0, 0, 0, 1)
		r.Id = "req-1"
		return r
	}())
	require.NoError(t, err)
	assert.Equal(t, "req-1", resp.Id)
	assert.Equal(t, "2", resp.ModelVersion)
	require.Len(t, resp.Outputs, 2)
	assert.Equal(t, "y", resp.Outputs[0].Name)
	assert.Equal(t, []int64{2, 4}, resp.Outputs[0].Shape)
	assert.Equal(t, []float32{4, 7, 10, 13, 1, 1, 1, 4}, f32s(resp.RawOutputContents[0]))
	assert.Equal(t, []int64{2}, resp.Outputs[1].Shape)
	assert.Equal(t, []float32{10, 1}, f32s(resp.RawOutputContents[1]))

	// Typed contents in, version 1, outputs requested in another order.
	resp, err = c.ModelInfer(ctx, &pb.ModelInferRequest{
		ModelName: "affine", ModelVersion: "1",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 4},
			Contents: &pb.InferTensorContents{Fp32Contents: []float32{1, 2, 3, 4}}}},
		Outputs: []*pb.ModelInferRequest_InferRequestedOutputTensor{{Name: "s"}, {Name: "y"}},
	})
	require.NoError(t, err)
	assert.Equal(t, "s", resp.Outputs[0].Name)
	assert.Equal(t, []float32{10}, f32s(resp.RawOutputContents[0]))
	assert.Equal(t, []float32{3, 5, 7, 9}, f32s(resp.RawOutputContents[1]))
	assert.Nil(t, resp.Outputs[0].Contents, "outputs travel in raw_output_contents")

	// INT64, no batching, variable dims.
	resp, err = c.ModelInfer(ctx, &pb.ModelInferRequest{
		ModelName: "int_ops",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "ids", Datatype: "INT64", Shape: []int64{3},
			Contents: &pb.InferTensorContents{Int64Contents: []int64{1, -2, 40}}}},
	})
	require.NoError(t, err)
	assert.Equal(t, "INT64", resp.Outputs[0].Datatype)
	got := make([]int64, 3)
	for i := range got {
		got[i] = int64(binary.LittleEndian.Uint64(resp.RawOutputContents[0][8*i:]))
	}
	assert.Equal(t, []int64{2, -4, 80}, got)
	assert.Equal(t, []float32{0.5, -1, 20}, f32s(resp.RawOutputContents[1]))

	// Classification: top 2 of each row as score:index:label.
	resp, err = c.ModelInfer(ctx, &pb.ModelInferRequest{
		ModelName: "classifier",
		Inputs:    []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{2, 4}}},
		Outputs: []*pb.ModelInferRequest_InferRequestedOutputTensor{{Name: "scores",
			Parameters: map[string]*pb.InferParameter{"classification": {ParameterChoice: &pb.InferParameter_Int64Param{Int64Param: 2}}}}},
		RawInputContents: [][]byte{rawF32(0.1, 0.9, 0.5, 7, 3, 2, 1, 0)},
	})
	require.NoError(t, err)
	assert.Equal(t, "BYTES", resp.Outputs[0].Datatype)
	assert.Equal(t, []int64{2, 2}, resp.Outputs[0].Shape)
	assert.Equal(t, []string{"0.900000:1:dog", "0.500000:2:bird", "3.000000:0:cat", "2.000000:1:dog"}, bytesElems(resp.RawOutputContents[0]))

	st, err := c.ModelStatistics(ctx, &pb.ModelStatisticsRequest{Name: "affine", Version: "2"})
	require.NoError(t, err)
	require.Len(t, st.ModelStats, 1)
	assert.Equal(t, uint64(2), st.ModelStats[0].InferenceCount)
	assert.Equal(t, uint64(1), st.ModelStats[0].InferenceStats.Success.Count)
	all, err := c.ModelStatistics(ctx, &pb.ModelStatisticsRequest{})
	require.NoError(t, err)
	assert.Len(t, all.ModelStats, 5) // affine 1, 2, classifier 1, int_ops 1, probs 1
	_, err = c.ModelStatistics(ctx, &pb.ModelStatisticsRequest{Name: "nope"})
	requireCode(t, err, codes.NotFound, "nope")

	// Load and unload through the API.
	_, err = c.RepositoryModelUnload(ctx, &pb.RepositoryModelUnloadRequest{ModelName: "classifier"})
	require.NoError(t, err)
	mr, err = c.ModelReady(ctx, &pb.ModelReadyRequest{Name: "classifier"})
	require.NoError(t, err)
	assert.False(t, mr.Ready)
	_, err = c.RepositoryModelLoad(ctx, &pb.RepositoryModelLoadRequest{ModelName: "classifier"})
	require.NoError(t, err)
	mr, err = c.ModelReady(ctx, &pb.ModelReadyRequest{Name: "classifier"})
	require.NoError(t, err)
	assert.True(t, mr.Ready)
	_, err = c.RepositoryModelLoad(ctx, &pb.RepositoryModelLoadRequest{ModelName: "nope"})
	requireCode(t, err, codes.NotFound, "nope")
	_, err = c.RepositoryModelLoad(ctx, &pb.RepositoryModelLoadRequest{ModelName: "corrupt"})
	requireCode(t, err, codes.Internal, "corrupt")
}

func bytesElems(b []byte) []string {
	var out []string
	for len(b) >= 4 {
		n := binary.LittleEndian.Uint32(b)
		out = append(out, string(b[4:4+n]))
		b = b[4+n:]
	}
	return out
}

func TestBadInputsNeverHurtTheServer(t *testing.T) {
	_, c, _ := start(t, Config{})
	ctx := context.Background()
	ids := func(shape []int64, raw []byte) *pb.ModelInferRequest {
		return &pb.ModelInferRequest{ModelName: "int_ops",
			Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "ids", Datatype: "INT64", Shape: shape}},
			RawInputContents: [][]byte{raw}}
	}
	cases := []struct {
		name string
		req  *pb.ModelInferRequest
		code codes.Code
		msg  string
	}{
		{"wrong datatype", func() *pb.ModelInferRequest {
			r := affineReq("", 1, 1, 2, 3, 4)
			r.Inputs[0].Datatype = "INT32"
			return r
		}(), codes.InvalidArgument, `input "x": expected datatype FP32, received "INT32"`},
		{"wrong shape", func() *pb.ModelInferRequest {
			r := affineReq("", 1, 1, 2, 3, 4, 5)
			r.Inputs[0].Shape = []int64{1, 5}
			return r
		}(), codes.InvalidArgument, `input "x": expected shape [-1,4], received [1,5]`},
		{"wrong rank", func() *pb.ModelInferRequest {
			r := affineReq("", 1, 1, 2, 3, 4)
			r.Inputs[0].Shape = []int64{4}
			return r
		}(), codes.InvalidArgument, `input "x": expected shape [-1,4], received [4]`},
		{"raw bytes short", func() *pb.ModelInferRequest {
			r := affineReq("", 1, 1, 2, 3, 4)
			r.RawInputContents[0] = r.RawInputContents[0][:13]
			return r
		}(), codes.InvalidArgument, `input "x": raw_input_contents holds 13 bytes, shape [1,4] of FP32 needs 16`},
		{"batch too large", affineReq("", 9, make([]float32, 36)...), codes.InvalidArgument, `input "x": batch size 9 in shape [9,4] exceeds max_batch_size 8`},
		{"negative dim", ids([]int64{-3}, nil), codes.InvalidArgument, `input "ids": dimension 0 is negative in shape [-3]`},
		{"overflowing dims", ids([]int64{1 << 62}, nil), codes.InvalidArgument, `input "ids": shape [4611686018427387904] is too large`},
		{"typed count", &pb.ModelInferRequest{ModelName: "int_ops",
			Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "ids", Datatype: "INT64", Shape: []int64{2},
				Contents: &pb.InferTensorContents{Fp32Contents: []float32{1, 2}}}}},
			codes.InvalidArgument, `input "ids": contents hold 0 INT64 values, shape [2] needs 2`},
		{"no data", &pb.ModelInferRequest{ModelName: "int_ops",
			Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "ids", Datatype: "INT64", Shape: []int64{2}}}},
			codes.InvalidArgument, `input "ids": no data`},
		{"missing input", &pb.ModelInferRequest{ModelName: "int_ops"}, codes.InvalidArgument, `missing input "ids"`},
		{"unexpected input", func() *pb.ModelInferRequest {
			r := ids([]int64{1}, make([]byte, 8))
			r.Inputs = append(r.Inputs, &pb.ModelInferRequest_InferInputTensor{Name: "zz", Datatype: "INT64", Shape: []int64{1}})
			r.RawInputContents = append(r.RawInputContents, make([]byte, 8))
			return r
		}(), codes.InvalidArgument, `unexpected input "zz"`},
		{"raw count", func() *pb.ModelInferRequest {
			r := ids([]int64{1}, make([]byte, 8))
			r.RawInputContents = append(r.RawInputContents, nil)
			return r
		}(), codes.InvalidArgument, "raw_input_contents has 2 entries for 1 inputs"},
		{"unknown output", func() *pb.ModelInferRequest {
			r := affineReq("", 1, 1, 2, 3, 4)
			r.Outputs = []*pb.ModelInferRequest_InferRequestedOutputTensor{{Name: "q"}}
			return r
		}(), codes.InvalidArgument, `unknown output "q"`},
		{"unknown model", &pb.ModelInferRequest{ModelName: "nope"}, codes.NotFound, `unknown model "nope"`},
		{"unknown version", affineReq("7", 1, 1, 2, 3, 4), codes.NotFound, `version 7 of model "affine" is not loaded`},
		{"bad version", affineReq("-1", 1, 1, 2, 3, 4), codes.NotFound, `no version "-1"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.ModelInfer(ctx, tc.req)
			requireCode(t, err, tc.code, tc.msg)
			// The next valid request succeeds.
			resp, err := c.ModelInfer(ctx, affineReq("1", 1, 1, 2, 3, 4))
			require.NoError(t, err)
			assert.Equal(t, []float32{3, 5, 7, 9}, f32s(resp.RawOutputContents[0]))
		})
	}
}

func TestConcurrentClientsGetTheirOwnResults(t *testing.T) {
	_, c, _ := start(t, Config{})
	const clients, each = 48, 15
	var wg sync.WaitGroup
	for cl := range clients {
		wg.Go(func() {
			for k := range each {
				rows := 1 + (cl+k)%3
				vals := make([]float32, 4*rows)
				for i := range vals {
					vals[i] = float32(cl*1000 + k*10 + i)
				}
				resp, err := c.ModelInfer(context.Background(), affineReq("2", rows, vals...))
				if !assert.NoError(t, err) {
					return
				}
				want := make([]float32, len(vals))
				for i, v := range vals {
					want[i] = 3*v + 1
				}
				assert.Equal(t, want, f32s(resp.RawOutputContents[0]), "client %d request %d", cl, k)
				assert.Equal(t, []int64{int64(rows), 4}, resp.Outputs[0].Shape)
			}
		})
	}
	wg.Wait()
	st, err := c.ModelStatistics(context.Background(), &pb.ModelStatisticsRequest{Name: "affine", Version: "2"})
	require.NoError(t, err)
	s := st.ModelStats[0]
	assert.Equal(t, uint64(clients*each), s.InferenceStats.Success.Count)
	assert.Less(t, s.ExecutionCount, uint64(clients*each), "dynamic batching merged requests")
}

func TestStreamInfer(t *testing.T) {
	_, c, _ := start(t, Config{})
	stream, err := c.ModelStreamInfer(context.Background())
	require.NoError(t, err)
	for i := range 5 {
		r := affineReq("1", 1, float32(i), 0, 0, 0)
		r.Id = fmt.Sprint(i)
		if i == 3 {
			r.Inputs[0].Shape = []int64{1, 5}
		}
		require.NoError(t, stream.Send(r))
	}
	require.NoError(t, stream.CloseSend())
	seen := map[string]bool{}
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		id := msg.InferResponse.GetId()
		seen[id] = true
		if id == "3" {
			assert.Contains(t, msg.ErrorMessage, `input "x": expected shape [-1,4], received [1,5]`)
			continue
		}
		require.Empty(t, msg.ErrorMessage)
		var i int
		fmt.Sscan(id, &i)
		assert.Equal(t, []float32{float32(2*i + 1), 1, 1, 1}, f32s(msg.InferResponse.RawOutputContents[0]))
	}
	assert.Len(t, seen, 5)
}

func TestLargeMessage(t *testing.T) {
	// 64 MiB of INT64 ids, above gRPC's 4 MiB default limit and Kiln's
	// 64 MiB default (limits.DefaultMaxMessageBytes): the limit raised.
	_, c, _ := start(t, Config{MaxMessageBytes: 128 << 20})
	n := 8 << 20
	raw := make([]byte, 8*n)
	for i := 0; i < n; i += 1 << 16 {
		binary.LittleEndian.PutUint64(raw[8*i:], uint64(i))
	}
	resp, err := c.ModelInfer(context.Background(), &pb.ModelInferRequest{ModelName: "int_ops",
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "ids", Datatype: "INT64", Shape: []int64{int64(n)}}},
		RawInputContents: [][]byte{raw}}, grpc.MaxCallRecvMsgSize(math.MaxInt32), grpc.MaxCallSendMsgSize(math.MaxInt32))
	require.NoError(t, err)
	out := resp.RawOutputContents[0]
	require.Len(t, out, 8*n)
	assert.Equal(t, uint64(2*(1<<16)), binary.LittleEndian.Uint64(out[8*(1<<16):]))
}

func TestStartErrors(t *testing.T) {
	_, err := New(DefaultConfig())
	require.ErrorContains(t, err, "no model repository")
	bad := func(edit func(*Config)) error {
		cfg := testConfig(t.TempDir(), Config{})
		edit(&cfg)
		_, err := New(cfg)
		return err
	}
	require.ErrorContains(t, bad(func(c *Config) { c.ModelControl = "sometimes" }), `unknown model control mode "sometimes"`)
	require.ErrorContains(t, bad(func(c *Config) { c.StartupModels = []string{"affine"} }), "explicit")
	require.ErrorContains(t, bad(func(c *Config) { c.TLSCertFile = "cert.pem" }), "both a certificate and a key")
	require.ErrorContains(t, bad(func(c *Config) { c.TLSCertFile, c.TLSKeyFile = "missing.pem", "missing.key" }), "missing.pem")
	require.ErrorContains(t, bad(func(c *Config) { c.GRPCPort = PortOff }), "cannot be turned off")
	require.ErrorContains(t, bad(func(c *Config) { c.HTTPPort = 70000 }), "http port 70000")
	require.ErrorContains(t, bad(func(c *Config) { c.Host = "::1]" }), "host")
	require.ErrorContains(t, bad(func(c *Config) { c.FlightPort, c.DataDir = 0, "" }), "data directory")
	require.ErrorContains(t, bad(func(c *Config) { c.Auth.Token = "short" }), "at least 16")
	require.ErrorContains(t, bad(func(c *Config) { c.Auth.Inference = true }), "needs a token")
	root := testkit.CopyFixture(t, "serving-repo")
	cfg := testConfig(root, Config{StrictModelLoad: true})
	srv, err := New(cfg)
	require.NoError(t, err)
	require.ErrorContains(t, srv.Start(context.Background()), "corrupt")
}

// TestShutdownEndsIdleStreams: a client that keeps a ModelStreamInfer
// stream open does not hold a graceful shutdown up; the stream ends with OK.
func TestShutdownEndsIdleStreams(t *testing.T) {
	root := testkit.CopyFixture(t, "serving-repo")
	srv, err := New(testConfig(root, Config{}))
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background()))
	conn, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	stream, err := pb.NewGRPCInferenceServiceClient(conn).ModelStreamInfer(context.Background())
	require.NoError(t, err)
	require.NoError(t, stream.Send(affineReq("1", 1, 1, 2, 3, 4)))
	msg, err := stream.Recv()
	require.NoError(t, err)
	require.Empty(t, msg.ErrorMessage)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	require.NoError(t, srv.Shutdown(ctx), "shutdown must not wait for the idle stream's client")
	_, err = stream.Recv()
	assert.ErrorIs(t, err, io.EOF, "the stream ends with OK")
}
