package s3repo

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path"
	"strings"
)

// MarkerName is the completion marker of a version: the last object
// written under <model>/<version>/, a JSON Manifest of the version's
// files. A version without it is not visible (still uploading, or given
// up).
const MarkerName = ".kiln-complete"

// ManifestFormat is the value of Manifest.Format.
const ManifestFormat = "kiln.version/v1"

// Limits on a manifest, checked before anything is sized by it.
const (
	// MaxManifestBytes is the largest marker object read.
	MaxManifestBytes = 1 << 20
	// MaxManifestFiles is the most files a version may list.
	MaxManifestFiles = 10000
)

// ManifestFile is one file of a version.
type ManifestFile struct {
	// Path is the file's '/'-separated path in the version directory.
	Path string `json:"path"`
	// Size is its length in bytes.
	Size int64 `json:"size"`
	// SHA256 is the hex SHA-256 of its bytes (lower case).
	SHA256 string `json:"sha256"`
}

// Manifest is the completion marker's content.
type Manifest struct {
	// Format is ManifestFormat.
	Format string `json:"format"`
	// Files are the version's files (at least one).
	Files []ManifestFile `json:"files"`
}

// ParseManifest decodes and validates a completion marker: the format,
// 1 to MaxManifestFiles files, each a relative path without empty, ".",
// ".." or hidden segments (nor the marker itself), no duplicate, a size
// ≥ 0 and a 64-digit lower-case hex SHA-256.
func ParseManifest(b []byte) (Manifest, error) {
	if len(b) > MaxManifestBytes {
		return Manifest{}, fmt.Errorf("manifest: %d bytes, more than %d", len(b), MaxManifestBytes)
	}
	var m Manifest
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Manifest{}, fmt.Errorf("manifest: %w", err)
	}
	if dec.More() {
		return Manifest{}, fmt.Errorf("manifest: data after the JSON object")
	}
	if m.Format != ManifestFormat {
		return Manifest{}, fmt.Errorf("manifest: format %q, want %q", m.Format, ManifestFormat)
	}
	if len(m.Files) == 0 || len(m.Files) > MaxManifestFiles {
		return Manifest{}, fmt.Errorf("manifest: %d files, want 1 to %d", len(m.Files), MaxManifestFiles)
	}
	seen := make(map[string]bool, len(m.Files))
	for _, f := range m.Files {
		if err := validRelPath(f.Path); err != nil {
			return Manifest{}, fmt.Errorf("manifest: %w", err)
		}
		if seen[f.Path] {
			return Manifest{}, fmt.Errorf("manifest: file %q listed twice", f.Path)
		}
		seen[f.Path] = true
		if f.Size < 0 {
			return Manifest{}, fmt.Errorf("manifest: file %q: negative size %d", f.Path, f.Size)
		}
		if len(f.SHA256) != 64 || strings.ToLower(f.SHA256) != f.SHA256 {
			return Manifest{}, fmt.Errorf("manifest: file %q: sha256 %q: want 64 lower-case hex digits", f.Path, f.SHA256)
		}
		if _, err := hex.DecodeString(f.SHA256); err != nil {
			return Manifest{}, fmt.Errorf("manifest: file %q: sha256 %q: want 64 lower-case hex digits", f.Path, f.SHA256)
		}
	}
	return m, nil
}

// validRelPath checks a file path inside a version: relative, clean, no
// hidden segment, not the marker.
func validRelPath(p string) error {
	if p == "" || len(p) > 1024 || strings.ContainsAny(p, "\\\x00") || path.IsAbs(p) || path.Clean(p) != p {
		return fmt.Errorf("file path %q: want a clean relative path", p)
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "" || seg == "." || seg == ".." || strings.HasPrefix(seg, ".") {
			return fmt.Errorf("file path %q: empty, '.', '..' or hidden segment", p)
		}
	}
	return nil
}
