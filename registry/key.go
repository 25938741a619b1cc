package registry

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"

	"github.com/kilnml/kiln/core"
)

// KeySize is the size of a registry key: AES-256.
const KeySize = 32

// Key is the registry's artifact encryption key (AES-256-GCM). It prints,
// logs and marshals as its ID only, never its bytes.
type Key struct {
	b [KeySize]byte
}

// ParseKey reads a key: exactly 32 raw bytes, or 64 hex digits, or the
// base64 (standard or URL alphabet, padded or not) of 32 bytes; spaces and
// newlines around the text are ignored. The error never holds the key.
func ParseKey(text []byte) (*Key, error) {
	k := &Key{}
	if len(text) == KeySize {
		copy(k.b[:], text)
		return k, nil
	}
	t := bytes.TrimSpace(text)
	if len(t) == 2*KeySize {
		if _, err := hex.Decode(k.b[:], t); err == nil {
			return k, nil
		}
	}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(string(t)); err == nil && len(b) == KeySize {
			copy(k.b[:], b)
			return k, nil
		}
	}
	return nil, core.Errorf(core.InvalidArgument, "registry key: want 32 bytes (raw, 64 hex digits or base64), got %d bytes of text that is none of these", len(text))
}

// LoadKey returns the key given as text (an environment variable's value,
// e.g. KILN_REGISTRY_KEY) or in a file (KILN_REGISTRY_KEY_FILE), or nil
// when both are empty. Both set is an error: say which one to use.
func LoadKey(text, file string) (*Key, error) {
	switch {
	case text != "" && file != "":
		return nil, core.Errorf(core.InvalidArgument, "registry key: both a key and a key file are set; use one")
	case text != "":
		return ParseKey([]byte(text))
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("registry key file: %w", err)
		}
		k, err := ParseKey(b)
		if err != nil {
			return nil, fmt.Errorf("%w (in %s)", err, file)
		}
		return k, nil
	}
	return nil, nil
}

// ID is a short public fingerprint of the key (16 hex digits of a SHA-256
// over a label and the key), recorded with each encrypted artifact so
// that a wrong key is told apart from a tampered file.
func (k *Key) ID() string {
	h := sha256.Sum256(append([]byte("kiln registry key id\x00"), k.b[:]...))
	return hex.EncodeToString(h[:8])
}

// String is "key <ID>".
func (k *Key) String() string { return "key " + k.ID() }

// GoString is String, so %#v does not print the bytes either.
func (k *Key) GoString() string { return k.String() }

// LogValue logs the ID only.
func (k *Key) LogValue() slog.Value { return slog.StringValue(k.String()) }

// MarshalText marshals the ID only.
func (k *Key) MarshalText() ([]byte, error) { return []byte(k.String()), nil }
