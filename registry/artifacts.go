package registry

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
)

// An artifact is a model package as a tar archive holding manifest.json
// and model.pt (in this order, mode 0644, no times or owners: the same
// package gives the same bytes). Its digest is the archive's SHA-256.
//
// Stored encrypted, the file is: "KILNENC1", the key's ID (8 bytes), a
// 12-byte nonce, then AES-256-GCM's sealed archive, with the first 16 bytes
// as additional data.
const (
	encMagic  = "KILNENC1"
	encHeader = len(encMagic) + 8 + 12
)

// packFiles are a package's files in archive order.
var packFiles = []string{modelpkg.ManifestFile, modelpkg.ModelFile}

// pack reads the package in dir (its manifest validated by modelpkg.Read)
// and returns its archive and manifest.
func pack(dir string) ([]byte, modelpkg.Manifest, error) {
	man, err := modelpkg.Read(dir)
	if err != nil {
		return nil, modelpkg.Manifest{}, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, name := range packFiles {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, modelpkg.Manifest{}, fmt.Errorf("registry: package %s: %w", dir, err)
		}
		hdr := &tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, modelpkg.Manifest{}, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, modelpkg.Manifest{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, modelpkg.Manifest{}, err
	}
	return buf.Bytes(), man, nil
}

// unpack decodes an archive into its files: exactly manifest.json and
// model.pt, regular files, each once. It is the decoder of stored
// artifacts (FuzzUnpack).
func unpack(archive []byte) (map[string][]byte, error) {
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, core.Errorf(core.InvalidArgument, "registry: artifact archive: %v", err)
		}
		if hdr.Typeflag != tar.TypeReg || (hdr.Name != modelpkg.ManifestFile && hdr.Name != modelpkg.ModelFile) {
			return nil, core.Errorf(core.InvalidArgument, "registry: artifact archive holds %q (type %c); a model package holds only %s and %s", hdr.Name, hdr.Typeflag, modelpkg.ManifestFile, modelpkg.ModelFile)
		}
		if _, dup := files[hdr.Name]; dup {
			return nil, core.Errorf(core.InvalidArgument, "registry: artifact archive holds %s twice", hdr.Name)
		}
		if hdr.Size < 0 || hdr.Size > int64(len(archive)) {
			return nil, core.Errorf(core.InvalidArgument, "registry: artifact archive: %s claims %d bytes in a %d-byte archive", hdr.Name, hdr.Size, len(archive))
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			return nil, core.Errorf(core.InvalidArgument, "registry: artifact archive: %s: %v", hdr.Name, err)
		}
		files[hdr.Name] = b
	}
	for _, name := range packFiles {
		if _, ok := files[name]; !ok {
			return nil, core.Errorf(core.InvalidArgument, "registry: artifact archive lacks %s", name)
		}
	}
	return files, nil
}

var hexDigest = regexp.MustCompile(`^[0-9a-f]{64}$`)

// sealOverhead is what sealing adds to an archive: the header and GCM's tag.
const sealOverhead = encHeader + 16

// storeBlob stores archive under its digest unless the store holds it
// already (content-addressed: the same bytes are stored once), sealed with
// the registry's key when it has one. It returns the digest. A blob
// counts as stored when it exists with the archive's size or the sealed
// size (one written with or without a key); an object of another size (a
// truncated upload) is replaced.
func (r *Registry) storeBlob(ctx context.Context, archive []byte) (string, error) {
	sum := sha256.Sum256(archive)
	digest := hex.EncodeToString(sum[:])
	plain := int64(len(archive))
	stored := func(size int64) bool { return size == plain || size == plain+int64(sealOverhead) }
	has, err := r.store.has(ctx, digest, stored)
	if err != nil {
		return "", fmt.Errorf("registry: artifact store %s: sha256:%s: %w", r.store, digest, err)
	}
	if has {
		return digest, nil
	}
	body := archive
	if r.key != nil {
		if body, err = seal(r.key, archive); err != nil {
			return "", err
		}
	}
	if err := r.store.put(ctx, digest, body); err != nil {
		return "", fmt.Errorf("registry: artifact store %s: sha256:%s: %w", r.store, digest, err)
	}
	r.log.Debug("registry: artifact stored", "digest", "sha256:"+digest, "bytes", len(archive), "encrypted", r.key != nil, "store", r.store.String())
	return digest, nil
}

