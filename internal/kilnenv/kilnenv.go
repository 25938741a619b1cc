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
//	KILN_HOME              Kiln's data directory (default ~/.kiln): the
//	                       default registry (registry.db) and its artifacts
//	KILN_REGISTRY          the model registry's DSN (a SQLite path or
//	                       sqlite://PATH, or postgres://...)
//	KILN_REGISTRY_ARTIFACTS the registry's artifact root: a directory or
//	                       s3://bucket/prefix (default: artifacts/ beside a
//	                       SQLite file; $KILN_HOME/artifacts for PostgreSQL)
//	KILN_REGISTRY_KEY      the registry's artifact encryption key (32 bytes
//	                       as 64 hex digits or base64); never logged
//	KILN_REGISTRY_KEY_FILE a file holding that key (raw 32 bytes, hex or
//	                       base64)
//	KILN_S3_PATH_STYLE     "true" or "false": path-style addressing of
//	                       S3 (default: on with a custom endpoint,
//	                       AWS_ENDPOINT_URL(_S3), off for AWS); the AWS
//	                       SDK reads the AWS_* variables itself
//
// Tests and benchmarks also read KILN_PYTHON (the interpreter that makes
// fixtures) through their own helpers; it never changes what Kiln does.
package kilnenv

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Names of the variables Load reads.
const (
	NumThreads    = "KILN_NUM_THREADS"
	AuthToken     = "KILN_AUTH_TOKEN"
	AuthTokenFile = "KILN_AUTH_TOKEN_FILE"
	Home          = "KILN_HOME"
	Registry      = "KILN_REGISTRY"
	// RegistryArtifacts names the registry's artifact root.
	RegistryArtifacts = "KILN_REGISTRY_ARTIFACTS"
	RegistryKey       = "KILN_REGISTRY_KEY"
	// RegistryKeyFile names a file holding the registry's key.
	RegistryKeyFile = "KILN_REGISTRY_KEY_FILE"
	// S3PathStyle turns S3 path-style addressing on or off.
	S3PathStyle = "KILN_S3_PATH_STYLE"
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
	// Home is KILN_HOME.
	Home string
	// Registry is KILN_REGISTRY.
	Registry string
	// RegistryArtifacts is KILN_REGISTRY_ARTIFACTS.
	RegistryArtifacts string
	// RegistryKey is KILN_REGISTRY_KEY: secret, print it nowhere.
	RegistryKey string
	// RegistryKeyFile is KILN_REGISTRY_KEY_FILE.
	RegistryKeyFile string
	// S3PathStyle is KILN_S3_PATH_STYLE (nil: unset).
	S3PathStyle *bool
}

// Load reads the variables through getenv (os.Getenv in a process; a map
// lookup in a test). A malformed value is an error naming the variable.
func Load(getenv func(string) string) (Vars, error) {
	v := Vars{AuthToken: getenv(AuthToken), AuthTokenFile: getenv(AuthTokenFile),
		Home: getenv(Home), Registry: getenv(Registry), RegistryArtifacts: getenv(RegistryArtifacts),
		RegistryKey: getenv(RegistryKey), RegistryKeyFile: getenv(RegistryKeyFile)}
	if s := getenv(NumThreads); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return Vars{}, fmt.Errorf("%s=%q: want a positive integer", NumThreads, s)
		}
		v.NumThreads = n
	}
	if s := getenv(S3PathStyle); s != "" {
		b, err := strconv.ParseBool(s)
		if err != nil {
			return Vars{}, fmt.Errorf("%s=%q: want true or false", S3PathStyle, s)
		}
		v.S3PathStyle = &b
	}
	return v, nil
}

// DataDir returns Kiln's data directory: Home when set, else .kiln in the
// user's home directory (os.UserHomeDir). The error says that neither is
// known.
func (v Vars) DataDir() (string, error) {
	if v.Home != "" {
		return v.Home, nil
	}
	h, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("no data directory: %s is unset and %w", Home, err)
	}
	return filepath.Join(h, ".kiln"), nil
}

// RegistryConfigured reports whether a registry is named: by dsn (a
// --registry flag or a caller's argument) or by KILN_REGISTRY. Training
// jobs record runs by default only then.
func (v Vars) RegistryConfigured(dsn string) bool { return dsn != "" || v.Registry != "" }

// RegistryLocation returns the registry to open and its artifact root:
// dsn when it is not "", else KILN_REGISTRY, else the SQLite file
// registry.db in the data directory; artifacts when it is not "" (a
// --registry-artifacts flag), else KILN_REGISTRY_ARTIFACTS, else for
// SQLite "" (artifacts/ beside the file) and for a PostgreSQL DSN the data
// directory's artifacts/ (a root every server sharing the registry must
// share: an s3://bucket/prefix or a shared file system).
func (v Vars) RegistryLocation(dsn, artifacts string) (string, string, error) {
	if dsn == "" {
		dsn = v.Registry
	}
	if artifacts == "" {
		artifacts = v.RegistryArtifacts
	}
	pg := strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://")
	if dsn != "" && (!pg || artifacts != "") {
		return dsn, artifacts, nil
	}
	home, err := v.DataDir()
	if err != nil {
		return "", "", err
	}
	if dsn == "" {
		return filepath.Join(home, "registry.db"), artifacts, nil
	}
	return dsn, filepath.Join(home, "artifacts"), nil
}
