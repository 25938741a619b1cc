// Package limits holds the resource limits every Kiln listener applies to
// what clients send (message and body bytes, decompressed bytes, inputs
// per request, elements per tensor, bytes of requests in flight, read
// timeouts, concurrent streams) and the admission control that enforces
// two of them across every listener: Gate bounds the bytes of requests in
// flight (unary requests, HTTP bodies and each message of a stream),
// Streams the client-streaming calls open at once.
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
	// DefaultMaxStreams bounds the client-streaming calls open at once
	// over the whole server (ModelStreamInfer, Flight DoPut, DoExchange
	// and Handshake): 64. Each stream's admitted messages count in the
	// in-flight bytes; what the limit bounds is the one message a stream
	// may be receiving before it is admitted (up to the message size), so
	// 64 streams of 64 MiB messages add at most 4 GiB on the default box.
	DefaultMaxStreams = 64
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
	// MaxStreams bounds the client-streaming calls (ModelStreamInfer,
	// Flight DoPut, DoExchange, Handshake) open at once over the whole
	// server; a new stream beyond it is answered RESOURCE_EXHAUSTED.
	MaxStreams int `json:"max_streams"`
}

// Defaults returns every limit at its default.
func Defaults() Limits {
	return Limits{
		MaxDecompressedBytes: DefaultMaxDecompressedBytes, MaxInputs: DefaultMaxInputs,
		MaxTensorElements: DefaultMaxTensorElements, MaxInflightBytes: DefaultMaxInflightBytes,
		ReadHeaderTimeout: DefaultReadHeaderTimeout, ReadTimeout: DefaultReadTimeout,
		MaxConcurrentStreams: DefaultMaxConcurrentStreams, MaxStreams: DefaultMaxStreams,
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
	if l.MaxStreams == 0 {
		l.MaxStreams = d.MaxStreams
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
		{"max streams", int64(l.MaxStreams)},
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
	peak     atomic.Int64 // the most bytes admitted at once
	refused  atomic.Int64 // requests refused
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
			g.refused.Add(1)
			return false
		}
		if g.used.CompareAndSwap(used, used+n) {
			raise(&g.peak, used+n)
			return true
		}
	}
}

// raise sets *max to v when v is larger.
func raise(max *atomic.Int64, v int64) {
	for {
		m := max.Load()
		if v <= m || max.CompareAndSwap(m, v) {
			return
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

// Peak returns the most bytes admitted at once since the gate was made:
// at most the capacity, or one request larger than the whole capacity
// admitted alone.
func (g *Gate) Peak() int64 {
	if g == nil {
		return 0
	}
	return g.peak.Load()
}

// Refused returns how many requests Acquire has refused.
func (g *Gate) Refused() int64 {
	if g == nil {
		return 0
	}
	return g.refused.Load()
}

// Busy returns the RESOURCE_EXHAUSTED error of a refused request of n
// bytes, saying what is in flight and the limit.
func (g *Gate) Busy(n int64) error {
	return status.Errorf(codes.ResourceExhausted, "server busy: %d bytes of requests in flight, this one adds %d, the limit is %d; retry later", g.InFlight(), n, g.Capacity())
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
			return nil, g.Busy(n)
		}
		defer g.Release(n)
		return handler(ctx, req)
	}
}

// Streams is admission control over the client-streaming calls open at
// once: Acquire admits a new stream while fewer than the limit are open,
// and refuses it at once otherwise. A nil *Streams admits every stream.
// It is safe for concurrent use.
type Streams struct {
	max     int64
	open    atomic.Int64
	peak    atomic.Int64
	refused atomic.Int64
}

// NewStreams returns a limit of max streams open at once (max ≤ 0: nil,
// no limit).
func NewStreams(max int) *Streams {
	if max <= 0 {
		return nil
	}
	return &Streams{max: int64(max)}
}

// Acquire admits one stream and returns true, or returns false when the
// limit is reached. Each true must be paired with Release.
func (s *Streams) Acquire() bool {
	if s == nil {
		return true
	}
	for {
		open := s.open.Load()
		if open >= s.max {
			s.refused.Add(1)
			return false
		}
		if s.open.CompareAndSwap(open, open+1) {
			raise(&s.peak, open+1)
			return true
		}
	}
}

// Release ends a stream admitted by Acquire.
func (s *Streams) Release() {
	if s != nil {
		s.open.Add(-1)
	}
}

// Open returns the streams open now.
func (s *Streams) Open() int64 {
	if s == nil {
		return 0
	}
	return s.open.Load()
}

// Peak returns the most streams open at once since s was made.
func (s *Streams) Peak() int64 {
	if s == nil {
		return 0
	}
	return s.peak.Load()
}

// Refused returns how many streams Acquire has refused.
func (s *Streams) Refused() int64 {
	if s == nil {
		return 0
	}
	return s.refused.Load()
}

// Max returns the limit (0 for a nil *Streams: no limit).
func (s *Streams) Max() int64 {
	if s == nil {
		return 0
	}
	return s.max
}

// StreamServerInterceptor admits each client-streaming gRPC call (one
// whose client sends a stream of messages: ModelStreamInfer, Flight DoPut,
// DoExchange, Handshake) through s, answering RESOURCE_EXHAUSTED when the
// limit is reached; the stream is released when its handler returns.
// Server-streaming and unary calls pass.
func (s *Streams) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if s == nil || !info.IsClientStream {
			return handler(srv, ss)
		}
		if !s.Acquire() {
			return status.Errorf(codes.ResourceExhausted, "server busy: %d streams open, the limit is %d; retry later", s.Open(), s.max)
		}
		defer s.Release()
		return handler(srv, ss)
	}
}
