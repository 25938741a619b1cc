package s3repo

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// Errors Fetch wraps, for callers that map them to exit codes.
var (
	// ErrNotFound: nothing exists at the source.
	ErrNotFound = errors.New("not found")
	// ErrIntegrity: an object's size or SHA-256 differs from what its
	// listing or version manifest says.
	ErrIntegrity = errors.New("integrity check failed")
)

// FetchResult says what Fetch wrote.
type FetchResult struct {
	// Files and Bytes count the files written.
	Files int
	Bytes int64
	// Verified counts the files checked against a version manifest.
	Verified int
	// Skipped lists the version directories left out because they have
	// no completion marker (still uploading).
	Skipped []string
}

// Fetch downloads loc into the local directory dst (created when
// missing), as a KServe storage initializer does: every object under the
// prefix, at its relative path; or, when the prefix names one object, that
// object into dst. Each version directory with a completion marker has its
// files checked against the manifest (size and SHA-256); when the tree has
// markers, numbered version directories without one are skipped (they are
// incomplete). Files are written to temporary names in dst and renamed,
// so dst never holds a partial file. Errors wrap ErrNotFound or
// ErrIntegrity where they apply.
func Fetch(ctx context.Context, client *s3.Client, loc Location, dst string, progress func(string)) (FetchResult, error) {
	var res FetchResult
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return res, err
	}
	tmp, err := os.MkdirTemp(dst, ".kiln-fetch-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(tmp)
	objs := map[string]object{}
	prefix := loc.ListPrefix()
	p := s3.NewListObjectsV2Paginator(client, &s3.ListObjectsV2Input{Bucket: aws.String(loc.Bucket), Prefix: aws.String(prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return res, fmt.Errorf("%s: %w", loc, Describe(err, loc.Bucket))
		}
		for _, o := range page.Contents {
			rel := strings.TrimPrefix(aws.ToString(o.Key), prefix)
			if rel == "" || strings.HasSuffix(rel, "/") {
				continue // a "directory" placeholder
			}
			if isMarker := path.Base(rel) == MarkerName && (path.Dir(rel) == "." || validRelPath(path.Dir(rel)) == nil); !isMarker && validRelPath(rel) != nil {
				if progress != nil { // hidden, or not a path to write below dst
					progress(fmt.Sprintf("skipped %s (not a plain relative path)", loc.Child(rel)))
				}
				continue
			}
			if len(objs) >= MaxObjects {
				return res, fmt.Errorf("%s: more than %d objects", loc, MaxObjects)
			}
			objs[rel] = object{etag: aws.ToString(o.ETag), size: aws.ToInt64(o.Size)}
		}
	}
	if len(objs) == 0 {
		if loc.Prefix == "" {
			return res, fmt.Errorf("%s: the bucket is empty: %w", loc, ErrNotFound)
		}
		head, err := client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(loc.Bucket), Key: aws.String(loc.Prefix)})
		if err != nil {
			err = Describe(err, loc.Bucket)
			var nf interface{ ErrorCode() string }
			if errors.As(err, &nf) && (nf.ErrorCode() == "NotFound" || nf.ErrorCode() == "NoSuchKey") {
				return res, fmt.Errorf("%s: no such object or prefix: %w", loc, ErrNotFound)
			}
			return res, fmt.Errorf("%s: %w", loc, err)
		}
		name := path.Base(loc.Prefix)
		size := aws.ToInt64(head.ContentLength)
		if err := Download(ctx, client, loc.Bucket, loc.Prefix, size, "", filepath.Join(tmp, name), tmp); err != nil {
			return res, err
		}
		if err := os.Rename(filepath.Join(tmp, name), filepath.Join(dst, name)); err != nil {
			return res, err
		}
		res.Files, res.Bytes = 1, size
		if progress != nil {
			progress(fmt.Sprintf("%s -> %s (%d bytes)", loc, filepath.Join(dst, name), size))
		}
		return res, nil
	}
	// Version directories: those with a marker are verified; with any
	// marker present, numbered directories without one are incomplete.
	manifests := map[string]map[string]ManifestFile{} // version dir -> file -> entry
	for rel := range objs {
		if path.Base(rel) != MarkerName {
			continue
		}
		dir := path.Dir(rel)
		raw, err := getSmall(ctx, client, loc.Bucket, loc.Key(rel), MaxManifestBytes)
		if err != nil {
			return res, fmt.Errorf("%s: %w", loc.Child(rel), err)
		}
		man, err := ParseManifest(raw)
		if err != nil {
			return res, fmt.Errorf("%s: %w: %w", loc.Child(rel), ErrIntegrity, err)
		}
		files := map[string]ManifestFile{}
		for _, f := range man.Files {
			full := f.Path
			if dir != "." {
				full = dir + "/" + f.Path
			}
			o, ok := objs[full]
			if !ok {
				return res, fmt.Errorf("%s: %s lists %s, which is missing: %w", loc, rel, f.Path, ErrIntegrity)
			}
			if o.size != f.Size {
				return res, fmt.Errorf("%s: %s: the object has %d bytes, %s says %d: %w", loc, full, o.size, MarkerName, f.Size, ErrIntegrity)
			}
			files[full] = f
		}
		manifests[dir] = files
	}
	// versionDir returns the nearest directory above rel that has a
	// manifest.
	versionDir := func(rel string) (string, bool) {
		for dir := path.Dir(rel); ; dir = path.Dir(dir) {
			if _, ok := manifests[dir]; ok {
				return dir, true
			}
			if dir == "." || dir == "/" {
				return "", false
			}
		}
	}
	incomplete := func(rel string) (string, bool) {
		if len(manifests) == 0 {
			return "", false
		}
		segs := strings.Split(rel, "/")
		for i := range len(segs) - 1 {
			v, err := strconv.ParseInt(segs[i], 10, 64)
			if err != nil || v < 1 || strconv.FormatInt(v, 10) != segs[i] {
				continue
			}
			dir := strings.Join(segs[:i+1], "/")
			if _, ok := manifests[dir]; !ok {
				return dir, true
			}
		}
		return "", false
	}
	for _, rel := range slices.Sorted(maps.Keys(objs)) {
		if dir, skip := incomplete(rel); skip {
			if !slices.Contains(res.Skipped, dir) {
				res.Skipped = append(res.Skipped, dir)
				if progress != nil {
					progress(fmt.Sprintf("skipped %s/ (no %s: incomplete version)", loc.Child(dir), MarkerName))
				}
			}
			continue
		}
		o := objs[rel]
		sha := ""
		if dir, ok := versionDir(rel); ok && path.Base(rel) != MarkerName {
			f, listed := manifests[dir][rel]
			if !listed {
				continue // not part of the version
			}
			sha = f.SHA256
		}
		stage := filepath.Join(tmp, filepath.FromSlash(rel))
		if err := Download(ctx, client, loc.Bucket, loc.Key(rel), o.size, sha, stage, tmp); err != nil {
			return res, err
		}
		res.Files++
		res.Bytes += o.size
		if sha != "" {
			res.Verified++
		}
		if progress != nil {
			progress(fmt.Sprintf("%s (%d bytes%s)", loc.Child(rel), o.size, map[bool]string{true: ", sha256 verified"}[sha != ""]))
		}
	}
	// Everything arrived: move it into dst.
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return res, err
	}
	for _, e := range ents {
		target := filepath.Join(dst, e.Name())
		if err := os.RemoveAll(target); err != nil {
			return res, err
		}
		if err := os.Rename(filepath.Join(tmp, e.Name()), target); err != nil {
			return res, err
		}
	}
	return res, nil
}