// ReadArtifact returns the archive stored under digest (64 hex digits),
// decrypted when it is sealed and verified: content whose SHA-256 is not
// digest (a changed, corrupt or truncated file or object) is refused with
// ErrDigestMismatch naming both digests; a missing one is NotFound.
func (r *Registry) ReadArtifact(ctx context.Context, digest string) ([]byte, error) {
	if !hexDigest.MatchString(digest) {
		return nil, core.Errorf(core.InvalidArgument, "registry: artifact digest %q: want 64 lower-case hex digits", digest)
	}
	body, err := r.store.get(ctx, digest)
	if err != nil {
		return nil, fmt.Errorf("registry: artifact sha256:%s: %w", digest, err)
	}
	archive, err := open(r.key, body)
	if err != nil {
		return nil, fmt.Errorf("registry: artifact sha256:%s (%s): %w", digest, r.store.where(digest), err)
	}
	sum := sha256.Sum256(archive)
	if got := hex.EncodeToString(sum[:]); got != digest {
		return nil, fmt.Errorf("%w: artifact sha256:%s has content with sha256:%s (%s was changed or is corrupt); refusing to load it",
			ErrDigestMismatch, digest, got, r.store.where(digest))
	}
	return archive, nil
}

// seal encrypts archive with key (see encMagic).
func seal(key *Key, archive []byte) ([]byte, error) {
	aead, err := newAEAD(key)
	if err != nil {
		return nil, err
	}
	id, _ := hex.DecodeString(key.ID())
	out := make([]byte, encHeader, encHeader+len(archive)+aead.Overhead())
	copy(out, encMagic)
	copy(out[len(encMagic):], id)
	if _, err := rand.Read(out[len(encMagic)+8 : encHeader]); err != nil {
		return nil, err
	}
	return aead.Seal(out, out[len(encMagic)+8:encHeader], archive, out[:len(encMagic)+8]), nil
}

// open returns the archive in a stored file: the file itself when it is
// not sealed, else decrypted with key (ErrNoKey without one, ErrWrongKey
// when it was sealed with another). It is a decoder of stored files
// (FuzzOpen).
func open(key *Key, body []byte) ([]byte, error) {
	if !bytes.HasPrefix(body, []byte(encMagic)) {
		return body, nil
	}
	if len(body) < encHeader+16 {
		return nil, fmt.Errorf("%w: encrypted artifact of %d bytes is shorter than its header and tag (%d): truncated or corrupt", ErrDigestMismatch, len(body), sealOverhead)
	}
	id := hex.EncodeToString(body[len(encMagic) : len(encMagic)+8])
	if key == nil {
		return nil, fmt.Errorf("%w (it was encrypted with key %s): set KILN_REGISTRY_KEY or KILN_REGISTRY_KEY_FILE", ErrNoKey, id)
	}
	if id != key.ID() {
		return nil, fmt.Errorf("%w: it was encrypted with key %s, the registry's key is %s", ErrWrongKey, id, key.ID())
	}
	aead, err := newAEAD(key)
	if err != nil {
		return nil, err
	}
	archive, err := aead.Open(nil, body[len(encMagic)+8:encHeader], body[encHeader:], body[:len(encMagic)+8])
	if err != nil {
		return nil, fmt.Errorf("%w: encrypted content fails authentication (changed or corrupt)", ErrDigestMismatch)
	}
	return archive, nil
}

func newAEAD(key *Key) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key.b[:])
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// writePackage writes a verified archive's files into dir, which must not
// exist: into a temporary directory beside it, synced, then renamed, so
// dir appears complete or not at all.
func writePackage(archive []byte, dir string) error {
	files, err := unpack(archive)
	if err != nil {
		return err
	}
	if _, err := os.Lstat(dir); err == nil {
		return core.Errorf(core.AlreadyExists, "registry: %s exists; fetch into a new directory", dir)
	}
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	tmp, err := os.MkdirTemp(parent, ".tmp-"+filepath.Base(dir)+"-")
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	err = func() error {
		for _, name := range packFiles {
			f, err := os.OpenFile(filepath.Join(tmp, name), os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o644)
			if err != nil {
				return err
			}
			_, err = f.Write(files[name])
			if err == nil {
				err = f.Sync()
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		}
		if err := os.Chmod(tmp, 0o755); err != nil {
			return err
		}
		return os.Rename(tmp, dir)
	}()
	if err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("registry: writing %s: %w", dir, err)
	}
	return nil
}
