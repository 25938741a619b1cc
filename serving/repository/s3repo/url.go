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
// The client is configured like any AWS SDK for Go v2 client (NewClient,
// internal/s3util's, which the registry's artifact store shares):
// AWS_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE and
// the shared files, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for another
// S3-compatible store, with path-style addressing (on by default with a
// custom endpoint; KILN_S3_PATH_STYLE=true/false overrides) and checksums
// only where the API requires them, which S3-compatible stores accept.
package s3repo

import "github.com/kilnml/kiln/internal/s3util"

// Scheme is the URI scheme of S3 locations.
const Scheme = s3util.Scheme

// Location is a bucket and a key prefix in it (s3util.Location).
type Location = s3util.Location

// IsURL reports whether s is an s3:// URI.
func IsURL(s string) bool { return s3util.IsURL(s) }

// ParseURL parses s3://bucket[/prefix] (s3util.ParseURL).
func ParseURL(s string) (Location, error) { return s3util.ParseURL(s) }
