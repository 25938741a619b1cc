package testkit

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// VersityGWVersion is the versitygw release scripts/install-deps builds
// into build/tools (go install github.com/versity/versitygw/cmd/versitygw).
const VersityGWVersion = "v1.8.0"

// S3Server is an S3-compatible server process a test started: versitygw
// (github.com/versity/versitygw) with its POSIX backend over a temporary
// directory, on a free loopback port, one root account.
type S3Server struct {
	// Endpoint is the server's URL, http://127.0.0.1:PORT.
	Endpoint string
	// AccessKey and SecretKey are the root account's credentials.
	AccessKey, SecretKey string
	// Region is the region the server answers for.
	Region string
	// Dir is the backend's directory (a bucket is a directory in it).
	Dir string

	cmd    *exec.Cmd
	exited chan error
	log    string
}

// VersityGWPath returns the versitygw binary: $KILN_VERSITYGW when set,
// else build/tools/versitygw below Root, which scripts/install-deps
// builds. The error names scripts/install-deps.
func VersityGWPath() (string, error) {
	if p := os.Getenv("KILN_VERSITYGW"); p != "" {
		return p, nil
	}
	p := filepath.Join(Root(), "build", "tools", "versitygw")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("testkit: the S3 server versitygw is not installed (%s: %w): run scripts/install-deps", p, err)
	}
	return p, nil
}

// S3 starts an S3 server for the test and stops it in t.Cleanup. It
// fails the test when versitygw is missing (see VersityGWPath) or does
// not come up.
func S3(t testing.TB) *S3Server {
	t.Helper()
	bin, err := VersityGWPath()
	if err != nil {
		t.Fatal(err)
	}
	s := &S3Server{AccessKey: "KILNTESTACCESSKEY", SecretKey: "kiln-test-secret-key-0123456789", Region: "us-east-1", Dir: t.TempDir()}
	if err := s.start(bin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop() })
	return s
}

func (s *S3Server) start(bin string) error {
	data := filepath.Join(s.Dir, "data")
	if err := os.MkdirAll(data, 0o755); err != nil {
		return err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("testkit: s3: %w", err)
	}
	addr := l.Addr().String()
	l.Close()
	s.Endpoint = "http://" + addr
	s.log = filepath.Join(s.Dir, "versitygw.log")
	logf, err := os.Create(s.log)
	if err != nil {
		return err
	}
	defer logf.Close()
	s.cmd = exec.Command(bin, "--access", s.AccessKey, "--secret", s.SecretKey, "--region", s.Region,
		"--port", addr, "--quiet", "posix", data)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + s.Dir}
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("testkit: starting %s: %w", bin, err)
	}
	s.exited = make(chan error, 1)
	go func() { s.exited <- s.cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case err := <-s.exited:
			s.exited <- err
			b, _ := os.ReadFile(s.log)
			return fmt.Errorf("testkit: versitygw exited (%v) before listening on %s:\n%s", err, addr, b)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			return fmt.Errorf("testkit: versitygw did not listen on %s within 30 s", addr)
		}
	}
}

// Stop stops the server (SIGTERM, then SIGKILL after 5 s) and waits for
// it; a second Stop does nothing. Its directory stays until the test ends.
func (s *S3Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	select {
	case err := <-s.exited:
		s.exited <- err
		return
	default:
	}
	s.cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-s.exited:
		s.exited <- err
	case <-time.After(5 * time.Second):
		s.cmd.Process.Kill()
		s.exited <- <-s.exited
	}
}

// Env returns the environment variables that point the AWS SDK (and the
// kiln command) at the server with its credentials, reading no shared
// AWS files of the host.
func (s *S3Server) Env() map[string]string {
	return map[string]string{
		"AWS_ENDPOINT_URL_S3":         s.Endpoint,
		"AWS_ACCESS_KEY_ID":           s.AccessKey,
		"AWS_SECRET_ACCESS_KEY":       s.SecretKey,
		"AWS_REGION":                  s.Region,
		"AWS_CONFIG_FILE":             filepath.Join(s.Dir, "no-aws-config"),
		"AWS_SHARED_CREDENTIALS_FILE": filepath.Join(s.Dir, "no-aws-credentials"),
		"AWS_EC2_METADATA_DISABLED":   "true",
	}
}

// Setenv sets Env's variables for the test (t.Setenv: not with
// t.Parallel).
func (s *S3Server) Setenv(t testing.TB) {
	t.Helper()
	for k, v := range s.Env() {
		t.Setenv(k, v)
	}
	t.Setenv("AWS_PROFILE", "")
	t.Setenv("AWS_ENDPOINT_URL", "")
	t.Setenv("AWS_SESSION_TOKEN", "")
}

// Client returns an S3 client for the server (path-style, static
// credentials), independent of the environment.
func (s *S3Server) Client() *s3.Client {
	return s3.New(s3.Options{
		BaseEndpoint:               aws.String(s.Endpoint),
		Region:                     s.Region,
		UsePathStyle:               true,
		Credentials:                credentials.NewStaticCredentialsProvider(s.AccessKey, s.SecretKey, ""),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	})
}

// CreateBucket creates bucket name, failing the test on error.
func (s *S3Server) CreateBucket(t testing.TB, name string) {
	t.Helper()
	if _, err := s.Client().CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: aws.String(name)}); err != nil {
		t.Fatalf("testkit: create bucket %s: %v", name, err)
	}
}

// PutObject writes body as the object key of bucket (a test's upload, or
// a corrupt or half-written object planted on purpose), failing the test
// on error.
func (s *S3Server) PutObject(t testing.TB, bucket, key, body string) {
	t.Helper()
	in := &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(key), Body: strings.NewReader(body)}
	if _, err := s.Client().PutObject(context.Background(), in); err != nil {
		t.Fatalf("testkit: put s3://%s/%s: %v", bucket, key, err)
	}
}
