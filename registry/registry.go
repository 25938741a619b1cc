// Package registry is Kiln's model registry: registered models with
// immutable, numbered versions whose packages are stored content-addressed
// (and optionally encrypted), the runs that made them (parameters,
// per-epoch metrics, final metrics, status, duration, error), aliases
// (production, candidate, any name) moved only by compare-and-swap with
// every move kept as an audit event, and evaluation verdicts with their
// evidence. The names are MLflow's: registered model, model version, run,
// params, metrics, alias.
//
// The records live in a real database: SQLite (a file; the default, no
// server to run) or PostgreSQL (when several servers share one registry),
// chosen by the DSN given to Open. The schema is migrated by
// golang-migrate from the SQL files embedded per dialect
// (migrations/sqlite, migrations/postgres) when the registry is opened.
//
// Artifacts (a version's model package: model.pt and manifest.json as one
// tar archive) are named by their SHA-256 under the artifact root,
// <root>/sha256/<hex>: files in a local directory (the default), or
// objects in S3-compatible object storage when the root is
// s3://bucket/prefix (servers sharing a PostgreSQL registry share the
// bucket; the client is configured from the standard AWS environment, see
// internal/s3util). A blob is written once, before the version's row, so
// a failed upload registers nothing; every read verifies the digest and
// refuses a mismatch (ErrDigestMismatch: a changed, corrupt or truncated
// file or object), and with a Key they are sealed with AES-256-GCM.
//
// Concurrency: an alias moves only when it is still at the version the
// caller expected (CompareAndSwap); of two processes moving one alias at
// once exactly one wins and the other gets ErrConflict. Each move and its
// audit event are one transaction, so a process killed during a promotion
// leaves the alias at the old or the new version.
package registry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"embed"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/golang-migrate/migrate/v4"
	"github.com/golang-migrate/migrate/v4/database"
	migratepgx "github.com/golang-migrate/migrate/v4/database/pgx/v5"
	migratesqlite "github.com/golang-migrate/migrate/v4/database/sqlite"
	"github.com/golang-migrate/migrate/v4/source/iofs"
	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
	"modernc.org/sqlite"

	"github.com/kilnml/kiln/core"
)

//go:embed migrations
var migrations embed.FS

// Errors the registry wraps (test with errors.Is); each carries a code.
var (
	// ErrConflict: a compare-and-swap found the alias elsewhere than
	// expected (another writer moved it first).
	ErrConflict error = &core.Error{Code: core.FailedPrecondition, Message: "alias moved by someone else"}
	// ErrDigestMismatch: an artifact's content does not have the SHA-256
	// it is stored under (tampered with or corrupt). Kiln has no
	// DATA_LOSS code; it is INTERNAL.
	ErrDigestMismatch error = &core.Error{Code: core.Internal, Message: "artifact digest mismatch"}
	// ErrNoKey: an artifact is encrypted and the registry has no key.
	ErrNoKey error = &core.Error{Code: core.FailedPrecondition, Message: "artifact is encrypted and no registry key is set"}
	// ErrWrongKey: an artifact was encrypted with another key.
	ErrWrongKey error = &core.Error{Code: core.FailedPrecondition, Message: "artifact was encrypted with another key"}
)

// Backend names the database a registry lives in.
type Backend string

// Backends.
const (
	SQLite   Backend = "sqlite"
	Postgres Backend = "postgres"
)

// Options configure Open.
type Options struct {
	// ArtifactDir is the artifact root (artifacts live in
	// ArtifactDir/sha256/<hex>): a local directory, or s3://bucket/prefix
	// for objects in S3-compatible storage. Default for SQLite:
	// "artifacts" beside the database file. PostgreSQL needs it: servers
	// that share the database must share this root too (an s3:// one, or
	// a shared file system).
	ArtifactDir string
	// S3PathStyle, for an s3:// ArtifactDir, turns path-style addressing
	// on or off (the caller's KILN_S3_PATH_STYLE); nil: on with a custom
	// endpoint (AWS_ENDPOINT_URL_S3), off for AWS.
	S3PathStyle *bool
	// Key, when set, encrypts the artifacts written from now on and
	// decrypts encrypted ones. It is never logged.
	Key *Key
	// Logger receives the registry's events (default slog.Default()).
	Logger *slog.Logger
}

// Registry is an open model registry. Its methods are safe for concurrent
// use; several processes may open the same registry.
type Registry struct {
	db        *sql.DB
	backend   Backend
	artifacts string
	store     artifactStore
	key       *Key
	log       *slog.Logger
	// beforeCommit, when set (tests only), runs inside CompareAndSwap's
	// transaction just before it commits.
	beforeCommit func()
}

