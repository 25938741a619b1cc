package serving

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/limits"
)

// startStreams starts a server on a copy of the test repository with
// gRPC, HTTP and Flight (no training) on loopback and the given limits,
// and returns it with a KServe client and a Flight client.
func startStreams(t *testing.T, lim limits.Limits) (*Server, pb.GRPCInferenceServiceClient, flight.Client) {
	t.Helper()
	cfg := testConfig(testkit.CopyFixture(t, "serving-repo"), Config{Limits: lim})
	cfg.HTTPPort, cfg.FlightPort, cfg.DataDir, cfg.DisableFlightTraining = 0, 0, t.TempDir(), true
	srv, err := New(cfg)
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background()))
	conn, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	require.NoError(t, err)
	fc, err := flight.NewClientWithMiddleware(srv.FlightAddr().String(), nil, nil, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	require.NoError(t, err)
	t.Cleanup(func() {
		fc.Close()
		conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		assert.NoError(t, srv.Shutdown(ctx))
	})
	return srv, pb.NewGRPCInferenceServiceClient(conn), fc
}

// holdInflight admits n bytes in the server's gate and keeps them: an HTTP
// request declaring a body of n bytes that never comes. The bytes are
// released when the returned function closes the connection.
func holdInflight(t *testing.T, srv *Server, n int64) (release func()) {
	t.Helper()
	before := srv.gate.InFlight()
	c, err := net.Dial("tcp", srv.HTTPAddr().String())
	require.NoError(t, err)
	_, err = fmt.Fprintf(c, "POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{", n)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return srv.gate.InFlight() >= before+n }, 30*time.Second, 10*time.Millisecond, "the held request is admitted")
	var once sync.Once
	release = func() { once.Do(func() { c.Close() }) }
	t.Cleanup(release)
	return release
}

// intOps is a request to int_ops (INT64 ids[-1], no batching) of n zeros
// (8 bytes each) from data.
func intOps(id string, n int, data []byte) *pb.ModelInferRequest {
	return &pb.ModelInferRequest{
		ModelName: "int_ops", Id: id,
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "ids", Datatype: "INT64", Shape: []int64{int64(n)}}},
		RawInputContents: [][]byte{data[:n*8]},
	}
}

// intOpsRecord is a record batch of n int_ops inputs: column ids, INT64
// zeros.
func intOpsRecord(n int) arrow.RecordBatch {
	d := array.NewData(arrow.PrimitiveTypes.Int64, n, []*memory.Buffer{nil, memory.NewBufferBytes(make([]byte, n*8))}, nil, 0, 0)
	defer d.Release()
	col := array.NewInt64Data(d)
	defer col.Release()
	return array.NewRecordBatch(arrow.NewSchema([]arrow.Field{{Name: "ids", Type: arrow.PrimitiveTypes.Int64}}, nil), []arrow.Array{col}, int64(n))
}

// TestStreamMessagesShareTheInflightBudget: ModelStreamInfer messages
// count in the bytes in flight that unary requests and HTTP bodies share.
// With 5 of 8 MiB held by a stalled HTTP request, 16 streams send 1 MiB and
// 4 MiB messages at once: every 4 MiB message is answered with a "server
// busy" error_message (RESOURCE_EXHAUSTED) and its stream goes on, the
// admitted bytes never pass the budget, and once the HTTP request goes
// the same 4 MiB message succeeds. Before streams were admitted, every
// message ran and the gate never saw one.
func TestStreamMessagesShareTheInflightBudget(t *testing.T) {
	const budget, held = 8 << 20, 5 << 20
	srv, c, _ := startStreams(t, limits.Limits{MaxInflightBytes: budget})
	release := holdInflight(t, srv, held)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const small, big = 1 << 17, 1 << 19 // elements: 1 MiB and 4 MiB
	data := make([]byte, big*8)
	var wg sync.WaitGroup
	var mu sync.Mutex
	counts := map[string]int{}
	for s := range 16 {
		wg.Go(func() {
			stream, err := c.ModelStreamInfer(ctx)
			if !assert.NoError(t, err) {
				return
			}
			for i := range 6 {
				rows, kind := small, "small"
				if i%2 == 1 {
					rows, kind = big, "big"
				}
				if !assert.NoError(t, stream.Send(intOps(fmt.Sprintf("%s-%d-%d", kind, s, i), rows, data))) {
					return
				}
			}
			assert.NoError(t, stream.CloseSend())
			for range 6 {
				resp, err := stream.Recv()
				if !assert.NoError(t, err) {
					return
				}
				kind, _, _ := strings.Cut(resp.GetInferResponse().GetId(), "-")
				switch {
				case resp.ErrorMessage == "":
					kind += " answered"
				case strings.Contains(resp.ErrorMessage, "server busy"):
					kind += " busy"
				default:
					t.Errorf("message %s: %s", resp.GetInferResponse().GetId(), resp.ErrorMessage)
				}
				mu.Lock()
				counts[kind]++
				mu.Unlock()
			}
			_, err = stream.Recv()
			assert.ErrorIs(t, err, io.EOF, "the stream ends OK")
		})
	}
	wg.Wait()
	t.Logf("responses: %v; peak in flight %d bytes of %d", counts, srv.gate.Peak(), budget)
	assert.Equal(t, 16*3, counts["big busy"], "every 4 MiB message is over the budget")
	assert.Equal(t, 16*3, counts["small answered"]+counts["small busy"])
	assert.LessOrEqual(t, srv.gate.Peak(), int64(budget), "the admitted bytes stay within the budget")
	assert.Greater(t, srv.gate.Peak(), int64(held), "stream messages are admitted through the gate")

	release()
	require.Eventually(t, func() bool { return srv.gate.InFlight() == 0 }, 30*time.Second, 10*time.Millisecond, "every admitted byte is released")
	stream, err := c.ModelStreamInfer(ctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(intOps("again", big, data)))
	resp, err := stream.Recv()
	require.NoError(t, err)
	require.Empty(t, resp.ErrorMessage)
	require.Len(t, resp.GetInferResponse().GetRawOutputContents(), 2)
	require.NoError(t, stream.CloseSend())
	_, err = c.ModelInfer(ctx, intOps("unary", small, data))
	require.NoError(t, err)
}

