// Package console serves the Kiln console: web pages over the server's own
// REST API for models (versions, aliases, load/unload), training runs
// (curves per epoch, parameters, lineage), evaluations, rollouts, datasets
// and optimization reports.
//
// The pages are one shell (index.html) and a script (app.js) that reads
// the same REST endpoints as any client (/v2/registry/..., /v2/rollouts,
// /v2/datasets, /v2/repository/...), with the bearer token the user typed
// kept in the tab's sessionStorage; so the console is behind exactly the
// REST API's auth, and the shell and its assets hold no data. Charts are
// uPlot, from npm (serving/console/web/package-lock.json), copied into
// dist/ by scripts/console-assets and embedded in the binary; a binary
// built without them serves the pages with a banner saying so (and logs
// it once) instead of failing to build.
//
// Routes (GET and HEAD): "/" and the page paths below it (models, runs,
// evaluations, rollouts, datasets, optimizations) answer the shell;
// /console/assets/* and /console/dist/* the files. Nothing under /v2 or
// /metrics is a console route: serving mounts the console beside the v2
// handler, which keeps those paths.
package console

import (
	"bytes"
	"embed"
	"io/fs"
	"log/slog"
	"net/http"
	"path"
	"strconv"
	"strings"
	"sync"
)

//go:embed assets
var assetFS embed.FS

//go:embed dist
var distFS embed.FS

// Vendored files the pages need; without them the console shows a banner.
var requiredDist = []string{"uPlot.iife.min.js", "uPlot.min.css"}

// Pages are the first path segments that answer the console's shell.
var Pages = []string{"models", "runs", "evaluations", "rollouts", "datasets", "optimizations"}

// Options configure the console handler.
type Options struct {
	// Logger receives the missing-assets warning; nil means slog.Default().
	Logger *slog.Logger
}

// Handler serves the console's pages and assets.
type Handler struct {
	shell   []byte
	missing []string
	log     *slog.Logger
	warn    sync.Once
	assets  http.Handler
	dist    http.Handler
}

// New returns the console handler.
func New(o Options) *Handler {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	h := &Handler{log: o.Logger}
	for _, f := range requiredDist {
		if _, err := fs.Stat(distFS, "dist/"+f); err != nil {
			h.missing = append(h.missing, f)
		}
	}
	shell, err := assetFS.ReadFile("assets/index.html")
	if err != nil {
		panic("console: assets/index.html is not embedded: " + err.Error()) // a build without its own source file
	}
	banner := ""
	if len(h.missing) > 0 {
		banner = `<div id="assets-missing" class="banner">This kiln was built without the console's chart files (` +
			strings.Join(h.missing, ", ") + `): run <code>scripts/console-assets</code> (or <code>make console-assets</code>) and rebuild. Tables work; charts do not.</div>`
	}
	css, js := "", ""
	if len(h.missing) == 0 {
		css = `<link rel="stylesheet" href="/console/dist/uPlot.min.css">`
		js = `<script src="/console/dist/uPlot.iife.min.js"></script>`
	}
	shell = bytes.Replace(shell, []byte("<!--BANNER-->"), []byte(banner), 1)
	shell = bytes.Replace(shell, []byte("<!--VENDOR-CSS-->"), []byte(css), 1)
	h.shell = bytes.Replace(shell, []byte("<!--VENDOR-JS-->"), []byte(js), 1)
	sub, _ := fs.Sub(assetFS, "assets")
	h.assets = http.StripPrefix("/console/assets/", http.FileServerFS(sub))
	dsub, _ := fs.Sub(distFS, "dist")
	h.dist = http.StripPrefix("/console/dist/", http.FileServerFS(dsub))
	return h
}

// Missing lists the chart files this binary was built without (none when
// scripts/console-assets ran before the build).
func (h *Handler) Missing() []string { return h.missing }

// IsPage reports whether path is one of the console's page paths ("/",
// "/models", "/runs/<id>", ...).
func IsPage(p string) bool {
	if p == "/" || p == "/index.html" {
		return true
	}
	first, _, _ := strings.Cut(strings.TrimPrefix(p, "/"), "/")
	for _, pg := range Pages {
		if first == pg {
			return true
		}
	}
	return false
}

// ServeHTTP serves a page or an asset; anything else is 404.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "the console takes GET", http.StatusMethodNotAllowed)
		return
	}
	p := path.Clean("/" + r.URL.Path)
	w.Header().Set("X-Content-Type-Options", "nosniff")
	switch {
	case strings.HasPrefix(p, "/console/assets/"):
		w.Header().Set("Cache-Control", "no-cache")
		h.assets.ServeHTTP(w, r)
	case strings.HasPrefix(p, "/console/dist/") && !strings.HasPrefix(path.Base(p), "."):
		w.Header().Set("Cache-Control", "max-age=3600")
		h.dist.ServeHTTP(w, r)
	case IsPage(p):
		if len(h.missing) > 0 {
			h.warn.Do(func() {
				h.log.Warn("console: built without its chart files; run scripts/console-assets and rebuild", "missing", h.missing)
			})
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Length", strconv.Itoa(len(h.shell)))
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'")
		w.Header().Set("X-Frame-Options", "DENY")
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			w.Write(h.shell)
		}
	default:
		http.NotFound(w, r)
	}
}