// Open opens the registry at dsn, creating and migrating its schema when
// needed: a file path or sqlite://PATH (sqlite:///abs/path) is a SQLite
// database (created with its directory when missing), postgres://... or
// postgresql://... a PostgreSQL database (pgx's DSN, e.g.
// postgres://user@/db?host=/run/postgresql). Several processes may open
// the same registry at once; migrations are serialized (an advisory lock
// on PostgreSQL, a lock file beside the SQLite file).
func Open(ctx context.Context, dsn string, o Options) (*Registry, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	r := &Registry{key: o.Key, log: o.Logger, artifacts: o.ArtifactDir}
	var err error
	switch {
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		r.backend = Postgres
		if r.artifacts == "" {
			return nil, core.Errorf(core.InvalidArgument, "registry: a PostgreSQL registry needs an artifact root (a directory or s3://bucket/prefix shared by every server that uses it)")
		}
		err = r.openPostgres(ctx, dsn)
	case dsn == "":
		return nil, core.Errorf(core.InvalidArgument, "registry: empty DSN (want a SQLite file path, sqlite://PATH or postgres://...)")
	default:
		if i := strings.Index(dsn, "://"); i >= 0 && !strings.HasPrefix(dsn, "sqlite://") {
			return nil, core.Errorf(core.InvalidArgument, "registry: DSN scheme %q: want a SQLite file path, sqlite://PATH or postgres://...", dsn[:i])
		}
		r.backend = SQLite
		path := strings.TrimPrefix(dsn, "sqlite://")
		if r.artifacts == "" {
			r.artifacts = filepath.Join(filepath.Dir(path), "artifacts")
		}
		err = r.openSQLite(ctx, path)
	}
	if err != nil {
		return nil, err
	}
	if r.store, err = openStore(ctx, r.artifacts, o); err != nil {
		r.db.Close()
		return nil, err
	}
	return r, nil
}

// Close closes the database.
func (r *Registry) Close() error { return r.db.Close() }

// Backend says which database the registry lives in.
func (r *Registry) Backend() Backend { return r.backend }

// ArtifactDir is the artifact root: a directory or an s3:// URI.
func (r *Registry) ArtifactDir() string { return r.artifacts }

func sqliteDSN(path string) string {
	return path + "?_pragma=busy_timeout(30000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)" +
		"&_pragma=synchronous(FULL)&_txlock=immediate"
}

func (r *Registry) openSQLite(ctx context.Context, path string) error {
	if strings.ContainsAny(path, "?#") {
		return core.Errorf(core.InvalidArgument, "registry: SQLite path %q: ? and # are not allowed", path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	// Serialize migrations between processes: golang-migrate's SQLite
	// driver locks within one process only.
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("registry: locking %s: %w", lock.Name(), err)
	}
	mdb, err := sql.Open("sqlite", sqliteDSN(path))
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	drv, err := migratesqlite.WithInstance(mdb, &migratesqlite.Config{})
	if err != nil {
		mdb.Close()
		return fmt.Errorf("registry: opening %s: %w", path, err)
	}
	if err := migrateUp("sqlite", drv); err != nil {
		return fmt.Errorf("registry: %s: %w", path, err)
	}
	r.db, err = sql.Open("sqlite", sqliteDSN(path))
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	r.log.Debug("registry opened", "backend", "sqlite", "path", path, "artifacts", r.artifacts)
	return nil
}

func (r *Registry) openPostgres(ctx context.Context, dsn string) error {
	mdb, err := sql.Open("pgx", dsn)
	if err != nil {
		return core.Errorf(core.InvalidArgument, "registry: PostgreSQL DSN: %v", err)
	}
	drv, err := migratepgx.WithInstance(mdb, &migratepgx.Config{})
	if err != nil {
		mdb.Close()
		return core.Errorf(core.Unavailable, "registry: connecting to PostgreSQL %s: %v", redactDSN(dsn), err)
	}
	if err := migrateUp("pgx5", drv); err != nil {
		return fmt.Errorf("registry: PostgreSQL %s: %w", redactDSN(dsn), err)
	}
	r.db, err = sql.Open("pgx", dsn)
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := r.db.PingContext(ctx); err != nil {
		r.db.Close()
		return core.Errorf(core.Unavailable, "registry: connecting to PostgreSQL %s: %v", redactDSN(dsn), err)
	}
	r.log.Debug("registry opened", "backend", "postgres", "dsn", redactDSN(dsn), "artifacts", r.artifacts)
	return nil
}

// migrateUp applies the embedded migrations of one dialect and closes the
// driver (and its database handle).
func migrateUp(dialect string, drv database.Driver) error {
	sub := "migrations/sqlite"
	if dialect != "sqlite" {
		sub = "migrations/postgres"
	}
	src, err := iofs.New(migrations, sub)
	if err != nil {
		drv.Close()
		return err
	}
	m, err := migrate.NewWithInstance("iofs", src, dialect, drv)
	if err != nil {
		drv.Close()
		return err
	}
	err = m.Up()
	serr, derr := m.Close()
	if errors.Is(err, migrate.ErrNoChange) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("migrating the schema: %w", err)
	}
	return errors.Join(serr, derr)
}

