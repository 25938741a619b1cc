package testkit

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// pgServer is one PostgreSQL server a test binary started: a cluster made
// by initdb in its own temporary directory, listening on a Unix socket in
// that directory only (no TCP port), trust authentication for user kiln.
type pgServer struct {
	dir, bin string
	cmd      *exec.Cmd
	cred     *syscall.Credential // non-nil when run as another user (we are root)
	exited   chan error          // the server's exit status, once
	mu       sync.Mutex
	dbs      int
}

// pgShared is the server shared by the tests of a binary run under Main;
// stopped when Main returns.
var pgShared struct {
	sync.Mutex
	srv *pgServer
	err error
}

// PostgreSQL returns the DSN of a new, empty database on a PostgreSQL
// server that the test binary runs itself (Debian's postgresql package:
// initdb and postgres from /usr/lib/postgresql/<version>/bin, the newest
// there, else from PATH). Under Main one server is started for the whole
// binary and stopped when the tests end; without Main each call starts one
// and stops it in t.Cleanup. Every call gets its own database.
//
// initdb and postgres refuse to run as root: when the tests run as root
// the server runs as the user "postgres" (which Debian's package creates),
// else "nobody", in a directory that user owns. A missing installation
// fails the test naming scripts/install-deps.
func PostgreSQL(t testing.TB) string {
	t.Helper()
	var srv *pgServer
	cache.Lock()
	shared := cache.dir != ""
	cache.Unlock()
	if shared {
		pgShared.Lock()
		if pgShared.srv == nil && pgShared.err == nil {
			pgShared.srv, pgShared.err = startPostgres()
		}
		srv, err := pgShared.srv, pgShared.err
		pgShared.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		return srv.newDatabase(t)
	}
	srv, err := startPostgres()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.stop(); err != nil {
			t.Error(err)
		}
	})
	return srv.newDatabase(t)
}

// stopSharedPostgres stops the server PostgreSQL started under Main.
func stopSharedPostgres() {
	pgShared.Lock()
	defer pgShared.Unlock()
	if pgShared.srv != nil {
		if err := pgShared.srv.stop(); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}
	pgShared.srv, pgShared.err = nil, nil
}

// postgresBin finds the directory holding initdb and postgres.
func postgresBin() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
		return vi > vj
	})
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", errors.New("testkit: PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb, no initdb on PATH): run scripts/install-deps")
}

func startPostgres() (*pgServer, error) {
	bin, err := postgresBin()
	if err != nil {
		return nil, err
	}
	// A short path: the socket's path must fit in 107 bytes.
	dir, err := os.MkdirTemp("", "kiln-pg-")
	if err != nil {
		return nil, fmt.Errorf("testkit: postgres: %w", err)
	}
	s := &pgServer{dir: dir, bin: bin}
	if os.Geteuid() == 0 {
		if s.cred, err = serverUser(); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		if err := os.Chown(dir, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("testkit: postgres: %w", err)
		}
	}
	data := filepath.Join(dir, "data")
	if out, err := s.command("initdb", "-D", data, "-U", "kiln", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("testkit: initdb: %w\n%s", err, out)
	}
	log, err := os.Create(filepath.Join(dir, "postgres.log"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("testkit: postgres: %w", err)
	}
	defer log.Close()
	s.cmd = s.command("postgres", "-D", data, "-k", dir, "-c", "listen_addresses=", "-c", "fsync=off",
		"-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=50")
	s.cmd.Stdout, s.cmd.Stderr = log, log
	if err := s.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("testkit: postgres: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- s.cmd.Wait() }()
	// Wait for it to accept connections (pg_isready), or to exit.
	for {
		if s.command("pg_isready", "-q", "-h", dir, "-U", "kiln", "-d", "postgres").Run() == nil {
			break
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(filepath.Join(dir, "postgres.log"))
			os.RemoveAll(dir)
			return nil, fmt.Errorf("testkit: postgres exited (%v) before accepting connections:\n%s", err, b)
		case <-time.After(50 * time.Millisecond):
		}
	}
	s.exited = exited
	return s, nil
}

// serverUser is the user a root test process runs PostgreSQL as.
func serverUser() (*syscall.Credential, error) {
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
	}
	return nil, errors.New("testkit: running as root, and neither user postgres nor nobody exists to run PostgreSQL as")
}

// command runs one of the server's programs, as the server's user.
func (s *pgServer) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(s.bin, name), args...)
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), "PGHOST="+s.dir, "LC_ALL=C")
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	}
	return cmd
}

// newDatabase creates a database and returns its DSN.
func (s *pgServer) newDatabase(t testing.TB) string {
	t.Helper()
	s.mu.Lock()
	s.dbs++
	name := fmt.Sprintf("kiln_test_%d", s.dbs)
	s.mu.Unlock()
	if out, err := s.command("createdb", "-h", s.dir, "-U", "kiln", name).CombinedOutput(); err != nil {
		t.Fatalf("testkit: createdb %s: %v\n%s", name, err, out)
	}
	return fmt.Sprintf("postgres://kiln@/%s?host=%s&sslmode=disable", name, s.dir)
}

// stop shuts the server down (fast shutdown: SIGINT), waits for it and
// removes its directory.
func (s *pgServer) stop() error {
	defer os.RemoveAll(s.dir)
	if err := s.cmd.Process.Signal(syscall.SIGINT); err != nil {
		return fmt.Errorf("testkit: stopping postgres: %w", err)
	}
	<-s.exited
	return nil
}
