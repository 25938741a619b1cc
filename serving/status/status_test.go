package status_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/serving/batcher"
	"github.com/kilnml/kiln/serving/manager"
	kstatus "github.com/kilnml/kiln/serving/status"
)

// Every code, its gRPC code and its HTTP status.
func TestEveryCode(t *testing.T) {
	want := map[core.Code]struct {
		grpc codes.Code
		http int
	}{
		core.Unknown:            {codes.Internal, http.StatusInternalServerError},
		core.Internal:           {codes.Internal, http.StatusInternalServerError},
		core.NotFound:           {codes.NotFound, http.StatusNotFound},
		core.InvalidArgument:    {codes.InvalidArgument, http.StatusBadRequest},
		core.Unavailable:        {codes.Unavailable, http.StatusServiceUnavailable},
		core.Unsupported:        {codes.Unimplemented, http.StatusNotImplemented},
		core.AlreadyExists:      {codes.AlreadyExists, http.StatusConflict},
		core.Cancelled:          {codes.Canceled, 499},
		core.OutOfMemory:        {codes.ResourceExhausted, http.StatusTooManyRequests},
		core.FailedPrecondition: {codes.FailedPrecondition, http.StatusBadRequest},
		core.ResourceExhausted:  {codes.ResourceExhausted, http.StatusTooManyRequests},
		core.DeadlineExceeded:   {codes.DeadlineExceeded, http.StatusGatewayTimeout},
	}
	require.Len(t, want, len(native.Codes()), "a code without a row")
	for _, c := range native.Codes() {
		w, ok := want[c]
		require.True(t, ok, "no row for %v", c)
		err := fmt.Errorf("context: %w", core.Errorf(c, "failed"))
		st := grpcstatus.Convert(kstatus.GRPC(err))
		assert.Equal(t, w.grpc, st.Code(), "%v", c)
		assert.Equal(t, "context: failed", st.Message(), "%v", c)
		assert.Equal(t, w.http, kstatus.HTTPStatus(err), "%v", c)
	}
}

func TestErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		grpc codes.Code
		http int
	}{
		{"plain error: the one default", errors.New("boom"), codes.Internal, 500},
		{"cancelled", fmt.Errorf("run: %w", context.Canceled), codes.Canceled, 499},
		{"deadline", fmt.Errorf("run: %w", context.DeadlineExceeded), codes.DeadlineExceeded, 504},
		{"missing file", fmt.Errorf("open: %w", fs.ErrNotExist), codes.NotFound, 404},
		{"unknown model", fmt.Errorf("%w: unknown model %q", manager.ErrNotFound, "m"), codes.NotFound, 404},
		{"model loading", fmt.Errorf("%w: model %q is loading", manager.ErrUnavailable, "m"), codes.Unavailable, 503},
		{"queue full", batcher.ErrQueueFull, codes.ResourceExhausted, 429},
		{"batcher closed", batcher.ErrClosed, codes.Unavailable, 503},
		// A model failing on inputs that passed the configuration's checks
		// is the server's fault, whatever libtorch's code says...
		{"execution", &batcher.ExecError{Err: core.Errorf(core.InvalidArgument, "mat1 and mat2")}, codes.Internal, 500},
		// ...but running out of memory stays what it is.
		{"execution out of memory", &batcher.ExecError{Err: core.Errorf(core.OutOfMemory, "alloc")}, codes.ResourceExhausted, 429},
		{"gRPC status passes through", grpcstatus.Error(codes.PermissionDenied, "no"), codes.PermissionDenied, 403},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.grpc, grpcstatus.Code(kstatus.GRPC(tc.err)))
			assert.Equal(t, tc.http, kstatus.HTTPStatus(tc.err))
		})
	}
	assert.NoError(t, kstatus.GRPC(nil))
	assert.Equal(t, http.StatusOK, kstatus.HTTPStatus(nil))
}
