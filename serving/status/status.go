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
	"net/http"

	"github.com/kilnml/kiln/core"
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

// GRPC returns err as a gRPC status error: nil for nil; err itself when it
// already is a gRPC status (status.FromError succeeds); otherwise a status
// with GRPCCode(core.CodeOf(err)) and err's message.
func GRPC(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := grpcstatus.FromError(err); ok {
		return err
	}
	return grpcstatus.Error(GRPCCode(core.CodeOf(err)), err.Error())
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
