package s3repo

import (
	"context"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/kilnml/kiln/internal/s3util"
)

// DefaultRegion is the region used when none is configured.
const DefaultRegion = s3util.DefaultRegion

// ClientOptions configure NewClient (s3util.ClientOptions).
type ClientOptions = s3util.ClientOptions

// NewClient returns an S3 client configured by the AWS SDK's default
// chain (s3util.NewClient).
func NewClient(ctx context.Context, opts ClientOptions) (*s3.Client, error) {
	return s3util.NewClient(ctx, opts)
}