// flightSend sends rec on a DoPut (dataset "held") or DoExchange (model
// int_ops) stream and returns the stream's status once it ends.
func flightSend(ctx context.Context, fc flight.Client, exchange bool, rec arrow.RecordBatch) error {
	var stream interface {
		grpc.ClientStream
		Send(*flight.FlightData) error
	}
	var recv func() error
	desc := &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "held"}}
	if exchange {
		s, err := fc.DoExchange(ctx)
		if err != nil {
			return err
		}
		stream, recv = s, func() error { _, err := s.Recv(); return err }
		desc.Path = []string{"models", "int_ops"}
	} else {
		s, err := fc.DoPut(ctx)
		if err != nil {
			return err
		}
		stream, recv = s, func() error { _, err := s.Recv(); return err }
	}
	w := flight.NewRecordWriter(stream, ipc.WithSchema(rec.Schema()))
	w.SetFlightDescriptor(desc)
	werr := w.Write(rec)
	if werr == nil {
		werr = w.Close()
	}
	stream.CloseSend()
	for {
		err := recv()
		if errors.Is(err, io.EOF) {
			return werr
		}
		if err != nil {
			return err
		}
	}
}

// TestFlightMessagesShareTheInflightBudget: DoPut and DoExchange admit
// each FlightData through the same gate; a record batch over what is
// left of the budget ends its stream with RESOURCE_EXHAUSTED (DoPut
// stores nothing), and the same batch succeeds once the budget is free.
func TestFlightMessagesShareTheInflightBudget(t *testing.T) {
	const budget, held = 8 << 20, 5 << 20
	srv, _, fc := startStreams(t, limits.Limits{MaxInflightBytes: budget})
	release := holdInflight(t, srv, held)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rec := intOpsRecord(1 << 19) // 4 MiB
	defer rec.Release()
	for _, exchange := range []bool{false, true} {
		err := flightSend(ctx, fc, exchange, rec)
		require.Equal(t, codes.ResourceExhausted, status.Code(err), "exchange %v: %v", exchange, err)
		require.ErrorContains(t, err, "server busy")
	}
	_, err := fc.GetFlightInfo(ctx, &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "held"}})
	require.Equal(t, codes.NotFound, status.Code(err), "the refused DoPut stored nothing: %v", err)
	assert.LessOrEqual(t, srv.gate.Peak(), int64(budget))

	release()
	require.Eventually(t, func() bool { return srv.gate.InFlight() == 0 }, 30*time.Second, 10*time.Millisecond, "every admitted byte is released")
	for _, exchange := range []bool{false, true} {
		require.NoError(t, flightSend(ctx, fc, exchange, rec), "exchange %v", exchange)
	}
	assert.Greater(t, srv.gate.Peak(), int64(4<<20), "the 4 MiB batches were admitted")
	require.Eventually(t, func() bool { return srv.gate.InFlight() == 0 }, 30*time.Second, 10*time.Millisecond, "and released")
}

// TestMaxStreamsOverTheServer: --max-streams bounds the client-streaming
// calls open at once over gRPC and Flight together; a stream beyond it is
// RESOURCE_EXHAUSTED, unary calls go on, and a stream opens again once
// one closes.
func TestMaxStreamsOverTheServer(t *testing.T) {
	srv, c, fc := startStreams(t, limits.Limits{MaxStreams: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	data := make([]byte, 8)
	open := func() (pb.GRPCInferenceService_ModelStreamInferClient, error) {
		stream, err := c.ModelStreamInfer(ctx)
		if err != nil {
			return nil, err
		}
		if err := stream.Send(intOps("x", 1, data)); err != nil {
			_, err = stream.Recv()
			return nil, err
		}
		resp, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		if resp.ErrorMessage != "" {
			return nil, errors.New(resp.ErrorMessage)
		}
		return stream, nil
	}
	first, err := open()
	require.NoError(t, err)
	xs, err := fc.DoExchange(ctx) // the second stream: Flight's
	require.NoError(t, err)
	require.Eventually(t, func() bool { return srv.streams.Open() == 2 }, 30*time.Second, 10*time.Millisecond)

	_, err = open()
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.ErrorContains(t, err, "streams open, the limit is 2")
	rec := intOpsRecord(1)
	defer rec.Release()
	err = flightSend(ctx, fc, true, rec)
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	_, err = c.ModelInfer(ctx, intOps("unary", 1, data))
	require.NoError(t, err, "unary calls are not streams")

	require.NoError(t, first.CloseSend())
	_, err = first.Recv()
	require.ErrorIs(t, err, io.EOF)
	require.Eventually(t, func() bool { return srv.streams.Open() == 1 }, 30*time.Second, 10*time.Millisecond)
	again, err := open()
	require.NoError(t, err)
	require.NoError(t, again.CloseSend())
	xs.CloseSend()
	assert.EqualValues(t, 2, srv.streams.Peak())
	assert.GreaterOrEqual(t, srv.streams.Refused(), int64(2))
}
