// Package store keeps the correlator's state in SQL, on the engine the operator runs:
// embedded SQLite for one process (the default), PostgreSQL for several replicas that
// share it. It holds the intake's fingerprints, the ledger of findings already
// published, serve's state and the detector state replicas share; its schema is versioned and migrated at Open.
package store

import (
	"context"
	"database/sql"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
	"github.com/rs/zerolog"
	_ "modernc.org/sqlite" // registers the "sqlite" driver (pure Go)

	"github.com/imdsguard/imdsguard/internal/retry"
)

// Drivers, as the config names them.
const (
	SQLite   = "sqlite"
	Postgres = "postgres"
)

// DB is the correlator's database.
type DB struct {
	db     *sql.DB
	driver string
	log    zerolog.Logger
	// SQLite has one writer at a time; taking turns here is cheaper than retrying
	// SQLITE_BUSY. PostgreSQL needs no such thing.
	writeMu sync.Mutex
	inserts map[insertKey]*sql.Stmt // SQLite's fingerprint inserts (under writeMu)

	// The intake's group commit (see Put).
	committerOnce sync.Once
	puts          chan *putRequest
	closed        chan struct{}
	committerDone chan struct{}
	closeOnce     sync.Once
	commits       atomic.Int64
	waiting       atomic.Int64 // Puts queued or in a commit
	peak          atomic.Int64 // most Puts waiting at once since the last commit
}

// Open connects to the database and applies the migrations it lacks. For SQLite, dsn
// is the file's path; for PostgreSQL, a pgx connection string (URL or key=value).
// Errors of read methods that cannot return one are logged to log.
func Open(ctx context.Context, driver, dsn string, log zerolog.Logger) (*DB, error) {
	var db *sql.DB
	var err error
	switch driver {
	case SQLite:
		// WAL lets the detector read while a batch is written; synchronous=FULL makes
		// a commit mean the data is on disk.
		q := url.Values{}
		for _, p := range []string{"busy_timeout(10000)", "journal_mode(WAL)", "synchronous(FULL)", "foreign_keys(ON)"} {
			q.Add("_pragma", p)
		}
		// Every transaction here writes: taking the write lock at BEGIN (immediate)
		// lets busy_timeout wait for another writer instead of failing a read lock's
		// upgrade at once with SQLITE_BUSY.
		q.Set("_txlock", "immediate")
		db, err = sql.Open("sqlite", "file:"+dsn+"?"+q.Encode())
	case Postgres:
		db, err = sql.Open("pgx", dsn)
		if err == nil {
			db.SetMaxOpenConns(16)
		}
	default:
		return nil, fmt.Errorf("unknown store driver %q (sqlite or postgres)", driver)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s database: %w", driver, err)
	}
	s := &DB{db: db, driver: driver, log: log}
	if err := s.migrate(ctx); err != nil {
		_ = db.Close() // the migration's error is the one to report
		return nil, err
	}
	return s, nil
}

// Close stops the group commit (a Put under way finishes first) and closes the
// database.
func (s *DB) Close() error {
	s.closeOnce.Do(func() {
		s.committerOnce.Do(func() {}) // no committer starts after Close
		if s.closed != nil {
			close(s.closed)
			<-s.committerDone
		}
	})
	for _, st := range s.inserts {
		_ = st.Close() // closing the database closes them anyway
	}
	return s.db.Close()
}

// SQL is the database handle, for tests and tools that look inside.
func (s *DB) SQL() *sql.DB { return s.db }

// Driver is "sqlite" or "postgres".
func (s *DB) Driver() string { return s.driver }

