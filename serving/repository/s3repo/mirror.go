package s3repo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/kilnml/kiln/internal/atomicfile"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// MaxObjects bounds the objects one listing of a repository may return.
const MaxObjects = 1_000_000

// MirrorOptions configure NewMirror.
type MirrorOptions struct {
	// Logger receives the mirror's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Mirror keeps a local copy of an S3 model repository in a cache
// directory: <cache>/repo is the repository directory serving/repository
// opens, <cache>/blobs holds downloaded files by SHA-256, <cache>/tmp
// staging directories, <cache>/state.json the ETags of what is in place.
// Sync brings it up to date. A Mirror is safe for concurrent use; Syncs
// run one at a time.
type Mirror struct {
	client *s3.Client
	loc    Location
	dir    string
	log    *slog.Logger

	lock   *os.File   // <cache>/lock, flock'ed while the mirror is open
	syncMu sync.Mutex // one Sync at a time; guards st
	st     mirrorState

	mu       sync.RWMutex
	global   string                   // why the last listing failed, "" when it worked
	problems map[string]*modelProblem // by model
}

type modelProblem struct {
	wide     []string
	versions map[int64]string
}

// mirrorState is what Sync put in place, by ETag.
type mirrorState struct {
	// Files maps "<model>/<file>" to the ETag of the model file in place.
	Files map[string]string `json:"files"`
	// Versions maps "<model>/<version>" to the ETag of its marker.
	Versions map[string]string `json:"versions"`
}

// NewMirror returns a mirror of loc in the cache directory dir (created
// when missing; a previous mirror there is reused).
func NewMirror(client *s3.Client, loc Location, dir string, opts MirrorOptions) (*Mirror, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("s3 mirror: cache directory %s: %w", dir, err)
	}
	for _, d := range []string{"repo", "blobs", "tmp"} {
		if err := os.MkdirAll(filepath.Join(abs, d), 0o755); err != nil {
			return nil, fmt.Errorf("s3 mirror: cache directory: %w", err)
		}
	}
	lock, err := os.OpenFile(filepath.Join(abs, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("s3 mirror: cache directory: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("s3 mirror: cache directory %s is in use by another process (give each server its own cache directory): %w", abs, err)
	}
	m := &Mirror{client: client, loc: loc, dir: abs, lock: lock, log: log.With("repository", loc.String()), problems: map[string]*modelProblem{}}
	m.st = mirrorState{Files: map[string]string{}, Versions: map[string]string{}}
	if b, err := os.ReadFile(filepath.Join(abs, "state.json")); err == nil {
		var st mirrorState
		if json.Unmarshal(b, &st) == nil && st.Files != nil && st.Versions != nil {
			m.st = st
		} else {
			m.log.Warn("s3 mirror: unreadable state.json, downloading everything again", "dir", abs)
		}
	}
	// Leftovers of an interrupted Sync.
	if ents, err := os.ReadDir(filepath.Join(abs, "tmp")); err == nil {
		for _, e := range ents {
			os.RemoveAll(filepath.Join(abs, "tmp", e.Name()))
		}
	}
	return m, nil
}

// Close releases the cache directory (its lock); the files stay, for the
// next mirror of the same location to reuse.
func (m *Mirror) Close() error {
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	if m.lock == nil {
		return nil
	}
	err := m.lock.Close() // closing the file releases the flock
	m.lock = nil
	return err
}

// Dir returns the local repository directory the mirror keeps.
func (m *Mirror) Dir() string { return filepath.Join(m.dir, "repo") }

// Location returns the mirrored location.
func (m *Mirror) Location() Location { return m.loc }

// Problem returns what keeps model's newest state out of the mirror: a
// problem of the whole model or repository (the listing failed, a model
// file did not download) and, by version, why a version is not in place
// (no completion marker yet, a corrupt object, ...). It implements
// serving/repository's RemoteStatus.
func (m *Mirror) Problem(model string) (string, map[int64]string) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var wide []string
	if m.global != "" {
		wide = append(wide, m.global)
	}
	var versions map[int64]string
	if p := m.problems[model]; p != nil {
		wide = append(wide, p.wide...)
		if len(p.versions) > 0 {
			versions = make(map[int64]string, len(p.versions))
			for v, s := range p.versions {
				versions[v] = s
			}
		}
	}
	return strings.Join(wide, "; "), versions
}

type object struct {
	etag string
	size int64
}

type remoteVersion struct {
	marker *object
	files  map[string]object // by path in the version directory
}

type remoteModel struct {
	files    map[string]object // model files, by name
	versions map[int64]*remoteVersion
}

// Sync lists the repository and brings the mirror up to date: changed
// model files are replaced (by rename), complete versions that are new or
// whose marker changed are downloaded, checked against their manifest and
// renamed into place whole, versions and models gone from the bucket are
// removed. Only what a Sync put in place is ever removed (a version
// installed into the directory by other means stays). A failed listing
// changes nothing and is returned; failures of single models and versions
// are logged and reported by Problem, and Sync goes on with the others.
func (m *Mirror) Sync(ctx context.Context) error {
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	remote, err := m.list(ctx)
	if err != nil {
		err = fmt.Errorf("model repository %s: %w", m.loc, err)
		m.mu.Lock()
		m.global = err.Error()
		m.mu.Unlock()
		m.log.Error("s3 mirror: listing failed; the models in place keep serving", "err", err)
		return err
	}
	problems := map[string]*modelProblem{}
	changed := false
	for _, name := range slices.Sorted(maps.Keys(remote)) {
		p, ch := m.syncModel(ctx, name, remote[name])
		changed = changed || ch
		if len(p.wide) > 0 || len(p.versions) > 0 {
			problems[name] = p
		}
	}
	// Models gone from the bucket.
	for _, name := range m.mirroredModels() {
		if _, ok := remote[name]; !ok {
			m.removeModel(name)
			changed = true
		}
	}
	m.mu.Lock()
	m.global, m.problems = "", problems
	m.mu.Unlock()
	if changed {
		if err := m.saveState(); err != nil {
			m.log.Warn("s3 mirror: state not saved (the next start downloads again)", "err", err)
		}
		m.collectBlobs()
	}
	return nil
}

// list reads every object under the prefix, grouped by model.
func (m *Mirror) list(ctx context.Context) (map[string]*remoteModel, error) {
	out := map[string]*remoteModel{}
	prefix := m.loc.ListPrefix()
	p := s3.NewListObjectsV2Paginator(m.client, &s3.ListObjectsV2Input{Bucket: aws.String(m.loc.Bucket), Prefix: aws.String(prefix)})
	n := 0
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, Describe(err, m.loc.Bucket)
		}
		for _, o := range page.Contents {
			if n++; n > MaxObjects {
				return nil, fmt.Errorf("more than %d objects under the prefix", MaxObjects)
			}
			rel := strings.TrimPrefix(aws.ToString(o.Key), prefix)
			obj := object{etag: aws.ToString(o.ETag), size: aws.ToInt64(o.Size)}
			model, rest, ok := strings.Cut(rel, "/")
			if !ok || !validModelName.MatchString(model) || rest == "" {
				continue
			}
			rm := out[model]
			if rm == nil {
				rm = &remoteModel{files: map[string]object{}, versions: map[int64]*remoteVersion{}}
				out[model] = rm
			}
			vs, file, nested := strings.Cut(rest, "/")
			if !nested {
				if !strings.HasPrefix(rest, ".") {
					rm.files[rest] = obj
				}
				continue
			}
			v, err := strconv.ParseInt(vs, 10, 64)
			if err != nil || v < 1 || strconv.FormatInt(v, 10) != vs || file == "" {
				continue // not a version directory
			}
			rv := rm.versions[v]
			if rv == nil {
				rv = &remoteVersion{files: map[string]object{}}
				rm.versions[v] = rv
			}
			if file == MarkerName {
				o := obj
				rv.marker = &o
			} else {
				rv.files[file] = obj
			}
		}
	}
	return out, nil
}