// redactDSN drops the password from a PostgreSQL DSN for messages.
func redactDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "(unparsable DSN)"
	}
	return u.Redacted()
}

// Names: a registered model's name starts with a letter or digit and holds
// letters, digits, '.', '_' and '-' (at most 128); an alias starts with a
// lower-case letter and holds lower-case letters, digits, '_' and '-' (so
// it never reads as a version number).
var (
	modelName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	aliasName = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,63}$`)
)

// ValidModelName checks a registered model's name: a letter or digit, then
// letters, digits, '.', '_' or '-' (at most 128); a bad one is
// InvalidArgument.
func ValidModelName(name string) error { return checkModelName(name) }

func checkModelName(name string) error {
	if !modelName.MatchString(name) {
		return core.Errorf(core.InvalidArgument, "registry: model name %q: want a letter or digit, then letters, digits, '.', '_' or '-' (at most 128)", name)
	}
	return nil
}

func checkAlias(alias string) error {
	if !aliasName.MatchString(alias) || alias == "latest" {
		return core.Errorf(core.InvalidArgument, "registry: alias %q: want a lower-case letter, then lower-case letters, digits, '_' or '-' (at most 64; not \"latest\")", alias)
	}
	return nil
}

// q rewrites a query's ? placeholders for the backend ($1, $2, ... on
// PostgreSQL). Queries hold no literal '?'.
func (r *Registry) q(query string) string {
	if r.backend != Postgres {
		return query
	}
	var b strings.Builder
	n := 0
	for _, c := range query {
		if c == '?' {
			n++
			fmt.Fprintf(&b, "$%d", n)
			continue
		}
		b.WriteRune(c)
	}
	return b.String()
}

// sqliteTime is how SQLite rows hold times: UTC, fixed width, so that text
// order is time order.
const sqliteTime = "2006-01-02T15:04:05.000000000Z"

// ts is t as a query argument.
func (r *Registry) ts(t time.Time) any {
	if r.backend == SQLite {
		return t.UTC().Format(sqliteTime)
	}
	return t.UTC()
}

// dbTime scans a time column of either backend; Valid is false for NULL.
type dbTime struct {
	T     time.Time
	Valid bool
}

// Scan implements sql.Scanner.
func (d *dbTime) Scan(v any) error {
	switch x := v.(type) {
	case nil:
		*d = dbTime{}
	case time.Time:
		*d = dbTime{x.UTC(), true}
	case string:
		return d.parse(x)
	case []byte:
		return d.parse(string(x))
	default:
		return fmt.Errorf("registry: time column holds %T", v)
	}
	return nil
}

func (d *dbTime) parse(s string) error {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return fmt.Errorf("registry: time column: %w", err)
	}
	*d = dbTime{t.UTC(), true}
	return nil
}

// isUnique reports whether err is a unique (or primary key) violation.
func isUnique(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code == "23505"
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		return se.Code() == 2067 || se.Code() == 1555 // SQLITE_CONSTRAINT_UNIQUE, _PRIMARYKEY
	}
	return false
}

// dbErr wraps a database failure with context; a cancelled context keeps
// its code.
func dbErr(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	msg := fmt.Sprintf(format, args...)
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("registry: %s: %w", msg, err)
	}
	code := core.Internal
	var ce *pgconn.ConnectError
	var ne net.Error
	if errors.As(err, &ce) || errors.As(err, &ne) || errors.Is(err, driver.ErrBadConn) || errors.Is(err, sql.ErrConnDone) {
		code = core.Unavailable
	}
	return fmt.Errorf("registry: %s: %w", msg, &core.Error{Code: code, Message: err.Error()})
}

// tx runs f in a transaction (BEGIN IMMEDIATE on SQLite: writers queue for
// the database's write lock up front) and commits when f returns nil.
func (r *Registry) tx(ctx context.Context, f func(*sql.Tx) error) error {
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return dbErr(err, "begin transaction")
	}
	if err := f(tx); err != nil {
		tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return dbErr(err, "commit")
	}
	return nil
}

// actorOr returns actor, or "unknown" when it is empty.
func actorOr(actor string) string {
	if actor == "" {
		return "unknown"
	}
	return actor
}
