// Package limits holds the resource limits every Kiln listener applies to
// what clients send (message and body bytes, decompressed bytes, inputs
// per request, elements per tensor, bytes of requests in flight, read
// timeouts, concurrent streams) and Gate, the admission control that
// bounds the bytes of requests in flight.
//
// Every limit is checked against what the sender declares before anything
// is allocated from that declaration: a declared shape, Content-Length,
// element count or Arrow length is compared with the bytes actually
// received first.
package limits

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Defaults, sized for a small box (2 cores, 24 GiB): a request decodes into
// at most a few copies of its message (wire buffer, typed tensor, the
// batch), so 64 MiB messages and 1 GiB in flight keep the worst case of
// concurrent large requests within a few GiB while a 16-million-element
// FP32 tensor still fits one message.
const (
	// DefaultMaxMessageBytes bounds one gRPC or Flight message and one
	// HTTP request body as sent (64 MiB).
	DefaultMaxMessageBytes = 64 << 20
	// DefaultMaxDecompressedBytes bounds an HTTP body after gzip/deflate
	// decoding (64 MiB).
	DefaultMaxDecompressedBytes = 64 << 20
	// DefaultMaxInputs bounds the inputs of one inference request.
	DefaultMaxInputs = 64
	// DefaultMaxTensorElements bounds the elements of one tensor (and the
	// rows of one Arrow record batch): 2^28.
	DefaultMaxTensorElements = 1 << 28
	// DefaultMaxInflightBytes bounds the bytes of the request messages
	// being decoded or executed at once, over every listener (1 GiB).
	DefaultMaxInflightBytes = 1 << 30
	// DefaultReadHeaderTimeout bounds reading an HTTP request's headers.
	DefaultReadHeaderTimeout = 30 * time.Second
	// DefaultReadTimeout bounds reading a whole HTTP request, body
	// included (64 MiB at about 1 MiB/s).
	DefaultReadTimeout = 60 * time.Second
	// DefaultMaxConcurrentStreams bounds the concurrent gRPC streams
	// (requests) of one HTTP/2 connection.
	DefaultMaxConcurrentStreams = 128
)

// Limits are the resource limits of a server's listeners. The zero value
// of a field means its default (see Defaults).
type Limits struct {
	// MaxDecompressedBytes bounds an HTTP request body after
	// Content-Encoding (gzip, deflate) decoding, in bytes.
	MaxDecompressedBytes int64 `json:"max_decompressed_bytes"`
	// MaxInputs bounds the input tensors of one inference request.
	MaxInputs int `json:"max_inputs"`
	// MaxTensorElements bounds the elements of one input tensor, and the
	// length of an Arrow record batch (and of each of its columns).
	MaxTensorElements int64 `json:"max_tensor_elements"`
	// MaxInflightBytes bounds the bytes of the requests admitted at once
	// (gRPC and Flight messages, HTTP bodies as declared); a request over
	// it is answered RESOURCE_EXHAUSTED (HTTP 503) before its data is
	// decoded.
	MaxInflightBytes int64 `json:"max_inflight_bytes"`
	// ReadHeaderTimeout and ReadTimeout bound reading an HTTP request's
	// headers, and the whole request with its body.
	ReadHeaderTimeout time.Duration `json:"read_header_timeout"`
	ReadTimeout       time.Duration `json:"read_timeout"`
	// MaxConcurrentStreams bounds the concurrent streams of one gRPC
	// (HTTP/2) connection, KServe's and Flight's.
	MaxConcurrentStreams uint32 `json:"max_concurrent_streams"`
}

// Defaults returns every limit at its default.
func Defaults() Limits {
	return Limits{
		MaxDecompressedBytes: DefaultMaxDecompressedBytes, MaxInputs: DefaultMaxInputs,
		MaxTensorElements: DefaultMaxTensorElements, MaxInflightBytes: DefaultMaxInflightBytes,
		ReadHeaderTimeout: DefaultReadHeaderTimeout, ReadTimeout: DefaultReadTimeout,
		MaxConcurrentStreams: DefaultMaxConcurrentStreams,
	}
}