// syncModel brings one model up to date; it reports its problems and
// whether anything changed.
func (m *Mirror) syncModel(ctx context.Context, name string, rm *remoteModel) (*modelProblem, bool) {
	p := &modelProblem{versions: map[int64]string{}}
	changed := false
	mdir := filepath.Join(m.Dir(), name)
	if err := os.MkdirAll(mdir, 0o755); err != nil {
		p.wide = append(p.wide, err.Error())
		return p, false
	}
	for _, f := range slices.Sorted(maps.Keys(rm.files)) {
		o := rm.files[f]
		key := name + "/" + f
		dst := filepath.Join(mdir, f)
		if m.st.Files[key] == o.etag && exists(dst) {
			continue
		}
		if err := m.download(ctx, m.loc.Key(key), o.size, "", dst); err != nil {
			p.wide = append(p.wide, fmt.Sprintf("model file %s: %v", f, err))
			m.log.Error("s3 mirror: model file not updated", "model", name, "file", f, "err", err)
			continue
		}
		m.st.Files[key] = o.etag
		changed = true
	}
	for key := range m.st.Files {
		if f, ok := strings.CutPrefix(key, name+"/"); ok {
			if _, there := rm.files[f]; !there {
				os.Remove(filepath.Join(mdir, f))
				delete(m.st.Files, key)
				changed = true
			}
		}
	}
	for _, v := range slices.Sorted(maps.Keys(rm.versions)) {
		rv := rm.versions[v]
		key := name + "/" + strconv.FormatInt(v, 10)
		vdir := filepath.Join(mdir, strconv.FormatInt(v, 10))
		if rv.marker == nil {
			if _, inPlace := m.st.Versions[key]; !inPlace {
				p.versions[v] = fmt.Sprintf("version %d is incomplete: no %s marker under %s/ yet (still uploading, or abandoned)", v, MarkerName, m.loc.Key(key))
			}
			continue
		}
		if m.st.Versions[key] == rv.marker.etag && exists(vdir) {
			continue
		}
		if err := m.fetchVersion(ctx, name, v, rv, vdir); err != nil {
			p.versions[v] = fmt.Sprintf("version %d: %v", v, err)
			m.log.Error("s3 mirror: version not updated; what serves keeps serving", "model", name, "version", v, "err", err)
			continue
		}
		m.st.Versions[key] = rv.marker.etag
		changed = true
		m.log.Info("s3 mirror: version in place", "model", name, "version", v)
	}
	// Versions gone (or no longer complete) in the bucket.
	for key := range m.st.Versions {
		vs, ok := strings.CutPrefix(key, name+"/")
		if !ok {
			continue
		}
		v, _ := strconv.ParseInt(vs, 10, 64)
		if rv := rm.versions[v]; rv == nil || rv.marker == nil {
			os.RemoveAll(filepath.Join(mdir, vs))
			delete(m.st.Versions, key)
			changed = true
		}
	}
	return p, changed
}