// q rewrites a query written with ? placeholders for the driver: PostgreSQL numbers
// them ($1, $2, …).
func (s *DB) q(query string) string {
	if s.driver != Postgres {
		return query
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// lockWrites serialises writers on SQLite; it returns the unlock.
func (s *DB) lockWrites() func() {
	if s.driver != SQLite {
		return func() {}
	}
	s.writeMu.Lock()
	return s.writeMu.Unlock
}

// migrations are applied in order, each once, each in its own transaction. Append
// only: a released migration is never edited. Both engines take the same DDL.
var migrations = []string{
	// 1: the intake's fingerprints (IF NOT EXISTS adopts the table that the intake's
	// SQLite store made before migrations existed).
	`CREATE TABLE IF NOT EXISTS fingerprints (
		id            TEXT PRIMARY KEY,
		access_key_id TEXT NOT NULL,
		instance_id   TEXT NOT NULL,
		account_id    TEXT NOT NULL,
		expiration    BIGINT NOT NULL, -- unix seconds
		received      BIGINT NOT NULL, -- unix nanoseconds
		sender        TEXT NOT NULL,
		body          TEXT NOT NULL    -- the fingerprint, as the agent sent it (JSON)
	);
	CREATE INDEX IF NOT EXISTS fingerprints_access_key_id ON fingerprints (access_key_id);
	CREATE INDEX IF NOT EXISTS fingerprints_expiration ON fingerprints (expiration);`,
	// 2: the ledger of published findings: the count last published per finding.
	`CREATE TABLE published_findings (
		finding_id   TEXT PRIMARY KEY,
		count        BIGINT NOT NULL,
		window_start BIGINT NOT NULL, -- unix nanoseconds
		published_at BIGINT NOT NULL  -- unix nanoseconds
	);
	CREATE INDEX published_findings_window_start ON published_findings (window_start);`,
	// 3: serve's state (the detector's snapshot and what it has read), by name.
	`CREATE TABLE serve_state (
		name     TEXT PRIMARY KEY,
		body     TEXT NOT NULL,
		saved_at BIGINT NOT NULL -- unix nanoseconds
	);`,
	// 4: the detector state that replicas on one queue share: a base (a whole
	// snapshot, as of seq) and the deltas after it, each one replica's records of one
	// cycle; see StateTurn.
	`CREATE TABLE detector_base (
		id       INTEGER PRIMARY KEY, -- always 1
		seq      BIGINT NOT NULL,     -- the last delta the body includes
		body     TEXT NOT NULL,       -- a detector snapshot, empty at first
		saved_at BIGINT NOT NULL      -- unix nanoseconds
	);
	INSERT INTO detector_base (id, seq, body, saved_at) VALUES (1, 0, '', 0);
	CREATE TABLE detector_deltas (
		seq      BIGINT PRIMARY KEY,
		body     TEXT NOT NULL,
		saved_at BIGINT NOT NULL -- unix nanoseconds
	);`,
	// 5: the objects whose records are in the shared detector state, each recorded in
	// the turn that appended its delta, so that a redelivered object is not counted
	// again; see StateTurn.RecordObjects.
	`CREATE TABLE objects_read (
		bucket     TEXT NOT NULL,
		object_key TEXT NOT NULL,
		etag       TEXT NOT NULL,   -- the object's ETag as GetObject gave it ('' when none)
		read_at    BIGINT NOT NULL, -- unix nanoseconds
		PRIMARY KEY (bucket, object_key, etag)
	);
	CREATE INDEX objects_read_read_at ON objects_read (read_at);`,
}

// migrate applies the migrations the database lacks, all in one transaction. On
// PostgreSQL an advisory lock makes replicas that start together take turns, so none
// applies a migration twice or sees half of one.
func (s *DB) migrate(ctx context.Context) error {
	defer s.lockWrites()()
	// Several processes opening a new SQLite file at once race to switch it to WAL, and
	// SQLite answers that race with SQLITE_BUSY without waiting out busy_timeout: take
	// turns a few times before calling it a failure.
	var tx *sql.Tx
	err := retry.Policy{Retries: 20, Backoff: 10 * time.Millisecond, MaxBackoff: 500 * time.Millisecond}.Do(ctx,
		func(ctx context.Context) error {
			var err error
			tx, err = s.db.BeginTx(ctx, nil)
			if err != nil && !strings.Contains(err.Error(), "SQLITE_BUSY") {
				return retry.Permanent(err)
			}
			return err
		}, nil)
	if err != nil {
		return fmt.Errorf("begin migrations: %w", err)
	}
	defer tx.Rollback()
	if s.driver == Postgres {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(7243100)`); err != nil {
			return fmt.Errorf("lock for migrations: %w", err)
		}
	}
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)`); err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	var have sql.NullInt64
	if err := tx.QueryRowContext(ctx, `SELECT max(version) FROM schema_migrations`).Scan(&have); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if int(have.Int64) > len(migrations) {
		return fmt.Errorf("database schema is version %d, newer than this correlator's %d: upgrade the correlator", have.Int64, len(migrations))
	}
	for i := int(have.Int64); i < len(migrations); i++ {
		// The SQLite driver runs one statement per call.
		for _, stmt := range strings.Split(migrations[i], ";") {
			if strings.TrimSpace(stmt) == "" {
				continue
			}
			if _, err := tx.ExecContext(ctx, stmt); err != nil {
				return fmt.Errorf("migration %d: %w", i+1, err)
			}
		}
		if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`), i+1, nowNano()); err != nil {
			return fmt.Errorf("record migration %d: %w", i+1, err)
		}
		s.log.Info().Str("event", "store_migrated").Str("driver", s.driver).Int("version", i+1).Msg("applied schema migration")
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit migrations: %w", err)
	}
	return nil
}

// Version is the newest migration applied.
func (s *DB) Version(ctx context.Context) (int, error) {
	var v sql.NullInt64
	if err := s.db.QueryRowContext(ctx, `SELECT max(version) FROM schema_migrations`).Scan(&v); err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	return int(v.Int64), nil
}
