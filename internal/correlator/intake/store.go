package intake

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"sync"
	"time"

	"github.com/rs/zerolog"
	_ "modernc.org/sqlite" // registers the "sqlite" driver (pure Go)

	"github.com/imdsguard/imdsguard/internal/correlator/fpstore"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// Store is where accepted fingerprints are kept. It is a fpstore.Store, so the
// detector reads it directly. The SQLite implementation below is the default (one
// correlator); the interface is small on purpose so that a shared PostgreSQL one can be
// added for several replicas: the same table, INSERT ... ON CONFLICT (id) DO NOTHING,
// and a purge that any replica may run.
type Store interface {
	fpstore.Store
	// Put stores fps in one transaction: all of them or, on error, none. A fingerprint
	// whose id is already stored (or repeated in fps) is a duplicate and left as it
	// was. sender says who proved the batch (an instance id or a certificate subject).
	Put(ctx context.Context, fps []wire.Fingerprint, sender string) (added, duplicates int, err error)
	// Purge removes fingerprints that expired before t, and says how many.
	Purge(ctx context.Context, t time.Time) (int64, error)
	Close() error
}

// SQLite is a Store in an embedded SQLite database (modernc.org/sqlite, no cgo).
type SQLite struct {
	db  *sql.DB
	log zerolog.Logger
	// SQLite has one writer at a time; taking turns here is cheaper than retrying
	// SQLITE_BUSY.
	writeMu sync.Mutex
}

const schema = `
CREATE TABLE IF NOT EXISTS fingerprints (
	id            TEXT PRIMARY KEY,
	access_key_id TEXT NOT NULL,
	instance_id   TEXT NOT NULL,
	account_id    TEXT NOT NULL,
	expiration    INTEGER NOT NULL, -- unix seconds
	received      INTEGER NOT NULL, -- unix nanoseconds
	sender        TEXT NOT NULL,
	body          TEXT NOT NULL     -- the fingerprint, as the agent sent it (JSON)
);
CREATE INDEX IF NOT EXISTS fingerprints_access_key_id ON fingerprints (access_key_id);
CREATE INDEX IF NOT EXISTS fingerprints_expiration ON fingerprints (expiration);
`

// OpenSQLite opens (creating if needed) the database at path. Errors of the read
// methods that fpstore.Store cannot return are logged to log.
func OpenSQLite(path string, log zerolog.Logger) (*SQLite, error) {
	// WAL lets the detector read while a batch is written; synchronous=FULL makes a 200
	// answer mean the batch is on disk, so the agent may drop it from its spool.
	q := url.Values{}
	for _, p := range []string{"busy_timeout(10000)", "journal_mode(WAL)", "synchronous(FULL)", "foreign_keys(ON)"} {
		q.Add("_pragma", p)
	}
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("open fingerprint database: %w", err)
	}
	if _, err := db.Exec(schema); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("create fingerprint table in %s: %w", path, err)
	}
	return &SQLite{db: db, log: log}, nil
}

// Close implements Store.
func (s *SQLite) Close() error { return s.db.Close() }

// Put implements Store.
func (s *SQLite) Put(ctx context.Context, fps []wire.Fingerprint, sender string) (added, duplicates int, err error) {
	bodies := make([][]byte, len(fps))
	for i, fp := range fps {
		if bodies[i], err = json.Marshal(fp); err != nil {
			return 0, 0, fmt.Errorf("encode fingerprint %s: %w", fp.ID, err)
		}
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, 0, fmt.Errorf("begin fingerprint transaction: %w", err)
	}
	defer func() { _ = tx.Rollback() }() // a no-op after Commit
	stmt, err := tx.PrepareContext(ctx, `INSERT OR IGNORE INTO fingerprints
		(id, access_key_id, instance_id, account_id, expiration, received, sender, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return 0, 0, fmt.Errorf("prepare fingerprint insert: %w", err)
	}
	defer func() { _ = stmt.Close() }()
	now := time.Now()
	for i, fp := range fps {
		// A fingerprint without an expiration is kept as long as instance role
		// credentials last at most (12h), not purged at once.
		exp := fp.Expiration
		if exp.IsZero() {
			exp = now.Add(12 * time.Hour)
		}
		res, err := stmt.ExecContext(ctx, fp.ID, fp.AccessKeyID, fp.Instance.ID, fp.Instance.AccountID, exp.Unix(), now.UnixNano(), sender, string(bodies[i]))
		if err != nil {
			return 0, 0, fmt.Errorf("insert fingerprint %s: %w", fp.ID, err)
		}
		if n, _ := res.RowsAffected(); n == 1 {
			added++
		} else {
			duplicates++
		}
	}
	if err := tx.Commit(); err != nil {
		return 0, 0, fmt.Errorf("commit fingerprints: %w", err)
	}
	return added, duplicates, nil
}

// Purge implements Store.
func (s *SQLite) Purge(ctx context.Context, t time.Time) (int64, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	res, err := s.db.ExecContext(ctx, `DELETE FROM fingerprints WHERE expiration < ?`, t.Unix())
	if err != nil {
		return 0, fmt.Errorf("purge fingerprints: %w", err)
	}
	n, _ := res.RowsAffected()
	return n, nil
}

// Len is the number of stored fingerprints.
func (s *SQLite) Len(ctx context.Context) (int64, error) {
	var n int64
	if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM fingerprints`).Scan(&n); err != nil {
		return 0, fmt.Errorf("count fingerprints: %w", err)
	}
	return n, nil
}

// ByAccessKey implements fpstore.Store. A database error is logged and gives none.
func (s *SQLite) ByAccessKey(accessKeyID string) []wire.Fingerprint {
	var out []wire.Fingerprint
	err := s.scan(func(fp wire.Fingerprint) { out = append(out, fp) },
		`SELECT body FROM fingerprints WHERE access_key_id = ? ORDER BY received, id`, accessKeyID)
	if err != nil {
		s.log.Error().Str("event", "fingerprint_read_failed").Str("access_key_id", accessKeyID).Err(err).Msg("reading fingerprints failed")
	}
	return out
}

// All implements fpstore.Store. A database error is logged and ends the walk.
func (s *SQLite) All(fn func(wire.Fingerprint)) {
	if err := s.scan(fn, `SELECT body FROM fingerprints ORDER BY received, id`); err != nil {
		s.log.Error().Str("event", "fingerprint_read_failed").Err(err).Msg("reading fingerprints failed")
	}
}

func (s *SQLite) scan(fn func(wire.Fingerprint), query string, args ...any) error {
	rows, err := s.db.Query(query, args...)
	if err != nil {
		return fmt.Errorf("query fingerprints: %w", err)
	}
	defer func() { _ = rows.Close() }()
	var fps []wire.Fingerprint
	for rows.Next() {
		var body string
		if err := rows.Scan(&body); err != nil {
			return fmt.Errorf("scan fingerprint: %w", err)
		}
		var fp wire.Fingerprint
		if err := json.Unmarshal([]byte(body), &fp); err != nil {
			return fmt.Errorf("decode stored fingerprint: %w", err)
		}
		fps = append(fps, fp)
	}
	if err := rows.Err(); err != nil && !errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("read fingerprints: %w", err)
	}
	// fn runs after the rows are closed: it may call the store again.
	_ = rows.Close()
	for _, fp := range fps {
		fn(fp)
	}
	return nil
}
