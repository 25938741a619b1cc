// Package s3util is the S3 client setup every Kiln package that talks to
// S3-compatible object storage shares: the model repository in S3
// (serving/repository/s3repo) and the registry's artifact store
// (registry). It parses s3://bucket/prefix locations (ParseURL), makes
// a client from the standard AWS configuration (NewClient) and says what
// an S3 failure means (Classify, Describe).
//
// The client is configured like any AWS SDK for Go v2 client: AWS_REGION,
// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the shared
// files, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for another
// S3-compatible store (MinIO, SeaweedFS, versitygw, Ceph RGW, ...), with
// path-style addressing (on by default with a custom endpoint;
// ClientOptions.PathStyle, which the entry points take from
// KILN_S3_PATH_STYLE, overrides) and checksums only where the API
// requires them, which S3-compatible stores accept.
//
// It imports no Kiln package (a leaf, like internal/kilnenv).
package s3util

import (
	"fmt"
	"strings"
)

// Scheme is the URI scheme of S3 locations.
const Scheme = "s3://"

// Location is a bucket and a key prefix in it.
type Location struct {
	// Bucket is the bucket's name.
	Bucket string
	// Prefix is the key prefix, without leading or trailing '/' ("" for
	// the whole bucket).
	Prefix string
}

// IsURL reports whether s is an s3:// URI.
func IsURL(s string) bool { return strings.HasPrefix(s, Scheme) }

// ParseURL parses s3://bucket[/prefix]. The bucket must be a DNS-style
// bucket name (3 to 63 characters of lower-case letters, digits, '.' and
// '-'); the prefix may not hold empty, "." or ".." segments.
func ParseURL(s string) (Location, error) {
	if !IsURL(s) {
		return Location{}, fmt.Errorf("%q: not an s3:// URI", s)
	}
	rest := strings.TrimPrefix(s, Scheme)
	bucket, prefix, _ := strings.Cut(rest, "/")
	if err := validBucket(bucket); err != nil {
		return Location{}, fmt.Errorf("%q: %w", s, err)
	}
	if strings.ContainsAny(prefix, "?#") {
		return Location{}, fmt.Errorf("%q: a query or fragment is not allowed", s)
	}
	prefix = strings.TrimSuffix(prefix, "/")
	if prefix != "" {
		for _, seg := range strings.Split(prefix, "/") {
			if seg == "" || seg == "." || seg == ".." {
				return Location{}, fmt.Errorf("%q: the prefix has an empty, '.' or '..' segment", s)
			}
		}
	}
	return Location{Bucket: bucket, Prefix: prefix}, nil
}

func validBucket(b string) error {
	if len(b) < 3 || len(b) > 63 {
		return fmt.Errorf("bucket name %q: want 3 to 63 characters", b)
	}
	for i, r := range b {
		ok := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || (r == '.' || r == '-') && i > 0 && i < len(b)-1
		if !ok {
			return fmt.Errorf("bucket name %q: want lower-case letters, digits, '.' and '-', starting and ending with a letter or digit", b)
		}
	}
	return nil
}

// String returns the location as an s3:// URI.
func (l Location) String() string {
	if l.Prefix == "" {
		return Scheme + l.Bucket
	}
	return Scheme + l.Bucket + "/" + l.Prefix
}

// Key returns the key of rel (a '/'-separated path) under the prefix.
func (l Location) Key(rel string) string {
	if l.Prefix == "" {
		return rel
	}
	return l.Prefix + "/" + rel
}

// Child returns the location of rel under l.
func (l Location) Child(rel string) Location {
	return Location{Bucket: l.Bucket, Prefix: strings.Trim(l.Key(rel), "/")}
}

// ListPrefix is the prefix ListObjectsV2 takes for everything under l:
// the prefix and a '/', or "" for the whole bucket.
func (l Location) ListPrefix() string {
	if l.Prefix == "" {
		return ""
	}
	return l.Prefix + "/"
}
