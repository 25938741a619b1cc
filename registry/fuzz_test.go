package registry

import (
	"archive/tar"
	"bytes"
	"encoding/hex"
	"strings"
	"testing"
)

// FuzzUnpack: any stored artifact archive decodes to the two files of a
// package or to an error, never a panic or a file outside them.
func FuzzUnpack(f *testing.F) {
	// Small seeds: the fuzzer mutates a few hundred bytes far faster than
	// a real package's archive (a 10 KiB seed ran at ~1 exec/s).
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, name := range packFiles {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: 2, Typeflag: tar.TypeReg, Format: tar.FormatPAX})
		tw.Write([]byte("{}"))
	}
	tw.Close()
	archive := buf.Bytes()
	f.Add(archive)
	f.Add(archive[:len(archive)/2])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		files, err := unpack(b)
		if err != nil {
			return
		}
		if len(files) != len(packFiles) {
			t.Fatalf("%d files", len(files))
		}
		for _, name := range packFiles {
			if _, ok := files[name]; !ok {
				t.Fatalf("no %s", name)
			}
		}
	})
}

// FuzzOpen: any stored file opens (decrypts) to an archive or fails with
// an error; a file that is not sealed is returned as it is, and a sealed
// one opens only to what was sealed.
func FuzzOpen(f *testing.F) {
	key, err := ParseKey(bytes.Repeat([]byte{1}, KeySize))
	if err != nil {
		f.Fatal(err)
	}
	sealed, err := seal(key, []byte("archive"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(sealed)
	f.Add([]byte(encMagic))
	f.Add([]byte("plain"))
	f.Fuzz(func(t *testing.T, b []byte) {
		out, err := open(key, b)
		if err != nil {
			return
		}
		if !bytes.HasPrefix(b, []byte(encMagic)) && !bytes.Equal(out, b) {
			t.Fatal("plain file changed")
		}
		if bytes.HasPrefix(b, []byte(encMagic)) && !bytes.Equal(out, []byte("archive")) {
			t.Fatalf("opened a forged file to %q", out)
		}
		if _, err := open(nil, b); bytes.HasPrefix(b, []byte(encMagic)) && err == nil {
			t.Fatal("opened a sealed file without a key")
		}
	})
}

// FuzzParseURI: a URI parses to a valid name and exactly one of a
// positive version or an alias, or fails.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"models:/iris/3", "models:/iris@production", "models:/iris/latest", "models:/", "models:/a/b/c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		name, version, alias, err := ParseURI(s)
		if err != nil {
			return
		}
		if checkModelName(name) != nil || (version > 0) == (alias != "") || strings.ContainsAny(name, "/@") {
			t.Fatalf("%q -> %q %d %q", s, name, version, alias)
		}
	})
}

// FuzzParseKey: text parses to a key or an error that never holds the
// text.
func FuzzParseKey(f *testing.F) {
	raw := bytes.Repeat([]byte{9}, KeySize)
	f.Add(raw)
	f.Add([]byte(hex.EncodeToString(raw)))
	f.Add([]byte("secret-key-text"))
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := ParseKey(b)
		if err != nil {
			// The message depends on the text's length only.
			_, other := ParseKey(bytes.Repeat([]byte{0xff}, len(b)))
			if other == nil || other.Error() != err.Error() {
				t.Fatalf("error %q depends on the key text", err)
			}
			return
		}
		if strings.Contains(k.String(), hex.EncodeToString(k.b[:8])) {
			t.Fatal("String shows the key")
		}
	})
}
