package registry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/s3util"
)

// artifactStore keeps the artifacts' bytes (sealed or not) under their
// digests, as <root>/sha256/<hex>: a local directory (dirStore, the
// default) or an S3 bucket and prefix (s3Store, for servers that share a
// PostgreSQL registry). It neither seals nor verifies: storeBlob and
// ReadArtifact do, the same for both.
type artifactStore interface {
	// has reports whether a blob is stored under digest with a size for
	// which stored is true.
	has(ctx context.Context, digest string, stored func(size int64) bool) (bool, error)
	// put stores body under digest whole or not at all.
	put(ctx context.Context, digest string, body []byte) error
	// get returns the bytes under digest; a missing blob is NotFound.
	get(ctx context.Context, digest string) ([]byte, error)
	// where names the blob of digest for messages (a path, an s3:// URI).
	where(digest string) string
	// String names the store (its directory or s3:// URI).
	String() string
}

// openStore returns the artifact store root names: an s3:// URI (the
// bucket checked once, so a missing bucket, refused credentials or an
// unreachable endpoint fail Open) or a directory.
func openStore(ctx context.Context, root string, o Options) (artifactStore, error) {
	if !s3util.IsURL(root) {
		return dirStore(root), nil
	}
	loc, err := s3util.ParseURL(root)
	if err != nil {
		return nil, core.Errorf(core.InvalidArgument, "registry: artifact store: %v", err)
	}
	client, err := s3util.NewClient(ctx, s3util.ClientOptions{PathStyle: o.S3PathStyle})
	if err != nil {
		return nil, core.Errorf(core.InvalidArgument, "registry: artifact store %s: %v", loc, err)
	}
	st := &s3Store{client: client, loc: loc}
	if _, err := client.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(loc.Bucket)}); err != nil {
		if s3util.Classify(err) == s3util.NoObject { // HEAD has no body: NotFound is the bucket
			return nil, core.Errorf(core.FailedPrecondition, "registry: artifact store %s: bucket %q does not exist: %v", loc, loc.Bucket, err)
		}
		return nil, fmt.Errorf("registry: artifact store %s: %w", loc, st.coded(err))
	}
	return st, nil
}

// dirStore is an artifact store in a local directory.
type dirStore string

func (d dirStore) String() string { return string(d) }

func (d dirStore) where(digest string) string { return filepath.Join(string(d), "sha256", digest) }

func (d dirStore) has(_ context.Context, digest string, _ func(int64) bool) (bool, error) {
	// A file is renamed into place whole: one that exists is complete.
	_, err := os.Stat(d.where(digest))
	return err == nil, nil
}

// put writes body to a temporary file beside its place, synced, read-only,
// then renamed into place.
func (d dirStore) put(_ context.Context, digest string, body []byte) error {
	path := d.where(digest)
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".tmp-"+digest[:16]+"-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(body)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, 0o444)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if dh, err := os.Open(dir); err == nil {
		dh.Sync()
		dh.Close()
	}
	return nil
}

func (d dirStore) get(_ context.Context, digest string) ([]byte, error) {
	body, err := os.ReadFile(d.where(digest))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, core.Errorf(core.NotFound, "missing from %s", d)
	}
	return body, err
}

// s3Store is an artifact store in S3-compatible object storage: object
// <prefix>/sha256/<hex> per blob. A PutObject is atomic (the object
// appears whole or not at all), so no temporary keys are needed.
type s3Store struct {
	client *s3.Client
	loc    s3util.Location
}

func (s *s3Store) String() string { return s.loc.String() }

func (s *s3Store) key(digest string) string { return s.loc.Key("sha256/" + digest) }

func (s *s3Store) where(digest string) string {
	return s3util.Scheme + s.loc.Bucket + "/" + s.key(digest)
}

// coded describes an S3 failure (s3util.Describe) and gives it a code:
// an unreachable endpoint is Unavailable, a missing bucket and refused
// credentials FailedPrecondition (the configuration must change), a
// missing object NotFound; a cancelled context keeps its own.
func (s *s3Store) coded(err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	code := core.Internal
	switch s3util.Classify(err) {
	case s3util.Unreachable:
		code = core.Unavailable
	case s3util.NoBucket, s3util.Denied:
		code = core.FailedPrecondition
	case s3util.NoObject:
		code = core.NotFound
	}
	return &core.Error{Code: code, Message: s3util.Describe(err, s.loc.Bucket).Error()}
}

func (s *s3Store) has(ctx context.Context, digest string, stored func(int64) bool) (bool, error) {
	out, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(s.loc.Bucket), Key: aws.String(s.key(digest))})
	if err != nil {
		if s3util.Classify(err) == s3util.NoObject {
			return false, nil
		}
		return false, s.coded(err)
	}
	return out.ContentLength != nil && stored(*out.ContentLength), nil
}

func (s *s3Store) put(ctx context.Context, digest string, body []byte) error {
	_, err := s.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(s.loc.Bucket), Key: aws.String(s.key(digest)),
		Body: bytes.NewReader(body), ContentLength: aws.Int64(int64(len(body))), ContentType: aws.String("application/octet-stream")})
	if err != nil {
		return s.coded(err)
	}
	return nil
}

// get reads the object whole; its bytes are verified by ReadArtifact,
// whatever its Content-Length said.
func (s *s3Store) get(ctx context.Context, digest string) ([]byte, error) {
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.loc.Bucket), Key: aws.String(s.key(digest))})
	if err != nil {
		if s3util.Classify(err) == s3util.NoObject {
			return nil, core.Errorf(core.NotFound, "missing from %s (%v)", s.loc, err)
		}
		return nil, s.coded(err)
	}
	defer out.Body.Close()
	body, err := io.ReadAll(out.Body)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", s.where(digest), &core.Error{Code: core.Unavailable, Message: err.Error()})
	}
	return body, nil
}
