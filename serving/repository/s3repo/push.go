package s3repo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// PushOptions configure Push.
type PushOptions struct {
	// Versions, when not empty, are the only versions uploaded; empty
	// uploads every version directory.
	Versions []int64
	// Progress, when set, is called with a line per uploaded object.
	Progress func(line string)
}

// PushResult says what Push uploaded.
type PushResult struct {
	// Versions are the versions uploaded, ascending.
	Versions []int64
	// Objects and Bytes count the objects and bytes uploaded.
	Objects int
	Bytes   int64
}

// Push uploads the local model directory dir (<dir>/config.*, labels and
// other model files, <dir>/<version>/...) to loc, the model's location
// (s3://bucket/prefix/<model>), so that a Mirror sees each version appear
// whole: for each version, any previous marker is deleted first, then
// the files are uploaded, then the marker (a Manifest of their sizes and
// SHA-256) last; the model files are uploaded after the versions. Hidden
// files (".*") are skipped. A failure leaves the version without a marker
// (invisible) and is returned.
func Push(ctx context.Context, client *s3.Client, dir string, loc Location, opts PushOptions) (PushResult, error) {
	var res PushResult
	ents, err := os.ReadDir(dir)
	if err != nil {
		return res, fmt.Errorf("push %s: %w", dir, err)
	}
	var versions []int64
	var files []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if e.IsDir() {
			v, err := strconv.ParseInt(e.Name(), 10, 64)
			if err == nil && v >= 1 && strconv.FormatInt(v, 10) == e.Name() {
				if len(opts.Versions) == 0 || slices.Contains(opts.Versions, v) {
					versions = append(versions, v)
				}
			}
			continue
		}
		if e.Type().IsRegular() || e.Type()&fs.ModeSymlink != 0 {
			files = append(files, e.Name())
		}
	}
	slices.Sort(versions)
	for _, v := range opts.Versions {
		if !slices.Contains(versions, v) {
			return res, fmt.Errorf("push %s: no version directory %d", dir, v)
		}
	}
	if len(versions) == 0 && len(files) == 0 {
		return res, fmt.Errorf("push %s: no model files and no version directories", dir)
	}
	up := uploader{client: client, bucket: loc.Bucket, res: &res, progress: opts.Progress}
	for _, v := range versions {
		vs := strconv.FormatInt(v, 10)
		if err := up.version(ctx, filepath.Join(dir, vs), loc.Child(vs)); err != nil {
			return res, fmt.Errorf("push %s version %d: %w", dir, v, err)
		}
		res.Versions = append(res.Versions, v)
	}
	for _, f := range files {
		if _, _, err := up.file(ctx, filepath.Join(dir, f), loc.Key(f)); err != nil {
			return res, fmt.Errorf("push %s: %w", dir, err)
		}
	}
	return res, nil
}

// PushVersion uploads the version directory dir to loc
// (s3://bucket/prefix/<model>/<version>): files first, marker last.
func PushVersion(ctx context.Context, client *s3.Client, dir string, loc Location, opts PushOptions) (PushResult, error) {
	var res PushResult
	up := uploader{client: client, bucket: loc.Bucket, res: &res, progress: opts.Progress}
	if err := up.version(ctx, dir, loc); err != nil {
		return res, fmt.Errorf("push %s: %w", dir, err)
	}
	return res, nil
}

type uploader struct {
	client   *s3.Client
	bucket   string
	res      *PushResult
	progress func(string)
}

func (u *uploader) version(ctx context.Context, dir string, loc Location) error {
	var rels []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir && strings.HasPrefix(d.Name(), ".") {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() {
			return nil
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		rels = append(rels, filepath.ToSlash(rel))
		return nil
	})
	if err != nil {
		return err
	}
	if len(rels) == 0 {
		return fmt.Errorf("no files in %s", dir)
	}
	// The version turns invisible while it is rewritten.
	if _, err := u.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(u.bucket), Key: aws.String(loc.Key(MarkerName))}); err != nil {
		return Describe(err, u.bucket)
	}
	man := Manifest{Format: ManifestFormat}
	for _, rel := range rels {
		size, sum, err := u.file(ctx, filepath.Join(dir, filepath.FromSlash(rel)), loc.Key(rel))
		if err != nil {
			return err
		}
		man.Files = append(man.Files, ManifestFile{Path: rel, Size: size, SHA256: sum})
	}
	raw, err := json.MarshalIndent(man, "", "  ")
	if err != nil {
		return err
	}
	if _, err := ParseManifest(raw); err != nil {
		return err // a file name the manifest cannot hold
	}
	if _, err := u.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(u.bucket), Key: aws.String(loc.Key(MarkerName)),
		Body: strings.NewReader(string(raw)), ContentLength: aws.Int64(int64(len(raw))), ContentType: aws.String("application/json")}); err != nil {
		return fmt.Errorf("%s: %w", MarkerName, Describe(err, u.bucket))
	}
	u.res.Objects++
	u.res.Bytes += int64(len(raw))
	if u.progress != nil {
		u.progress(fmt.Sprintf("s3://%s/%s (marker: %d files)", u.bucket, loc.Key(MarkerName), len(man.Files)))
	}
	return nil
}

// file uploads one file and returns its size and SHA-256.
func (u *uploader) file(ctx context.Context, path, key string) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	h := sha256.New()
	size, err := io.Copy(h, f)
	if err != nil {
		return 0, "", fmt.Errorf("%s: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return 0, "", err
	}
	if _, err := u.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(u.bucket), Key: aws.String(key),
		Body: f, ContentLength: aws.Int64(size)}); err != nil {
		return 0, "", fmt.Errorf("%s: %w", path, Describe(err, u.bucket))
	}
	u.res.Objects++
	u.res.Bytes += size
	if u.progress != nil {
		u.progress(fmt.Sprintf("s3://%s/%s (%d bytes)", u.bucket, key, size))
	}
	return size, hex.EncodeToString(h.Sum(nil)), nil
}