// fetchVersion downloads version v into a staging directory, checks it
// against its manifest, and renames it to vdir.
func (m *Mirror) fetchVersion(ctx context.Context, name string, v int64, rv *remoteVersion, vdir string) error {
	prefix := name + "/" + strconv.FormatInt(v, 10) + "/"
	if rv.marker.size > MaxManifestBytes {
		return fmt.Errorf("%s: %d bytes, more than %d", MarkerName, rv.marker.size, MaxManifestBytes)
	}
	raw, err := m.get(ctx, m.loc.Key(prefix+MarkerName), MaxManifestBytes)
	if err != nil {
		return fmt.Errorf("%s: %w", MarkerName, err)
	}
	man, err := ParseManifest(raw)
	if err != nil {
		return fmt.Errorf("%s%s: %w", m.loc.Key(prefix), MarkerName, err)
	}
	for _, f := range man.Files {
		o, ok := rv.files[f.Path]
		if !ok {
			return fmt.Errorf("file %s is listed in %s but missing from the bucket", f.Path, MarkerName)
		}
		if o.size != f.Size {
			return fmt.Errorf("file %s: the object has %d bytes, %s says %d", f.Path, o.size, MarkerName, f.Size)
		}
	}
	staging, err := os.MkdirTemp(filepath.Join(m.dir, "tmp"), "version-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(staging)
	for _, f := range man.Files {
		blob, err := m.blob(ctx, m.loc.Key(prefix+f.Path), f.Size, f.SHA256)
		if err != nil {
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
		dst := filepath.Join(staging, filepath.FromSlash(f.Path))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := linkOrCopy(blob, dst); err != nil {
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
	}
	if err := os.WriteFile(filepath.Join(staging, MarkerName), raw, 0o644); err != nil {
		return err
	}
	return replaceDir(staging, vdir, filepath.Join(m.dir, "tmp"))
}

// blob returns the cached file with digest sha, downloading key when the
// cache lacks it.
func (m *Mirror) blob(ctx context.Context, key string, size int64, sha string) (string, error) {
	path := filepath.Join(m.dir, "blobs", sha)
	if st, err := os.Stat(path); err == nil && st.Size() == size {
		return path, nil
	}
	if err := m.download(ctx, key, size, sha, path); err != nil {
		return "", err
	}
	return path, nil
}

// download writes object key to dst (through a temporary file and a
// rename), checking its size and, when sha is set, its SHA-256.
func (m *Mirror) download(ctx context.Context, key string, size int64, sha, dst string) error {
	return Download(ctx, m.client, m.loc.Bucket, key, size, sha, dst, filepath.Join(m.dir, "tmp"))
}

// get reads a small object whole (at most limit bytes).
func (m *Mirror) get(ctx context.Context, key string, limit int64) ([]byte, error) {
	return getSmall(ctx, m.client, m.loc.Bucket, key, limit)
}

// getSmall reads object bucket/key whole (at most limit bytes).
func getSmall(ctx context.Context, client *s3.Client, bucket, key string, limit int64) ([]byte, error) {
	out, err := client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		return nil, Describe(err, bucket)
	}
	defer out.Body.Close()
	b, err := io.ReadAll(io.LimitReader(out.Body, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("more than %d bytes", limit)
	}
	return b, nil
}

// Download writes object bucket/key to dst: into a temporary file in tmp
// (on dst's file system), its length checked against size (when ≥ 0) and
// its SHA-256 against sha (when not ""), then renamed to dst; a mismatch
// wraps ErrIntegrity. On any error dst is untouched.
func Download(ctx context.Context, client *s3.Client, bucket, key string, size int64, sha, dst, tmp string) error {
	out, err := client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		return Describe(err, bucket)
	}
	defer out.Body.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(tmp, "download-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	h := sha256.New()
	var r io.Reader = out.Body
	if size >= 0 {
		r = io.LimitReader(out.Body, size+1)
	}
	n, err := io.Copy(io.MultiWriter(f, h), r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("s3://%s/%s: reading: %w", bucket, key, err)
	}
	if size >= 0 && n != size {
		return fmt.Errorf("s3://%s/%s: %d bytes read, want %d (truncated or overwritten object): %w", bucket, key, n, size, ErrIntegrity)
	}
	if got := hex.EncodeToString(h.Sum(nil)); sha != "" && got != sha {
		return fmt.Errorf("s3://%s/%s: corrupt object: sha256 %s, the manifest says %s: %w", bucket, key, got, sha, ErrIntegrity)
	}
	return os.Rename(f.Name(), dst)
}

// replaceDir renames staging to dst; an existing dst is first moved aside
// into tmp and removed after.
func replaceDir(staging, dst, tmp string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	if exists(dst) {
		aside, err := os.MkdirTemp(tmp, "old-")
		if err != nil {
			return err
		}
		old := filepath.Join(aside, "v")
		if err := os.Rename(dst, old); err != nil {
			os.RemoveAll(aside)
			return err
		}
		defer os.RemoveAll(aside)
		if err := os.Rename(staging, dst); err != nil {
			os.Rename(old, dst) // put the previous one back
			return err
		}
		return nil
	}
	return os.Rename(staging, dst)
}

// linkOrCopy hard-links src to dst, or copies it when links are refused.
func linkOrCopy(src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// mirroredModels lists the models a Sync put something in place for.
func (m *Mirror) mirroredModels() []string {
	seen := map[string]bool{}
	for _, mp := range []map[string]string{m.st.Files, m.st.Versions} {
		for key := range mp {
			name, _, _ := strings.Cut(key, "/")
			seen[name] = true
		}
	}
	return slices.Sorted(maps.Keys(seen))
}

// removeModel removes what Sync put in place for model name (and its
// directory, when nothing else is left in it).
func (m *Mirror) removeModel(name string) {
	mdir := filepath.Join(m.Dir(), name)
	for key := range m.st.Files {
		if f, ok := strings.CutPrefix(key, name+"/"); ok {
			os.Remove(filepath.Join(mdir, f))
			delete(m.st.Files, key)
		}
	}
	for key := range m.st.Versions {
		if vs, ok := strings.CutPrefix(key, name+"/"); ok {
			os.RemoveAll(filepath.Join(mdir, vs))
			delete(m.st.Versions, key)
		}
	}
	os.Remove(mdir) // only when empty
	m.log.Info("s3 mirror: model removed (gone from the bucket)", "model", name)
}

func (m *Mirror) saveState() error {
	b, err := json.Marshal(m.st)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(m.dir, "state.json"), b, 0o644)
}

// collectBlobs removes cached blobs that no version in place lists.
func (m *Mirror) collectBlobs() {
	keep := map[string]bool{}
	for key := range m.st.Versions {
		raw, err := os.ReadFile(filepath.Join(m.Dir(), filepath.FromSlash(key), MarkerName))
		if err != nil {
			continue
		}
		if man, err := ParseManifest(raw); err == nil {
			for _, f := range man.Files {
				keep[f.SHA256] = true
			}
		}
	}
	ents, err := os.ReadDir(filepath.Join(m.dir, "blobs"))
	if err != nil {
		return
	}
	for _, e := range ents {
		if !keep[e.Name()] {
			os.Remove(filepath.Join(m.dir, "blobs", e.Name()))
		}
	}
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// validModelName is serving/repository's rule for a model's name (not
// imported: this package stays free of cgo, so its tests need no
// libtorch): letters, digits, '_', '.', '-', not starting with '.' or
// '-'.
var validModelName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.\-]*$`)
