package testkit

import (
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMain(m *testing.M) { Main(m) }

func TestPythonPathHonoursKILN_PYTHON(t *testing.T) {
	fake := filepath.Join(t.TempDir(), "python")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KILN_PYTHON", fake)
	if got, err := PythonPath(); err != nil || got != fake {
		t.Fatalf("PythonPath() = %q, %v; want %q", got, err, fake)
	}
	t.Setenv("KILN_PYTHON", filepath.Join(t.TempDir(), "missing"))
	if _, err := PythonPath(); err == nil || !strings.Contains(err.Error(), "KILN_PYTHON") {
		t.Fatalf("a missing $KILN_PYTHON: err %v", err)
	}
}

func TestRootHoldsTheFixtureScript(t *testing.T) {
	if _, err := os.Stat(FixtureScript()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(Root(), "go.mod")); err != nil {
		t.Fatal(err)
	}
}

// Under Main a fixture is made once and shared; a copy is a new directory
// with the same files.
func TestFixtureIsMadeOnce(t *testing.T) {
	a := Fixture(t, "inplace")
	b := Fixture(t, "inplace")
	if a != b {
		t.Fatalf("two directories for one fixture: %s, %s", a, b)
	}
	if _, err := os.Stat(filepath.Join(a, "inplace.pt")); err != nil {
		t.Fatal(err)
	}
	c := CopyFixture(t, "inplace")
	if c == a {
		t.Fatal("CopyFixture returned the shared directory")
	}
	if _, err := os.Stat(filepath.Join(c, "inplace.pt")); err != nil {
		t.Fatal(err)
	}
}

func TestMakeFixtureUnknownName(t *testing.T) {
	err := MakeFixture("no-such-fixture", t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "no-such-fixture") {
		t.Fatalf("err %v", err)
	}
}

// The certificate serves TLS that a client trusting only the pool accepts
// for 127.0.0.1 and localhost.
func TestSelfSigned(t *testing.T) {
	certFile, keyFile, pool := SelfSigned(t, t.TempDir())
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	for _, host := range []string{"127.0.0.1", "localhost"} {
		c, err := tls.Dial("tcp", net.JoinHostPort("127.0.0.1", port), &tls.Config{RootCAs: pool, ServerName: host})
		if err != nil {
			t.Fatalf("%s: %v", host, err)
		}
		c.Close()
	}
}

// PostgreSQL starts a server once per binary (under Main) and gives each
// call its own database.
func TestPostgreSQL(t *testing.T) {
	a, b := PostgreSQL(t), PostgreSQL(t)
	if a == b || !strings.HasPrefix(a, "postgres://kiln@/kiln_test_") {
		t.Fatalf("DSNs %q, %q", a, b)
	}
	srv := pgShared.srv
	host := a[strings.Index(a, "host=")+5 : strings.Index(a, "&")]
	out, err := srv.command("psql", "-h", host, "-U", "kiln", "-d", a[strings.Index(a, "/kiln_test")+1:strings.Index(a, "?")], "-Atc", "SELECT 40+2").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "42" {
		t.Fatalf("psql: %v: %s", err, out)
	}
}
