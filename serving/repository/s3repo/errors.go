package s3repo

import "github.com/kilnml/kiln/internal/s3util"

// Describe puts a hint before an S3 error that says what to check: a
// missing bucket, credentials the store refuses, an endpoint that cannot
// be reached (s3util.Describe). The SDK's error stays wrapped.
func Describe(err error, bucket string) error { return s3util.Describe(err, bucket) }
