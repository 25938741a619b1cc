package serving

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kilnml/kiln/serving/limits"
	"github.com/stretchr/testify/require"
)

// A body over the limit is 413 (it was 429), without reading it.
func TestHTTPBodyOverLimitIs413(t *testing.T) {
	_, base := startAll(t, Config{MaxMessageBytes: 1 << 20}, nil)
	body := bytes.Repeat([]byte(" "), 2<<20)
	requireHTTPError(t, do(t, nil, "POST", base+"/v2/models/affine/infer", body, nil), http.StatusRequestEntityTooLarge, "exceeds the limit")
}

// rawRequest sends head (request line and headers) and then body on a new
// connection, and returns the status line the server answers within
// wait, or "" when the connection closes or nothing comes.
func rawRequest(t *testing.T, addr, head string, body []byte, wait time.Duration) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write([]byte(head + "\r\n"))
	require.NoError(t, err)
	if len(body) > 0 {
		_, err = c.Write(body)
		require.NoError(t, err)
	}
	require.NoError(t, c.SetReadDeadline(time.Now().Add(wait)))
	line, _ := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line)
}

// Content-Length 2147483647 with a body that never comes: answered 413 at
// once, nothing allocated from the declared length (it made the server
// allocate 2 GiB per connection and wait).
func TestHTTPHugeContentLengthWithoutBody(t *testing.T) {
	srv, _ := startAll(t, Config{}, nil)
	head := "POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2147483647\r\n"
	start := time.Now()
	line := rawRequest(t, srv.HTTPAddr().String(), head, []byte(`{"inputs":`), 10*time.Second)
	require.Contains(t, line, "413", line)
	require.Less(t, time.Since(start), 5*time.Second)
}

// A body that stops coming is cut off by the read timeout: the connection
// does not stay open.
func TestHTTPSlowBodyTimesOut(t *testing.T) {
	srv, _ := startAll(t, Config{Limits: limits.Limits{ReadTimeout: time.Second}}, nil)
	head := "POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
	start := time.Now()
	line := rawRequest(t, srv.HTTPAddr().String(), head, []byte(`{"inputs":`), 20*time.Second)
	require.Less(t, time.Since(start), 10*time.Second, "answer %q", line)
	require.NotContains(t, line, "200")
}

// A gzip body that decodes beyond the decompressed limit is 413 (a 1 MiB
// gzip body used to grow to GiBs).
func TestHTTPGzipBombIs413(t *testing.T) {
	_, base := startAll(t, Config{Limits: limits.Limits{MaxDecompressedBytes: 4 << 20}}, nil)
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	zeros := make([]byte, 1<<20)
	for range 16 {
		zw.Write(zeros)
	}
	require.NoError(t, zw.Close())
	r := do(t, nil, "POST", base+"/v2/models/affine/infer", buf.Bytes(), map[string]string{"Content-Encoding": "gzip"})
	requireHTTPError(t, r, http.StatusRequestEntityTooLarge, "decoded request body exceeds")
}

// Requests beyond the bytes in flight are refused (503) before their body
// is read.
func TestHTTPAdmissionControl(t *testing.T) {
	srv, _ := startAll(t, Config{Limits: limits.Limits{MaxInflightBytes: 1000}}, nil)
	addr := srv.HTTPAddr().String()
	// The first request holds 900 bytes in flight: its body never ends.
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	fmt.Fprintf(c, "POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n{")
	require.Eventually(t, func() bool {
		line := rawRequest(t, addr, "POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n", bytes.Repeat([]byte(" "), 200), 5*time.Second)
		return strings.Contains(line, "503")
	}, 30*time.Second, 50*time.Millisecond, "a loaded machine may take a while to admit the first request")
}
