package testkit

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"text/template"
	"time"
)

// BalancerConfig describes the nginx load balancer StartNginx runs in front
// of several Kiln replicas: REST over HTTP/1.1 (proxy_pass) and gRPC over
// HTTP/2 cleartext (grpc_pass), each over its own upstream group.
type BalancerConfig struct {
	// HTTPUpstreams and GRPCUpstreams are the replicas' host:port
	// addresses of HTTP/REST and gRPC.
	HTTPUpstreams, GRPCUpstreams []string
	// FailTimeout is how long nginx leaves out a replica it could not
	// reach (passive health checking: max_fails=1); default 10 s.
	FailTimeout time.Duration
	// Host is the address the balancer listens on; default 127.0.0.1.
	Host string
}

// Nginx is a running nginx process (Debian's nginx package) balancing
// requests over Kiln replicas. A request that fails to reach a replica
// (connection refused or reset, timeout, 502/503 from the replica) is
// retried on the next one, POST included (inference has no side effect):
// proxy_next_upstream / grpc_next_upstream with non_idempotent.
type Nginx struct {
	// HTTPAddr and GRPCAddr are where the balancer listens (host:port).
	HTTPAddr, GRPCAddr string
	// Dir holds the configuration (nginx.conf), the error log and the
	// temporary files.
	Dir string

	cmd  *exec.Cmd
	done chan error
}

// NginxPath returns the nginx executable: on PATH, else /usr/sbin/nginx
// (Debian's place, often not on a user's PATH).
func NginxPath() (string, error) {
	if p, err := exec.LookPath("nginx"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/nginx"); err == nil {
		return "/usr/sbin/nginx", nil
	}
	return "", errors.New("nginx not found (Debian package nginx; scripts/install-deps installs it)")
}

var nginxConf = template.Must(template.New("nginx.conf").Parse(`# Written by internal/testkit (StartNginx) for one test or benchmark run.
daemon off;
master_process on;
worker_processes 1;
{{if .Root}}user root;
{{end}}pid {{.Dir}}/nginx.pid;
error_log {{.Dir}}/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path {{.Dir}}/client_body;
    proxy_temp_path {{.Dir}}/proxy;
    fastcgi_temp_path {{.Dir}}/fastcgi;
    uwsgi_temp_path {{.Dir}}/uwsgi;
    scgi_temp_path {{.Dir}}/scgi;
    client_max_body_size 64m;

    upstream kiln_http {
{{range .HTTP}}        server {{.}} max_fails=1 fail_timeout={{$.FailTimeout}}s;
{{end}}        keepalive 64;
    }
    upstream kiln_grpc {
{{range .GRPC}}        server {{.}} max_fails=1 fail_timeout={{$.FailTimeout}}s;
{{end}}        keepalive 64;
    }

    # KServe v2 REST.
    server {
        listen {{.HTTPListen}};
        location / {
            proxy_pass http://kiln_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_read_timeout 60s;
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
        }
    }

    # KServe v2 gRPC over HTTP/2 cleartext.
    server {
        listen {{.GRPCListen}} http2;
        location / {
            grpc_pass grpc://kiln_grpc;
            grpc_connect_timeout 1s;
            grpc_read_timeout 60s;
            grpc_next_upstream error timeout http_502 http_503 non_idempotent;
            grpc_next_upstream_tries 3;
        }
    }
}
`))

// freeAddr returns host:port of a port free on host now.
func freeAddr(host string) (string, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// StartNginx writes a configuration for cfg into dir and starts nginx in
// the foreground on two free ports of cfg.Host; it returns once both
// accept connections. Stop ends it.
func StartNginx(cfg BalancerConfig, dir string) (*Nginx, error) {
	bin, err := NginxPath()
	if err != nil {
		return nil, err
	}
	if len(cfg.HTTPUpstreams) == 0 || len(cfg.GRPCUpstreams) == 0 {
		return nil, errors.New("nginx: no upstream replicas")
	}
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.FailTimeout <= 0 {
		cfg.FailTimeout = 10 * time.Second
	}
	httpAddr, err := freeAddr(cfg.Host)
	if err != nil {
		return nil, fmt.Errorf("nginx: %w", err)
	}
	grpcAddr, err := freeAddr(cfg.Host)
	if err != nil {
		return nil, fmt.Errorf("nginx: %w", err)
	}
	var conf bytes.Buffer
	if err := nginxConf.Execute(&conf, map[string]any{
		"Dir": dir, "Root": os.Geteuid() == 0, "HTTP": cfg.HTTPUpstreams, "GRPC": cfg.GRPCUpstreams,
		"FailTimeout": int(cfg.FailTimeout.Round(time.Second) / time.Second), "HTTPListen": httpAddr, "GRPCListen": grpcAddr,
	}); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, conf.Bytes(), 0o644); err != nil {
		return nil, err
	}
	// -e: the log of startup errors, before error_log applies.
	cmd := exec.Command(bin, "-p", dir, "-c", path, "-e", filepath.Join(dir, "startup.log"))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("nginx: %w", err)
	}
	n := &Nginx{HTTPAddr: httpAddr, GRPCAddr: grpcAddr, Dir: dir, cmd: cmd, done: make(chan error, 1)}
	go func() { n.done <- cmd.Wait() }()
	deadline := time.Now().Add(15 * time.Second)
	for _, a := range []string{httpAddr, grpcAddr} {
		for {
			c, err := net.DialTimeout("tcp", a, time.Second)
			if err == nil {
				c.Close()
				break
			}
			select {
			case werr := <-n.done:
				return nil, fmt.Errorf("nginx exited at start (%v): %s%s", werr, out.String(), n.ErrorLog())
			case <-time.After(50 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				n.Stop()
				return nil, fmt.Errorf("nginx: %s not listening after 15 s: %s", a, n.ErrorLog())
			}
		}
	}
	return n, nil
}

// ErrorLog returns nginx's error log and startup log so far.
func (n *Nginx) ErrorLog() string {
	var b strings.Builder
	for _, f := range []string{"startup.log", "error.log"} {
		if data, err := os.ReadFile(filepath.Join(n.Dir, f)); err == nil {
			b.Write(data)
		}
	}
	return b.String()
}

// Stop ends nginx: SIGQUIT (graceful: the requests in flight finish), then
// SIGTERM (fast) after 10 s, then SIGKILL after 5 s more (an error). It is
// safe to call twice.
func (n *Nginx) Stop() error {
	select {
	case err := <-n.done: // stopped already
		n.done <- err
		return nil
	default:
	}
	_ = n.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case err := <-n.done:
		n.done <- err
		return nil
	case <-time.After(10 * time.Second):
	}
	// A graceful stop waits for client connections that are still open
	// (a test's gRPC clients keep theirs until their own cleanup); a fast
	// stop (SIGTERM) closes them.
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-n.done:
		n.done <- err
		return nil
	case <-time.After(5 * time.Second):
		_ = n.cmd.Process.Kill()
		err := <-n.done
		n.done <- err
		return fmt.Errorf("nginx did not stop on SIGQUIT (10 s) nor SIGTERM (5 s)")
	}
}

// NewNginx is StartNginx for a test: the configuration lives in a
// t.TempDir() and nginx is stopped in t.Cleanup. Without nginx the test is
// skipped, except under CI (CI set), where it fails.
func NewNginx(t testing.TB, cfg BalancerConfig) *Nginx {
	t.Helper()
	if _, err := NginxPath(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("load balancer test under CI: %v", err)
		}
		t.Skip(err)
	}
	n, err := StartNginx(cfg, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Stop(); err != nil {
			t.Error(err)
		}
	})
	return n
}
