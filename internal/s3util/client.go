package s3util

import (
	"context"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// DefaultRegion is the region used when none is configured (an
// S3-compatible store usually ignores it, but requests are signed with it).
const DefaultRegion = "us-east-1"

// ClientOptions configure NewClient; the zero value reads everything from
// the environment and the shared AWS files.
type ClientOptions struct {
	// Endpoint, when set, overrides AWS_ENDPOINT_URL(_S3).
	Endpoint string
	// PathStyle, when set, turns path-style addressing on or off
	// (kilnenv's KILN_S3_PATH_STYLE); nil means on with a custom endpoint
	// and off for AWS.
	PathStyle *bool
}

// NewClient returns an S3 client configured by the AWS SDK's default chain
// (environment: AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
// AWS_SESSION_TOKEN, AWS_PROFILE, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL;
// the shared config and credentials files; web identity and instance
// roles), with request checksums computed and response checksums checked
// only when the operation requires them (S3-compatible stores reject or
// ignore the newer default ones), the region DefaultRegion when none is
// set, and path-style addressing as ClientOptions.PathStyle says. It
// contacts no server.
func NewClient(ctx context.Context, opts ClientOptions) (*s3.Client, error) {
	cfg, err := config.LoadDefaultConfig(ctx,
		config.WithRequestChecksumCalculation(aws.RequestChecksumCalculationWhenRequired),
		config.WithResponseChecksumValidation(aws.ResponseChecksumValidationWhenRequired),
	)
	if err != nil {
		return nil, fmt.Errorf("s3: AWS configuration: %w", err)
	}
	if cfg.Region == "" {
		cfg.Region = DefaultRegion
	}
	return s3.NewFromConfig(cfg, func(o *s3.Options) {
		if opts.Endpoint != "" {
			o.BaseEndpoint = aws.String(opts.Endpoint)
		}
		// o.BaseEndpoint holds AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL /
		// the profile's endpoint_url here, as NewFromConfig resolved it.
		o.UsePathStyle = o.BaseEndpoint != nil
		if opts.PathStyle != nil {
			o.UsePathStyle = *opts.PathStyle
		}
	}), nil
}
