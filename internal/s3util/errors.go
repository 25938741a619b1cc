package s3util

import (
	"errors"
	"fmt"
	"net"

	"github.com/aws/smithy-go"
)

// Problem is the kind of an S3 failure (Classify).
type Problem int

// Problems.
const (
	// Other: none of the kinds below (a server error, a cancelled
	// context, ...).
	Other Problem = iota
	// NoBucket: the bucket does not exist.
	NoBucket
	// Denied: the store refuses the credentials or the access.
	Denied
	// NoObject: the object (or bucket, on a HEAD request, which has no
	// error body) does not exist.
	NoObject
	// Unreachable: the endpoint cannot be reached (DNS, connection
	// refused, timeout).
	Unreachable
)

// Classify says what kind of failure an S3 call's error is.
func Classify(err error) Problem {
	var api smithy.APIError
	if errors.As(err, &api) {
		switch api.ErrorCode() {
		case "NoSuchBucket":
			return NoBucket
		case "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "Forbidden":
			return Denied
		case "NoSuchKey", "NotFound":
			return NoObject
		}
		return Other
	}
	var nerr net.Error
	var oerr *net.OpError
	if errors.As(err, &oerr) || errors.As(err, &nerr) {
		return Unreachable
	}
	return Other
}

// Describe puts a hint before an S3 error that says what to check: a
// missing bucket, credentials the store refuses, an endpoint that cannot
// be reached. The SDK's error stays wrapped.
func Describe(err error, bucket string) error {
	switch Classify(err) {
	case NoBucket:
		return fmt.Errorf("bucket %q does not exist: %w", bucket, err)
	case Denied:
		var api smithy.APIError
		errors.As(err, &api)
		return fmt.Errorf("access to bucket %q refused (%s): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE: %w", bucket, api.ErrorCode(), err)
	case NoObject:
		return fmt.Errorf("object not found: %w", err)
	case Unreachable:
		return fmt.Errorf("S3 endpoint unreachable (check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION): %w", err)
	}
	return err
}