// WithDefaults returns l with every zero field set to its default.
func (l Limits) WithDefaults() Limits {
	d := Defaults()
	if l.MaxDecompressedBytes == 0 {
		l.MaxDecompressedBytes = d.MaxDecompressedBytes
	}
	if l.MaxInputs == 0 {
		l.MaxInputs = d.MaxInputs
	}
	if l.MaxTensorElements == 0 {
		l.MaxTensorElements = d.MaxTensorElements
	}
	if l.MaxInflightBytes == 0 {
		l.MaxInflightBytes = d.MaxInflightBytes
	}
	if l.ReadHeaderTimeout == 0 {
		l.ReadHeaderTimeout = d.ReadHeaderTimeout
	}
	if l.ReadTimeout == 0 {
		l.ReadTimeout = d.ReadTimeout
	}
	if l.MaxConcurrentStreams == 0 {
		l.MaxConcurrentStreams = d.MaxConcurrentStreams
	}
	return l
}

// Validate reports the first negative limit, naming it.
func (l Limits) Validate() error {
	for _, c := range []struct {
		name string
		v    int64
	}{
		{"max decompressed bytes", l.MaxDecompressedBytes}, {"max inputs", int64(l.MaxInputs)},
		{"max tensor elements", l.MaxTensorElements}, {"max in-flight bytes", l.MaxInflightBytes},
		{"read header timeout", int64(l.ReadHeaderTimeout)}, {"read timeout", int64(l.ReadTimeout)},
	} {
		if c.v < 0 {
			return fmt.Errorf("limits: %s %d: want ≥ 0 (0: the default)", c.name, c.v)
		}
	}
	return nil
}

// Gate is admission control over the bytes of requests in flight: Acquire
// admits a request of n bytes when the admitted total stays within the
// gate's capacity, and refuses it at once otherwise (never waits). A nil
// *Gate admits everything. It is safe for concurrent use.
type Gate struct {
	capacity int64
	used     atomic.Int64
}

// NewGate returns a gate admitting up to capacity bytes at once
// (capacity ≤ 0: nil, no limit).
func NewGate(capacity int64) *Gate {
	if capacity <= 0 {
		return nil
	}
	return &Gate{capacity: capacity}
}

// Acquire admits n bytes and returns true, or returns false when that
// would exceed the capacity. Each true must be paired with Release(n). A
// request larger than the whole capacity is admitted when nothing else is
// in flight, so that a limit below the message size cannot starve it.
func (g *Gate) Acquire(n int64) bool {
	if g == nil {
		return true
	}
	if n < 0 {
		n = 0
	}
	for {
		used := g.used.Load()
		if used > 0 && used+n > g.capacity {
			return false
		}
		if g.used.CompareAndSwap(used, used+n) {
			return true
		}
	}
}

// Release gives back n bytes admitted by Acquire.
func (g *Gate) Release(n int64) {
	if g == nil {
		return
	}
	if n < 0 {
		n = 0
	}
	g.used.Add(-n)
}

// InFlight returns the bytes admitted now.
func (g *Gate) InFlight() int64 {
	if g == nil {
		return 0
	}
	return g.used.Load()
}

// Capacity returns the gate's capacity in bytes (0 for a nil gate: no
// limit).
func (g *Gate) Capacity() int64 {
	if g == nil {
		return 0
	}
	return g.capacity
}

// UnaryServerInterceptor admits each unary gRPC request by its message
// size (proto.Size) through g, answering RESOURCE_EXHAUSTED when the bytes
// in flight would exceed the capacity; the bytes are released when the
// handler returns. The message is decoded already (gRPC bounds it by the
// receive limit); admission happens before the handler decodes its data
// into tensors, which is where a request's memory multiplies.
func (g *Gate) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if g == nil {
			return handler(ctx, req)
		}
		m, ok := req.(proto.Message)
		if !ok {
			return handler(ctx, req)
		}
		n := int64(proto.Size(m))
		if !g.Acquire(n) {
			return nil, status.Errorf(codes.ResourceExhausted, "server busy: %d bytes of requests in flight, this one adds %d, the limit is %d; retry later", g.InFlight(), n, g.capacity)
		}
		defer g.Release(n)
		return handler(ctx, req)
	}
}
