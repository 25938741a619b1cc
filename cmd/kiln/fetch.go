package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/repository/s3repo"
)

// Exit statuses of kiln fetch (and any command whose error carries one).
const (
	exitUsage     = 2 // a malformed source or destination
	exitNotFound  = 3 // nothing at the source
	exitIntegrity = 4 // a size or digest mismatch
	exitAccess    = 5 // refused credentials or an unreachable endpoint
)

// exitError is an error with the process exit status main uses.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// exitCode returns err's exit status: an exitError's, else 1.
func exitCode(err error) int {
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return 1
}

func newFetchCmd() *cobra.Command {
	var rf registryFlags
	cmd := &cobra.Command{
		Use:   "fetch SRC DST",
		Short: "Download a model (s3://, models:/, a local path) into a directory; usable as a KServe storage initializer",
		Long: `Writes SRC into the directory DST (created when missing), verified:

  s3://bucket/prefix      every object under the prefix, at its relative path
                          (or the one object the prefix names, into DST); a
                          version directory with a .kiln-complete manifest has
                          each file's size and SHA-256 checked, and numbered
                          version directories without one are skipped (still
                          uploading). Endpoint, region and credentials come
                          from the AWS environment (AWS_ENDPOINT_URL_S3,
                          AWS_REGION, AWS_ACCESS_KEY_ID, ..., KILN_S3_PATH_STYLE).
  models:/NAME/VERSION    a registry version's package (its artifact's SHA-256
  models:/NAME@ALIAS      verified), from --registry / $KILN_REGISTRY, its
                          artifacts in --registry-artifacts /
                          $KILN_REGISTRY_ARTIFACTS (a directory or s3://).
  PATH or file://PATH     a local file or directory, copied.

Files are written to temporary names and renamed, so DST never holds a
partial file. KServe runs it as "kiln fetch <storageUri> /mnt/models".

Exit status: 0 done; 1 other errors; 2 a malformed SRC or DST; 3 nothing at
SRC; 4 a size or digest mismatch; 5 credentials refused or the endpoint
unreachable.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runFetch(cmd.Context(), cmd.OutOrStdout(), args[0], args[1], rf)
		},
	}
	rf.addTo(cmd.Flags())
	return cmd
}

func runFetch(ctx context.Context, w io.Writer, src, dst string, rf registryFlags) error {
	if dst == "" {
		return &exitError{exitUsage, errors.New("fetch: empty destination")}
	}
	if st, err := os.Stat(dst); err == nil && !st.IsDir() {
		return &exitError{exitUsage, fmt.Errorf("fetch: destination %s exists and is not a directory", dst)}
	}
	progress := func(line string) { fmt.Fprintln(w, line) }
	switch {
	case s3repo.IsURL(src):
		loc, err := s3repo.ParseURL(src)
		if err != nil {
			return &exitError{exitUsage, fmt.Errorf("fetch: %w", err)}
		}
		vars, err := kilnenv.Load(os.Getenv)
		if err != nil {
			return &exitError{exitUsage, fmt.Errorf("fetch: %w", err)}
		}
		client, err := s3repo.NewClient(ctx, s3repo.ClientOptions{PathStyle: vars.S3PathStyle})
		if err != nil {
			return fmt.Errorf("fetch: %w", err)
		}
		res, err := s3repo.Fetch(ctx, client, loc, dst, progress)
		if err != nil {
			return &exitError{fetchExit(err), fmt.Errorf("fetch: %w", err)}
		}
		fmt.Fprintf(w, "fetched %s -> %s: %d files, %d bytes, %d verified against a manifest\n", loc, dst, res.Files, res.Bytes, res.Verified)
		return nil
	case strings.HasPrefix(src, "models:/"):
		return fetchRegistry(ctx, w, src, dst, rf)
	case strings.Contains(src, "://") && !strings.HasPrefix(src, "file://"):
		return &exitError{exitUsage, fmt.Errorf("fetch: %q: unsupported source (want s3://, models:/, file:// or a path)", src)}
	}
	path := strings.TrimPrefix(src, "file://")
	n, size, err := copyTree(path, dst)
	if err != nil {
		code := 1
		if errors.Is(err, fs.ErrNotExist) {
			code = exitNotFound
		}
		return &exitError{code, fmt.Errorf("fetch: %w", err)}
	}
	fmt.Fprintf(w, "fetched %s -> %s: %d files, %d bytes\n", path, dst, n, size)
	return nil
}

// fetchExit maps a fetch error to its exit status.
func fetchExit(err error) int {
	switch {
	case errors.Is(err, s3repo.ErrNotFound), core.CodeOf(err) == core.NotFound:
		return exitNotFound
	case errors.Is(err, s3repo.ErrIntegrity), errors.Is(err, registry.ErrDigestMismatch):
		return exitIntegrity
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "does not exist"):
		return exitNotFound
	case strings.Contains(msg, "refused (") || strings.Contains(msg, "unreachable"):
		return exitAccess
	}
	return 1
}

// fetchRegistry writes a registry version's package into dst: fetched into
// a new directory inside dst, then its files moved up.
func fetchRegistry(ctx context.Context, w io.Writer, src, dst string, rf registryFlags) error {
	r, err := rf.open(ctx)
	if err != nil {
		// A missing bucket, refused credentials, an unreachable artifact
		// store or database have their exit status too.
		return &exitError{fetchExit(err), fmt.Errorf("fetch: %w", err)}
	}
	defer r.Close()
	v, err := r.Resolve(ctx, src)
	if err != nil {
		return &exitError{fetchExit(err), fmt.Errorf("fetch: %w", err)}
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("fetch: %w", err)
	}
	tmp, err := os.MkdirTemp(dst, ".kiln-fetch-")
	if err != nil {
		return fmt.Errorf("fetch: %w", err)
	}
	defer os.RemoveAll(tmp)
	pkg := filepath.Join(tmp, "pkg")
	if v, err = r.Fetch(ctx, v.Ref(), pkg); err != nil {
		return &exitError{fetchExit(err), fmt.Errorf("fetch: %w", err)}
	}
	ents, err := os.ReadDir(pkg)
	if err != nil {
		return fmt.Errorf("fetch: %w", err)
	}
	for _, e := range ents {
		target := filepath.Join(dst, e.Name())
		if err := os.RemoveAll(target); err != nil {
			return fmt.Errorf("fetch: %w", err)
		}
		if err := os.Rename(filepath.Join(pkg, e.Name()), target); err != nil {
			return fmt.Errorf("fetch: %w", err)
		}
	}
	fmt.Fprintf(w, "fetched %s (sha256:%s) -> %s\n", v.Ref(), v.Digest, dst)
	return nil
}

// copyTree copies the file or directory src into dst (a file lands as
// dst/<name>), each file through a temporary name; it returns the files
// and bytes copied.
func copyTree(src, dst string) (int, int64, error) {
	st, err := os.Stat(src)
	if err != nil {
		return 0, 0, err
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return 0, 0, err
	}
	if !st.IsDir() {
		n, err := copyFile(src, filepath.Join(dst, filepath.Base(src)))
		return 1, n, err
	}
	files, total := 0, int64(0)
	err = filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		n, err := copyFile(p, target)
		files++
		total += n
		return err
	})
	return files, total, err
}

func copyFile(src, dst string) (int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	out, err := os.CreateTemp(filepath.Dir(dst), ".kiln-fetch-")
	if err != nil {
		return 0, err
	}
	defer os.Remove(out.Name())
	n, err := io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return n, err
	}
	return n, os.Rename(out.Name(), dst)
}
