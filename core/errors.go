package core

import "github.com/kilnml/kiln/native"

// Code is the kind of a failure (native.Code): every error Kiln returns
// from libtorch carries one, and Go layers give one to failures of an
// obvious kind. serving/status maps codes to gRPC, HTTP and Flight
// statuses; the Python package picks its exception class by code.
type Code = native.Code

// Error is an error with a Code and a message (native.Error). Wrap it with
// fmt.Errorf("context: %w", err) to add context; CodeOf still finds it.
type Error = native.Error

// Coder is implemented by errors that carry a code (native.Coder).
type Coder = native.Coder

// Codes, as in kiln.h's kiln_error_code_t (see native.Code).
const (
	Unknown            = native.Unknown
	Internal           = native.Internal
	NotFound           = native.NotFound
	InvalidArgument    = native.InvalidArgument
	Unavailable        = native.Unavailable
	Unsupported        = native.Unsupported
	AlreadyExists      = native.AlreadyExists
	Cancelled          = native.Cancelled
	OutOfMemory        = native.OutOfMemory
	FailedPrecondition = native.FailedPrecondition
	ResourceExhausted  = native.ResourceExhausted
	DeadlineExceeded   = native.DeadlineExceeded
)

// Errorf returns an *Error with code and a message formatted as by
// fmt.Sprintf.
func Errorf(code Code, format string, args ...any) error {
	return native.Errorf(code, format, args...)
}

// CodeOf returns err's code: that of the outermost error in its chain that
// carries one (errors.As), else Cancelled for context.Canceled,
// DeadlineExceeded for context.DeadlineExceeded, NotFound for
// fs.ErrNotExist, else Unknown (a plain error nobody classified).
func CodeOf(err error) Code { return native.CodeOf(err) }

// HasCode reports whether err is non-nil and CodeOf(err) is code.
func HasCode(err error, code Code) bool { return native.HasCode(err, code) }
