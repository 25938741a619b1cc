package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
)

// Code is the kind of a failure: the values of kiln_error_code_t in
// kiln.h. Codes follow Triton's TRITONSERVER_Error_Code and gRPC's status
// codes; serving/status maps them to gRPC, HTTP and Flight statuses.
type Code int32

// Codes, with the values of kiln_error_code_t.
const (
	// Unknown: an error nobody classified.
	Unknown Code = 0
	// Internal: a bug or broken invariant in Kiln or libtorch.
	Internal Code = 1
	// NotFound: a file, model, version, dataset or job does not exist.
	NotFound Code = 2
	// InvalidArgument: the caller's arguments or data are wrong (shapes,
	// dtypes, values, a file that is not a TorchScript archive).
	InvalidArgument Code = 3
	// Unavailable: not ready now (a model loading); retrying may work.
	Unavailable Code = 4
	// Unsupported: not implemented by Kiln or by the linked libtorch.
	Unsupported Code = 5
	// AlreadyExists: the thing to create exists already.
	AlreadyExists Code = 6
	// Cancelled: the caller cancelled (context.Canceled).
	Cancelled Code = 7
	// OutOfMemory: an allocation failed (c10::OutOfMemoryError,
	// std::bad_alloc, libtorch's CPU allocator).
	OutOfMemory Code = 8
	// FailedPrecondition: the system is not in the state the call needs.
	FailedPrecondition Code = 9
	// ResourceExhausted: a quota or queue is full (not memory).
	ResourceExhausted Code = 10
	// DeadlineExceeded: the caller's deadline passed
	// (context.DeadlineExceeded).
	DeadlineExceeded Code = 11
)

var codeNames = [...]string{
	Unknown: "UNKNOWN", Internal: "INTERNAL", NotFound: "NOT_FOUND",
	InvalidArgument: "INVALID_ARGUMENT", Unavailable: "UNAVAILABLE",
	Unsupported: "UNSUPPORTED", AlreadyExists: "ALREADY_EXISTS",
	Cancelled: "CANCELLED", OutOfMemory: "OUT_OF_MEMORY",
	FailedPrecondition: "FAILED_PRECONDITION", ResourceExhausted: "RESOURCE_EXHAUSTED",
	DeadlineExceeded: "DEADLINE_EXCEEDED",
}

// Codes lists every code, in value order.
func Codes() []Code {
	out := make([]Code, len(codeNames))
	for i := range out {
		out[i] = Code(i)
	}
	return out
}

// String returns the code's name as in kiln.h without the KILN_ERROR_
// prefix, e.g. "INVALID_ARGUMENT"; an unknown value prints as
// "Code(42)".
func (c Code) String() string {
	if c >= 0 && int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("Code(%d)", int32(c))
}

// Error is an error with a code: what a kiln_error carries across the C
// ABI, and what Go layers return for failures of a known kind.
type Error struct {
	Code    Code
	Message string
}

// Error returns the message (without the code).
func (e *Error) Error() string { return e.Message }

// ErrorCode returns e's code; CodeOf finds it through wrapping.
func (e *Error) ErrorCode() Code { return e.Code }

// Is reports whether target is an *Error with e's code and either no
// message or e's message, so that errors.Is(err, &Error{Code: NotFound})
// asks for the kind and a sentinel *Error matches itself.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code && (t.Message == "" || t.Message == e.Message)
}

// Errorf returns an *Error with code and a message formatted as by
// fmt.Sprintf. Use fmt.Errorf("...: %w", err) to add context to an
// *Error: CodeOf finds the code through the wrapping.
func Errorf(code Code, format string, args ...any) error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Coder is implemented by errors that carry a code: *Error, and errors
// that decide their code from what they wrap (serving's batcher.ExecError).
type Coder interface {
	error
	ErrorCode() Code
}

// CodeOf returns the code of err: that of the outermost Coder in its chain
// (errors.As), else Cancelled for context.Canceled, DeadlineExceeded for
// context.DeadlineExceeded and NotFound for fs.ErrNotExist, else Unknown.
// A nil err has no code; CodeOf(nil) is Unknown.
func CodeOf(err error) Code {
	if err == nil {
		return Unknown
	}
	var c Coder
	if errors.As(err, &c) {
		return c.ErrorCode()
	}
	switch {
	case errors.Is(err, context.Canceled):
		return Cancelled
	case errors.Is(err, context.DeadlineExceeded):
		return DeadlineExceeded
	case errors.Is(err, fs.ErrNotExist):
		return NotFound
	}
	return Unknown
}

// HasCode reports whether CodeOf(err) is code.
func HasCode(err error, code Code) bool { return err != nil && CodeOf(err) == code }
