package serving

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "github.com/kilnml/kiln/serving/inferencepb"
)

// TestHugeNamesGetTheirOwnCode: a 20,000-character model name and a
// 100 KB Flight ticket are answered NOT_FOUND (HTTP 404) with a message cut
// to a bounded size, not INTERNAL because the echoed name overflowed the
// status header.
func TestHugeNamesGetTheirOwnCode(t *testing.T) {
	root := t.TempDir()
	cfg := testConfig(root, Config{})
	cfg.HTTPPort, cfg.FlightPort, cfg.DataDir = 0, 0, t.TempDir()
	srv, err := New(cfg)
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background()))
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	name := strings.Repeat("m", 20000)
	conn, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	c := pb.NewGRPCInferenceServiceClient(conn)
	_, err = c.ModelInfer(ctx, &pb.ModelInferRequest{ModelName: name})
	require.Equal(t, codes.NotFound, status.Code(err), "%v", err)
	assert.Less(t, len(status.Convert(err).Message()), 1100)
	_, err = c.ModelMetadata(ctx, &pb.ModelMetadataRequest{Name: name})
	require.Equal(t, codes.NotFound, status.Code(err), "%v", err)

	resp, err := http.Get("http://" + srv.HTTPAddr().String() + "/v2/models/" + name)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)

	fc, err := flight.NewClientWithMiddleware(srv.FlightAddr().String(), nil, nil, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer fc.Close()
	stream, err := fc.DoGet(ctx, &flight.Ticket{Ticket: []byte("datasets/" + strings.Repeat("t", 100_000))})
	if err == nil {
		_, err = stream.Recv()
	}
	require.Error(t, err)
	code := status.Code(err)
	assert.True(t, code == codes.NotFound || code == codes.InvalidArgument, "got %v", err)
	assert.Less(t, len(status.Convert(err).Message()), 1100)
}
