// Package kilnenv reads Kiln's environment variables, in one place. No
// package reads them as a side effect of being imported: the entry points
// (the kiln command, the Python bindings) call Load once and pass the
// values on (serving.Config, core.SetNumThreads).
//
// The variables:
//
//	KILN_NUM_THREADS       libtorch intra-op threads (a positive integer)
//	KILN_AUTH_TOKEN        the bearer token of `kiln serve` / kiln.serve
//	KILN_AUTH_TOKEN_FILE   a file holding that token
//
// Tests and benchmarks also read KILN_PYTHON (the interpreter that makes
// fixtures) through their own helpers; it never changes what Kiln does.
package kilnenv

import (
	"fmt"
	"strconv"
)

// Names of the variables Load reads.
const (
	NumThreads    = "KILN_NUM_THREADS"
	AuthToken     = "KILN_AUTH_TOKEN"
	AuthTokenFile = "KILN_AUTH_TOKEN_FILE"
)

// Vars are the values of Kiln's environment variables; a zero field means
// the variable is unset.
type Vars struct {
	// NumThreads is KILN_NUM_THREADS (0: unset).
	NumThreads int
	// AuthToken is KILN_AUTH_TOKEN.
	AuthToken string
	// AuthTokenFile is KILN_AUTH_TOKEN_FILE.
	AuthTokenFile string
}

// Load reads the variables through getenv (os.Getenv in a process; a map
// lookup in a test). A malformed value is an error naming the variable.
func Load(getenv func(string) string) (Vars, error) {
	v := Vars{AuthToken: getenv(AuthToken), AuthTokenFile: getenv(AuthTokenFile)}
	if s := getenv(NumThreads); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return Vars{}, fmt.Errorf("%s=%q: want a positive integer", NumThreads, s)
		}
		v.NumThreads = n
	}
	return v, nil
}
