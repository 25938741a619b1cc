package data_test

import (
	"bytes"
	"testing"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
)

// FuzzReadCSV feeds bytes to ReadCSV, seeded with the tests' CSV and
// malformed variants. It must not panic; errors are INVALID_ARGUMENT;
// what it accepts is a table of uniquely and non-empty named columns of
// equal length, with no more columns or rows than the input has bytes.
func FuzzReadCSV(f *testing.F) {
	f.Add([]byte(csvText))
	f.Add([]byte(""))
	f.Add([]byte("a,b\n1,2,3\n"))
	f.Add([]byte("a,b\n"))
	f.Add([]byte("a,a\n1,2\n"))
	f.Add([]byte("x,\"y\nz\",w\n1,\"2\"\"\",3\n4,5\n"))
	f.Add([]byte("\ufeffa;b\r\n1;2\r\n"))
	f.Add([]byte("a\n1e308\n1e309\n-inf\nnan\n?\n"))
	f.Add([]byte("a,b\n\"unterminated,1\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		tb, err := data.ReadCSV(bytes.NewReader(b))
		if err != nil {
			if !core.HasCode(err, core.InvalidArgument) {
				t.Fatalf("error without INVALID_ARGUMENT: %v", err)
			}
			return
		}
		if len(tb.Columns) == 0 || len(tb.Columns) > len(b) || tb.Rows() > len(b) {
			t.Fatalf("%d columns, %d rows from %d bytes", len(tb.Columns), tb.Rows(), len(b))
		}
		seen := map[string]bool{}
		for _, c := range tb.Columns {
			if c.Name == "" || seen[c.Name] {
				t.Fatalf("column name %q", c.Name)
			}
			seen[c.Name] = true
			if c.Len() != tb.Rows() {
				t.Fatalf("column %q has %d rows, the table %d", c.Name, c.Len(), tb.Rows())
			}
			for i := range c.Len() {
				c.Missing(i)
			}
		}
		if len(tb.Fingerprint) != 64 {
			t.Fatalf("fingerprint %q", tb.Fingerprint)
		}
	})
}
