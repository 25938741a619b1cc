package modelpkg_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnml/kiln/core/modelpkg"
)

// FuzzDecode feeds manifest.json bytes to Decode, seeded with the
// manifests core/train and core/optimize wrote (testdata) and variants of
// them. Decode must not panic; what it accepts must validate, encode, and
// decode again to a manifest that encodes the same (the layout is stable).
func FuzzDecode(f *testing.F) {
	for _, dir := range []string{legacyFloat, legacyInt8} {
		b, err := os.ReadFile(filepath.Join(dir, modelpkg.ManifestFile))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		f.Add(bytes.Replace(b, []byte(`"kiln-model/1"`), []byte(`"kiln-model/2"`), 1))
		f.Add(bytes.Replace(b, []byte(`"labels": [`), []byte(`"python_labels": [0, 1], "labels": [`), 1))
		f.Add(b[:len(b)/2])
	}
	f.Add([]byte(`{"format": "kiln-model/1", "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}],
		"outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}], "optimization": {"engine": "qnnpack"}}`))
	f.Add([]byte(`{"format": "kiln-model/1", "optimization": 1}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := modelpkg.Decode(b)
		if err != nil {
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("Decode accepted a manifest that does not validate: %v", err)
		}
		if _, err := m.QuantizedEngine(); err != nil {
			t.Fatalf("Decode accepted a manifest whose engine does not read: %v", err)
		}
		enc, err := modelpkg.Encode(m)
		if err != nil {
			return // e.g. a float outside JSON's range in a section Go re-encodes
		}
		m2, err := modelpkg.Decode(enc)
		if err != nil {
			t.Fatalf("Decode(Encode(m)): %v\n%s", err, enc)
		}
		enc2, err := modelpkg.Encode(m2)
		if err != nil {
			t.Fatalf("Encode(Decode(Encode(m))): %v", err)
		}
		if !bytes.Equal(enc, enc2) {
			t.Fatalf("the encoding is not stable:\n%s\n%s", enc, enc2)
		}
	})
}
