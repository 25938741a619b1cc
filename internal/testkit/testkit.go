// Package testkit is what Kiln's Go tests and benchmarks share: the Python
// interpreter they run fixture scripts with, the repository's root, the
// models and data sets of tests/fixtures/kiln_fixtures.py (made into
// temporary directories, once per test binary), and a self-signed TLS
// certificate.
//
// Fixture names are the NAME argument of kiln_fixtures.py (serving-repo,
// flight-repo, torch-models, datasets, inplace, bench-cgo, bench-flight,
// bench-serve); `python tests/fixtures/kiln_fixtures.py --list` lists them
// and its doc string says what each writes.
package testkit

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

// Root returns the repository's root directory (absolute), found from this
// source file's location, so it does not depend on the working directory.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// FixtureScript is the path of the fixtures' command line,
// tests/fixtures/kiln_fixtures.py, below Root.
func FixtureScript() string {
	return filepath.Join(Root(), "tests", "fixtures", "kiln_fixtures.py")
}

// PythonPath returns the Python interpreter with torch (and scikit-learn,
// pyarrow) that fixtures and peers run with: $KILN_PYTHON when set, else
// the repository's .venv/bin/python when present, else python3 on PATH.
// The error says which were tried when none can be run.
func PythonPath() (string, error) {
	if p := os.Getenv("KILN_PYTHON"); p != "" {
		abs, err := exec.LookPath(p)
		if err != nil {
			return "", fmt.Errorf("testkit: KILN_PYTHON=%s: %w", p, err)
		}
		return abs, nil
	}
	venv := filepath.Join(Root(), ".venv", "bin", "python")
	if _, err := os.Stat(venv); err == nil {
		return venv, nil
	}
	p, err := exec.LookPath("python3")
	if err != nil {
		return "", fmt.Errorf("testkit: no Python: KILN_PYTHON is unset, %s is missing and %w (run scripts/install-deps)", venv, err)
	}
	return p, nil
}

// Python is PythonPath for a test: it fails the test (t.Fatal) when no
// interpreter is found, as Kiln's tests need Python torch to make their
// fixtures.
func Python(t testing.TB) string {
	t.Helper()
	p, err := PythonPath()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// MakeFixture writes fixture name into dir (created when missing) by
// running kiln_fixtures.py with PythonPath. It is the non-test form, for
// TestMain functions and benchmarks; the error carries the interpreter and
// the script's output.
func MakeFixture(name, dir string) error {
	py, err := PythonPath()
	if err != nil {
		return err
	}
	out, err := exec.Command(py, FixtureScript(), name, dir).CombinedOutput()
	if err != nil {
		return fmt.Errorf("testkit: fixture %s with %s: %w\n%s", name, py, err, out)
	}
	return nil
}

// cache holds the fixtures made once per test binary while Main runs.
var cache struct {
	sync.Mutex
	dir  string // "" outside Main: Fixture makes a fresh copy per call
	made map[string]*made
}

type made struct {
	once sync.Once
	dir  string
	err  error
}

// Main runs the package's tests (m.Run) with a fixture cache, removes the
// fixtures made meanwhile and exits with the tests' status. Call it from
// TestMain: func TestMain(m *testing.M) { testkit.Main(m) }.
func Main(m *testing.M) {
	os.Exit(runMain(m, nil))
}

// MainWithFixture is Main for a package whose TestMain needs fixture name
// before the tests run: it makes the fixture (cached, as Fixture), stores
// its directory in *dir, runs setup when not nil (work done once for every
// test, such as training a model into *dir), then the tests. When making
// the fixture or setup fails it prints the error and exits with status 1
// without running the tests.
func MainWithFixture(m *testing.M, name string, dir *string, setup func() error) {
	os.Exit(runMain(m, func() error {
		d, err := cached(name)
		if err != nil {
			return err
		}
		*dir = d
		if setup != nil {
			return setup()
		}
		return nil
	}))
}

func runMain(m *testing.M, before func() error) int {
	dir, err := os.MkdirTemp("", "kiln-fixtures-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "testkit:", err)
		return 1
	}
	cache.Lock()
	cache.dir, cache.made = dir, map[string]*made{}
	cache.Unlock()
	defer func() {
		cache.Lock()
		cache.dir, cache.made = "", nil
		cache.Unlock()
		stopSharedPostgres()
		os.RemoveAll(dir)
	}()
	if before != nil {
		if err := before(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	return m.Run()
}

// cached returns fixture name's directory in the cache, making it on the
// first call; outside Main the error is errNoCache.
func cached(name string) (string, error) {
	cache.Lock()
	root := cache.dir
	if root == "" {
		cache.Unlock()
		return "", errNoCache
	}
	e := cache.made[name]
	if e == nil {
		e = &made{}
		cache.made[name] = e
	}
	cache.Unlock()
	e.once.Do(func() {
		e.dir = filepath.Join(root, name)
		e.err = MakeFixture(name, e.dir)
	})
	return e.dir, e.err
}

var errNoCache = errors.New("testkit: no fixture cache outside Main")

// Fixture returns a directory holding fixture name. Under Main the fixture
// is made once per test binary and the directory is shared by every test:
// treat it as read-only (CopyFixture gives a copy to change). Without Main
// each call makes it into a new t.TempDir(). A failure to make it fails the
// test.
func Fixture(t testing.TB, name string) string {
	t.Helper()
	dir, err := cached(name)
	if errors.Is(err, errNoCache) {
		dir = t.TempDir()
		err = MakeFixture(name, dir)
	}
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// CopyFixture returns a new t.TempDir() holding a copy of fixture name,
// for a test that changes it (a model repository it adds models to).
func CopyFixture(t testing.TB, name string) string {
	t.Helper()
	src := Fixture(t, name)
	dst := t.TempDir()
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(errors.Join(fmt.Errorf("testkit: copying fixture %s", name), err))
	}
	return dst
}
