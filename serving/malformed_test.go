package serving

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	pb "github.com/kilnml/kiln/serving/inferencepb"
)

// rawCodec sends []byte as the message and decodes into *[]byte.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }
func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.([]byte))}, nil
}
func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*(v.(*[]byte)) = data.Materialize()
	return nil
}

// TestMalformedProtobufIsInvalidArgument: bytes that are not a protobuf
// message get INVALID_ARGUMENT on unary and streaming calls, and the server
// keeps serving.
func TestMalformedProtobufIsInvalidArgument(t *testing.T) {
	_, c, conn := start(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Field 1 (model_name, a string) claims 100 bytes; 2 follow.
	garbage := []byte{0x0a, 0x64, 'a', 'b'}
	var out []byte
	err := conn.Invoke(ctx, "/inference.GRPCInferenceService/ModelInfer", garbage, &out, grpc.ForceCodecV2(rawCodec{}))
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.ErrorContains(t, err, "malformed request message")

	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true},
		"/inference.GRPCInferenceService/ModelStreamInfer", grpc.ForceCodecV2(rawCodec{}))
	require.NoError(t, err)
	require.NoError(t, stream.SendMsg(garbage))
	err = stream.RecvMsg(&out)
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)

	_, err = c.ServerLive(ctx, &pb.ServerLiveRequest{})
	require.NoError(t, err, "the server keeps serving")
	resp, err := c.ModelInfer(ctx, affineReq("", 1, 1, 2, 3, 4))
	require.NoError(t, err)
	require.NotEmpty(t, resp.RawOutputContents)
}
