// Package s3repo keeps a model repository in S3-compatible object storage
// (AWS S3, MinIO, SeaweedFS, versitygw, Ceph RGW, ...): the same layout as
// a local repository under a bucket and prefix,
//
//	s3://bucket/prefix/<model>/config.yaml            (or .yml, .json, config.pbtxt)
//	s3://bucket/prefix/<model>/labels.txt             (optional)
//	s3://bucket/prefix/<model>/<version>/model.pt     (and any other files)
//	s3://bucket/prefix/<model>/<version>/.kiln-complete
//
// where a version is visible only once its completion marker
// .kiln-complete (MarkerName) exists: a JSON manifest, written last, that
// lists every file of the version with its size and SHA-256 (see
// Manifest). Push uploads a model directory in that order.
//
// A Mirror brings the repository into a local directory that
// serving/repository reads as usual: each complete version is downloaded
// into a staging directory, its files checked against the manifest, and
// renamed into place whole; model files (configurations, labels) are
// replaced by rename. Downloads are cached by ETag and by SHA-256, so a
// poll that finds nothing changed downloads nothing. Whatever fails (the
// endpoint, credentials, a missing bucket, a corrupt object) leaves the
// mirror as it was, so the last good versions keep serving, and is
// reported per model (Problem) for the model's status.
//
// The client is configured like any AWS SDK for Go v2 client (NewClient):
// AWS_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE and
// the shared files, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for another
// S3-compatible store, with path-style addressing (on by default with a
// custom endpoint; KILN_S3_PATH_STYLE=true/false overrides) and checksums
// only where the API requires them, which S3-compatible stores accept.
package s3repo

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

// listPrefix is the prefix ListObjectsV2 takes for everything under l.
func (l Location) listPrefix() string {
	if l.Prefix == "" {
		return ""
	}
	return l.Prefix + "/"
}
