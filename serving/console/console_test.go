package console_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/serving/console"
)

func get(t *testing.T, h http.Handler, method, path string) (int, string, http.Header) {
	t.Helper()
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(method, path, nil))
	body, err := io.ReadAll(w.Result().Body)
	require.NoError(t, err)
	return w.Code, string(body), w.Result().Header
}

// The shell answers every page path, the assets their files; other paths,
// other methods and hidden files are refused.
func TestHandler(t *testing.T) {
	h := console.New(console.Options{})
	for _, p := range []string{"/", "/models", "/runs", "/runs/abc123", "/evaluations", "/rollouts", "/datasets", "/optimizations"} {
		code, body, hdr := get(t, h, http.MethodGet, p)
		assert.Equal(t, http.StatusOK, code, p)
		assert.Contains(t, body, `<main id="main">`, p)
		assert.Contains(t, hdr.Get("Content-Type"), "text/html", p)
		assert.Contains(t, hdr.Get("Content-Security-Policy"), "default-src 'self'", p)
	}
	code, body, hdr := get(t, h, http.MethodGet, "/console/assets/app.js")
	assert.Equal(t, http.StatusOK, code)
	assert.Contains(t, body, "kilnCharts")
	assert.Contains(t, hdr.Get("Content-Type"), "javascript")
	for _, p := range []string{"/v2", "/v2/models", "/metrics", "/nothing", "/console/assets/missing.js", "/console/dist/.lock.sha256", "/runsx"} {
		code, _, _ := get(t, h, http.MethodGet, p)
		assert.Equal(t, http.StatusNotFound, code, p)
	}
	code, _, _ = get(t, h, http.MethodPost, "/models")
	assert.Equal(t, http.StatusMethodNotAllowed, code)
	code, body, _ = get(t, h, http.MethodHead, "/")
	assert.Equal(t, http.StatusOK, code)
	assert.Empty(t, body)
}

// With the chart files embedded (scripts/console-assets ran before the
// build) the shell links them and shows no banner; without them it shows
// the banner and links nothing that would fail to load.
func TestAssetsBanner(t *testing.T) {
	h := console.New(console.Options{})
	_, body, _ := get(t, h, http.MethodGet, "/")
	if len(h.Missing()) == 0 {
		assert.Contains(t, body, `/console/dist/uPlot.iife.min.js`)
		assert.NotContains(t, body, `id="assets-missing"`)
		code, js, _ := get(t, h, http.MethodGet, "/console/dist/uPlot.iife.min.js")
		assert.Equal(t, http.StatusOK, code)
		assert.True(t, strings.Contains(js, "uPlot"))
	} else {
		assert.Contains(t, body, `id="assets-missing"`)
		assert.NotContains(t, body, `/console/dist/`)
	}
}

func TestIsPage(t *testing.T) {
	for p, want := range map[string]bool{"/": true, "/models": true, "/runs/x": true, "/v2": false, "/v2/rollouts": false, "/metrics": false, "/rollouts/": true, "/modelsx": false} {
		assert.Equal(t, want, console.IsPage(p), p)
	}
}
