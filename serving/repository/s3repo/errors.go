package s3repo

import (
	"errors"
	"fmt"
	"net"

	"github.com/aws/smithy-go"
)

// Describe puts a hint before an S3 error that says what to check: a
// missing bucket, credentials the store refuses, an endpoint that cannot
// be reached. The SDK's error stays wrapped.
func Describe(err error, bucket string) error {
	var api smithy.APIError
	if errors.As(err, &api) {
		switch api.ErrorCode() {
		case "NoSuchBucket":
			return fmt.Errorf("bucket %q does not exist: %w", bucket, err)
		case "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "Forbidden":
			return fmt.Errorf("access to bucket %q refused (%s): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE: %w", bucket, api.ErrorCode(), err)
		case "NoSuchKey", "NotFound":
			return fmt.Errorf("object not found: %w", err)
		}
	}
	var nerr net.Error
	var oerr *net.OpError
	if errors.As(err, &oerr) || errors.As(err, &nerr) {
		return fmt.Errorf("S3 endpoint unreachable (check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION): %w", err)
	}
	return err
}
