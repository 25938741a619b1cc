// Package status maps Kiln's error codes (core.Code) to the statuses the
// serving surfaces answer with: gRPC codes for the KServe v2 gRPC service
// and for Arrow Flight (Flight is gRPC, so it uses the same mapping), and
// HTTP statuses for the KServe v2 REST service. It is the one place those
// mappings live.
//
// Code to gRPC follows the meaning of gRPC's codes
// (google.golang.org/grpc/codes, https://grpc.github.io/grpc/core/md_doc_statuscodes.html)
// and Triton's mapping of TRITONSERVER_Error_Code to gRPC (INVALID_ARG to
// INVALID_ARGUMENT, UNSUPPORTED to UNIMPLEMENTED, and so on); OUT_OF_MEMORY
// becomes RESOURCE_EXHAUSTED. gRPC to HTTP is grpc-gateway's
// HTTPStatusFromCode, which Triton's and KServe's REST errors agree with
// for the codes they use (400 invalid argument, 404 not found, 503
// unavailable, 500 internal), with 499 for a cancelled request.
//
// An error that carries no code (core.CodeOf gives core.Unknown: a plain
// Go error nobody classified) maps to INTERNAL (HTTP 500), on every
// surface. Failures the caller can fix are given INVALID_ARGUMENT where
// they arise; an unclassified one is more likely the server's, and
// answering INVALID_ARGUMENT for it would tell a client that retrying the
// same request cannot help. (The gRPC service used to default to
// INVALID_ARGUMENT and Flight to INTERNAL; both now answer INTERNAL.)
package status

import (
	"context"
	"fmt"
	"net/http"
	"unicode/utf8"

	"github.com/kilnml/kiln/core"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
)

// GRPCCode returns the gRPC code for a Kiln code. Unknown maps to
// codes.Internal (see the package comment).
func GRPCCode(c core.Code) codes.Code {
	switch c {
	case core.Internal, core.Unknown:
		return codes.Internal
	case core.NotFound:
		return codes.NotFound
	case core.InvalidArgument:
		return codes.InvalidArgument
	case core.Unavailable:
		return codes.Unavailable
	case core.Unsupported:
		return codes.Unimplemented
	case core.AlreadyExists:
		return codes.AlreadyExists
	case core.Cancelled:
		return codes.Canceled
	case core.OutOfMemory, core.ResourceExhausted:
		return codes.ResourceExhausted
	case core.FailedPrecondition:
		return codes.FailedPrecondition
	case core.DeadlineExceeded:
		return codes.DeadlineExceeded
	}
	return codes.Internal
}

// MaxMessageBytes bounds the message of a status sent to a client. Longer
// messages (a 20,000-character model name or a 100 KB ticket echoed in an
// error) are cut, keeping their start and saying how much was cut: the
// message travels in an HTTP/2 header (grpc-message), and one over the
// peer's header limit would turn the answer into INTERNAL.
const MaxMessageBytes = 1024

// Truncate returns msg cut to at most MaxMessageBytes bytes (on a UTF-8
// boundary), ending with "… (N bytes cut)" when it was cut.
func Truncate(msg string) string {
	if len(msg) <= MaxMessageBytes {
		return msg
	}
	const room = MaxMessageBytes - 32 // for the note
	cut := room
	for cut > 0 && !utf8.RuneStart(msg[cut]) {
		cut--
	}
	return fmt.Sprintf("%s… (%d bytes cut)", msg[:cut], len(msg)-cut)
}

// GRPC returns err as a gRPC status error: nil for nil; a gRPC status
// (status.FromError succeeds) keeps its code; otherwise the code is
// GRPCCode(core.CodeOf(err)). The message is err's, cut to
// MaxMessageBytes.
func GRPC(err error) error {
	if err == nil {
		return nil
	}
	if st, ok := grpcstatus.FromError(err); ok {
		if len(st.Message()) <= MaxMessageBytes {
			return err
		}
		return grpcstatus.Error(st.Code(), Truncate(st.Message()))
	}
	return grpcstatus.Error(GRPCCode(core.CodeOf(err)), Truncate(err.Error()))
}

// ServerOptions returns interceptors that pass every error a handler (or
// an inner interceptor) returns through GRPC, so that each answer carries
// the code of its error and a bounded message. Give them to grpc.NewServer
// before every other interceptor, so that they see every error.
func ServerOptions() []grpc.ServerOption {
	unary := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		resp, err := handler(ctx, req)
		return resp, GRPC(err)
	}
	stream := func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		return GRPC(handler(srv, ss))
	}
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(unary), grpc.ChainStreamInterceptor(stream)}
}

// HTTPFromGRPC returns the HTTP status for a gRPC code (grpc-gateway's
// table): 200 OK, 400 for INVALID_ARGUMENT, FAILED_PRECONDITION and
// OUT_OF_RANGE, 401, 403, 404, 409 for ALREADY_EXISTS and ABORTED, 429
// for RESOURCE_EXHAUSTED, 499 for CANCELLED, 501 for UNIMPLEMENTED, 503
// for UNAVAILABLE, 504 for DEADLINE_EXCEEDED, 500 otherwise.
func HTTPFromGRPC(c codes.Code) int {
	switch c {
	case codes.OK:
		return http.StatusOK
	case codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.Unauthenticated:
		return http.StatusUnauthorized
	case codes.PermissionDenied:
		return http.StatusForbidden
	case codes.NotFound:
		return http.StatusNotFound
	case codes.AlreadyExists, codes.Aborted:
		return http.StatusConflict
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	case codes.Canceled:
		return 499 // client closed request
	case codes.Unimplemented:
		return http.StatusNotImplemented
	}
	return http.StatusInternalServerError
}

// HTTPStatus returns the HTTP status for err: that of its gRPC code as
// GRPC would give it. nil is 200.
func HTTPStatus(err error) int {
	if err == nil {
		return http.StatusOK
	}
	return HTTPFromGRPC(grpcstatus.Code(GRPC(err)))
}
