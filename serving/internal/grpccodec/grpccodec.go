// Package grpccodec makes a gRPC server answer a request that is not a
// valid protobuf message with INVALID_ARGUMENT, as the field expects,
// instead of grpc-go's INTERNAL ("failed to unmarshal the received
// message"), which grpc-go hard-codes for any codec error.
//
// It wraps the proto codec: a message that fails to decode is reset, its
// decoding error is remembered against the message, and the codec reports
// success; the outermost interceptor (unary) or stream wrapper (streaming)
// then returns the remembered error as INVALID_ARGUMENT before any handler
// sees the message. Install ServerOptions before every other interceptor.
package grpccodec

import (
	"context"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Codec is the proto codec with decoding errors reported as
// INVALID_ARGUMENT.
type Codec struct {
	base    encoding.CodecV2
	invalid sync.Map // message (pointer) → decoding error
}

// New returns a Codec over grpc-go's registered "proto" codec.
func New() *Codec { return &Codec{base: encoding.GetCodecV2("proto")} }

// Name is "proto": the codec speaks the same wire format.
func (c *Codec) Name() string { return "proto" }

// Marshal encodes v with the proto codec.
func (c *Codec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }

// Unmarshal decodes data into v; when data is not a valid message it resets
// v, remembers the error and returns nil (see the package comment).
func (c *Codec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.base.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	if m, ok := v.(proto.Message); ok {
		proto.Reset(m)
		c.invalid.Store(v, err)
		return nil
	}
	return err
}

// take returns and forgets the decoding error remembered for v.
func (c *Codec) take(v any) error {
	e, ok := c.invalid.LoadAndDelete(v)
	if !ok {
		return nil
	}
	return status.Error(codes.InvalidArgument, fmt.Sprintf("malformed request message: %v", e))
}

// ServerOptions returns the codec and the interceptors that turn its
// remembered errors into INVALID_ARGUMENT. Pass them to grpc.NewServer
// before any other interceptor, so that they run first.
func (c *Codec) ServerOptions() []grpc.ServerOption {
	unary := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if err := c.take(req); err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
	stream := func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		return handler(srv, &checkedStream{ServerStream: ss, c: c})
	}
	return []grpc.ServerOption{
		grpc.ForceServerCodecV2(c),
		grpc.ChainUnaryInterceptor(unary),
		grpc.ChainStreamInterceptor(stream),
	}
}

// checkedStream reports a malformed message from RecvMsg.
type checkedStream struct {
	grpc.ServerStream
	c *Codec
}

// RecvMsg receives m and fails with INVALID_ARGUMENT when it was malformed.
func (s *checkedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return s.c.take(m)
}
