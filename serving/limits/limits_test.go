package limits

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Concurrent acquisitions never admit more than the capacity; Peak and
// Refused say what happened.
func TestGatePeakStaysWithinCapacity(t *testing.T) {
	g := NewGate(100)
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for range 1000 {
				if g.Acquire(30) {
					g.Release(30)
				}
			}
		})
	}
	wg.Wait()
	assert.Zero(t, g.InFlight())
	assert.LessOrEqual(t, g.Peak(), int64(100))
	assert.GreaterOrEqual(t, g.Peak(), int64(30))
	require.True(t, g.Acquire(80))
	require.False(t, g.Acquire(30), "80 + 30 > 100")
	assert.Positive(t, g.Refused())
	assert.Equal(t, codes.ResourceExhausted, status.Code(g.Busy(30)))
	g.Release(80)
	require.True(t, g.Acquire(500), "a request over the capacity is admitted alone")
	assert.EqualValues(t, 500, g.Peak())
}

func TestStreamsLimit(t *testing.T) {
	s := NewStreams(2)
	require.True(t, s.Acquire())
	require.True(t, s.Acquire())
	require.False(t, s.Acquire())
	assert.EqualValues(t, 2, s.Open())
	assert.EqualValues(t, 1, s.Refused())
	s.Release()
	require.True(t, s.Acquire())
	assert.EqualValues(t, 2, s.Peak())
	var none *Streams
	require.True(t, none.Acquire(), "a nil limit admits every stream")
	none.Release()
	assert.Nil(t, NewStreams(0))
}

// The interceptor counts client-streaming calls only, refuses those over
// the limit with RESOURCE_EXHAUSTED, and releases a stream when its
// handler returns.
func TestStreamsInterceptor(t *testing.T) {
	s := NewStreams(1)
	icpt := s.StreamServerInterceptor()
	bidi := &grpc.StreamServerInfo{FullMethod: "/x/Stream", IsClientStream: true, IsServerStream: true}
	serverOnly := &grpc.StreamServerInfo{FullMethod: "/x/Get", IsServerStream: true}
	inside := make(chan struct{})
	leave := make(chan struct{})
	done := make(chan error)
	go func() {
		done <- icpt(nil, nil, bidi, func(any, grpc.ServerStream) error {
			close(inside)
			<-leave
			return nil
		})
	}()
	<-inside
	err := icpt(nil, nil, bidi, func(any, grpc.ServerStream) error { return nil })
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.NoError(t, icpt(nil, nil, serverOnly, func(any, grpc.ServerStream) error { return nil }), "server-streaming calls pass")
	close(leave)
	require.NoError(t, <-done)
	assert.Zero(t, s.Open())
	require.NoError(t, icpt(nil, nil, bidi, func(any, grpc.ServerStream) error { return nil }))
}
