package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/imdsguard/imdsguard/internal/wire"
)

func nowNano() int64 { return time.Now().UnixNano() }

// putRequest is one Put waiting for the group commit.
type putRequest struct {
	fps    []wire.Fingerprint
	bodies [][]byte
	sender string
	added  int
	dups   int
	err    error
	done   chan struct{}
}

// Group commit bounds: a commit takes at most this many Puts or fingerprints, and
// waits at most groupWindow for the Puts it expects.
const (
	groupMaxPuts         = 128
	groupMaxFingerprints = 10000
	groupWindow          = time.Millisecond
)

// Put stores fps: all of them or, on error, none. A fingerprint whose id is already
// stored (or repeated in fps) is a duplicate and left as it was. sender says who
// proved the batch. (intake.Store)
//
// Puts that arrive while a commit is under way share the next transaction (group
// commit): one fsync for many agents' batches instead of one each. The commit is
// durable when Put returns.
func (s *DB) Put(ctx context.Context, fps []wire.Fingerprint, sender string) (added, duplicates int, err error) {
	bodies := make([][]byte, len(fps))
	for i, fp := range fps {
		if bodies[i], err = json.Marshal(fp); err != nil {
			return 0, 0, fmt.Errorf("encode fingerprint %s: %w", fp.ID, err)
		}
	}
	return s.PutRaw(ctx, fps, bodies, sender)
}

// PutRaw is Put with each fingerprint's JSON as its sender wrote it (bodies[i] is
// fps[i]'s, and must decode to it): the intake keeps those bytes instead of encoding
// the fingerprints again. (intake.RawStore)
func (s *DB) PutRaw(ctx context.Context, fps []wire.Fingerprint, bodies [][]byte, sender string) (added, duplicates int, err error) {
	if len(bodies) != len(fps) {
		return 0, 0, fmt.Errorf("%d bodies for %d fingerprints", len(bodies), len(fps))
	}
	req := &putRequest{fps: fps, sender: sender, bodies: bodies, done: make(chan struct{})}
	s.startCommitter()
	if s.puts == nil {
		return 0, 0, errClosed
	}
	select {
	case s.puts <- req:
	case <-ctx.Done():
		return 0, 0, ctx.Err()
	case <-s.closed:
		return 0, 0, errClosed
	}
	// Once queued the request is committed or failed whatever ctx does: the caller
	// waits for the answer, so that a stored batch is never reported as lost.
	n := s.waiting.Add(1)
	for p := s.peak.Load(); n > p && !s.peak.CompareAndSwap(p, n); p = s.peak.Load() {
	}
	<-req.done
	s.waiting.Add(-1)
	return req.added, req.dups, req.err
}

var errClosed = errors.New("store is closed")

func (s *DB) startCommitter() {
	s.committerOnce.Do(func() {
		s.puts = make(chan *putRequest, groupMaxPuts)
		s.closed = make(chan struct{})
		s.committerDone = make(chan struct{})
		go func() { defer close(s.committerDone); s.commitLoop() }()
	})
}

// commitLoop takes a Put, then every Put already waiting, and commits them together.
//
// It also waits (at most groupWindow) for as many Puts as were waiting at once during
// the commit before: senders that wait for their answer (batches of 1 from a few
// agents) come back together after a commit, a few hundred microseconds apart, and
// without the wait they pair off, one committed alone while the others queue for the
// next commit. Senders that stop make it wait once, for a window; when no more than
// one Put waits at a time it never waits.
func (s *DB) commitLoop() {
	expected := 1
	for {
		var group []*putRequest
		select {
		case req := <-s.puts:
			group = append(group, req)
		case <-s.closed:
			return
		}
		n := len(group[0].fps)
		var window *time.Timer
	more:
		for len(group) < groupMaxPuts && n < groupMaxFingerprints {
			select {
			case req := <-s.puts:
				group = append(group, req)
				n += len(req.fps)
				continue
			default:
			}
			if len(group) >= expected {
				break
			}
			if window == nil {
				window = time.NewTimer(groupWindow)
			}
			select {
			case req := <-s.puts:
				group = append(group, req)
				n += len(req.fps)
			case <-window.C:
				break more
			case <-s.closed:
				break more
			}
		}
		if window != nil {
			window.Stop()
		}
		s.commitGroup(group)
		// The Puts of this group are answered now: the peak counts them and those
		// that queued meanwhile.
		expected = int(min(max(s.peak.Swap(s.waiting.Load()), 1), groupMaxPuts))
	}
}

// commitGroup stores the group in one transaction. When that fails, each Put is tried
// alone, so that one bad batch fails only its own sender.
func (s *DB) commitGroup(group []*putRequest) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	defer func() {
		for _, r := range group {
			close(r.done)
		}
	}()
	if err := s.insert(ctx, group); err == nil || len(group) == 1 {
		if err != nil {
			group[0].err = err
		}
		return
	}
	for _, r := range group {
		r.added, r.dups = 0, 0
		if err := s.insert(ctx, []*putRequest{r}); err != nil {
			r.err = err
		}
	}
}

func (s *DB) insert(ctx context.Context, group []*putRequest) error {
	if s.driver == Postgres {
		return s.insertArrays(ctx, group)
	}
	defer s.lockWrites()()
	// Most groups hold no fingerprint stored before: counting the rows inserted tells
	// that without RETURNING's rows (a fifth of the insert's cost). A group with a
	// duplicate is inserted again, naming the rows added.
	err := s.insertSQLite(ctx, group, false)
	if errors.Is(err, errDuplicates) {
		err = s.insertSQLite(ctx, group, true)
	}
	return err
}

// errDuplicates: a group inserted without naming the rows added held a duplicate.
var errDuplicates = errors.New("duplicates in the group")

// insertSQLite inserts a group in one transaction. Without returning, a duplicate
// rolls it back with errDuplicates.
func (s *DB) insertSQLite(ctx context.Context, group []*putRequest, returning bool) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin fingerprint transaction: %w", err)
	}
	defer tx.Rollback() // a no-op after Commit
	// Rows go sqliteRowsPerInsert to a statement (one call into SQLite instead of
	// one each); RETURNING names the rows added, as on PostgreSQL.
	type row struct {
		fp   *wire.Fingerprint
		body []byte
		r    *putRequest
	}
	var rows []row
	for _, r := range group {
		for i := range r.fps {
			rows = append(rows, row{&r.fps[i], r.bodies[i], r})
		}
	}
	now := time.Now()
	added := map[string]bool{}
	for start := 0; start < len(rows); start += sqliteRowsPerInsert {
		chunk := rows[start:min(start+sqliteRowsPerInsert, len(rows))]
		args := make([]any, 0, 8*len(chunk))
		for _, rw := range chunk {
			args = append(args, rw.fp.ID, rw.fp.AccessKeyID, rw.fp.Instance.ID, rw.fp.Instance.AccountID, expiration(rw.fp, now).Unix(),
				now.UnixNano(), rw.r.sender, string(rw.body))
		}
		stmt, err := s.sqliteInsertStmt(ctx, len(chunk), returning)
		if err != nil {
			return err
		}
		if returning {
			if err := collectIDs(ctx, stmtQuerier{tx.StmtContext(ctx, stmt)}, "", args, added); err != nil {
				return err
			}
			continue
		}
		res, err := tx.StmtContext(ctx, stmt).ExecContext(ctx, args...)
		if err != nil {
			return fmt.Errorf("insert fingerprints: %w", err)
		}
		if n, err := res.RowsAffected(); err != nil || n != int64(len(chunk)) {
			return errDuplicates
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit fingerprints: %w", err)
	}
	if !returning {
		for _, rw := range rows {
			added[rw.fp.ID] = true
		}
	}
	credit(group, added)
	s.commits.Add(1)
	return nil
}

// sqliteRowsPerInsert: 8 parameters a row stay far below SQLite's 32766.
const sqliteRowsPerInsert = 100

// sqliteInsertStmt returns the prepared insert of n rows: SQLite's parse of a 100-row
// statement costs as much as running it. The caller holds writeMu.
func (s *DB) sqliteInsertStmt(ctx context.Context, n int, returning bool) (*sql.Stmt, error) {
	key := insertKey{n, returning}
	if st := s.inserts[key]; st != nil {
		return st, nil
	}
	st, err := s.db.PrepareContext(ctx, sqliteInsert(n, returning))
	if err != nil {
		return nil, fmt.Errorf("prepare fingerprint insert: %w", err)
	}
	if s.inserts == nil {
		s.inserts = map[insertKey]*sql.Stmt{}
	}
	s.inserts[key] = st
	return st, nil
}

// insertKey names a prepared insert: its rows, and whether it returns the ids added.
type insertKey struct {
	rows      int
	returning bool
}

func sqliteInsert(n int, returning bool) string {
	var b strings.Builder
	b.WriteString(`INSERT INTO fingerprints (id, access_key_id, instance_id, account_id, expiration, received, sender, body) VALUES `)
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString("(?, ?, ?, ?, ?, ?, ?, ?)")
	}
	b.WriteString(` ON CONFLICT (id) DO NOTHING`)
	if returning {
		b.WriteString(` RETURNING id`)
	}
	return b.String()
}

// expiration is when fp may be purged: a fingerprint without an expiration is kept as
// long as instance role credentials last at most (12h), not purged at once.
func expiration(fp *wire.Fingerprint, now time.Time) time.Time {
	if fp.Expiration.IsZero() {
		return now.Add(12 * time.Hour)
	}
	return fp.Expiration
}

// querier runs a query: a *sql.DB, or a prepared *sql.Stmt (stmtQuerier).
type querier interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}

// stmtQuerier is a prepared statement as a querier; the query text is its own.
type stmtQuerier struct{ *sql.Stmt }

func (q stmtQuerier) QueryContext(ctx context.Context, _ string, args ...any) (*sql.Rows, error) {
	return q.Stmt.QueryContext(ctx, args...)
}

// collectIDs runs an INSERT … RETURNING id and adds the ids to added.
func collectIDs(ctx context.Context, q querier, query string, args []any, added map[string]bool) error {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return fmt.Errorf("insert fingerprints: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return fmt.Errorf("read inserted fingerprints: %w", err)
		}
		added[id] = true
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("insert fingerprints: %w", err)
	}
	return nil
}

// credit counts each Put's added and duplicate fingerprints from the ids added: the
// first occurrence of an id gets the credit, as if the Puts had run one after another.
func credit(group []*putRequest, added map[string]bool) {
	for _, r := range group {
		r.added, r.dups = 0, 0
		for _, fp := range r.fps {
			if added[fp.ID] {
				r.added++
				delete(added, fp.ID)
			} else {
				r.dups++
			}
		}
	}
}

// insertArrays stores a group on PostgreSQL in one statement: the rows go as arrays
// (unnest), so a group is one round trip however many fingerprints it holds. The ids
// it returns are the rows added; the first occurrence of an id gets the credit, as if
// the Puts had run one after another.
func (s *DB) insertArrays(ctx context.Context, group []*putRequest) error {
	var ids, keys, instances, accounts, senders, bodies []string
	var exps, recvs []int64
	now := time.Now()
	for _, r := range group {
		for i, fp := range r.fps {
			exp := expiration(&fp, now)
			ids = append(ids, fp.ID)
			keys = append(keys, fp.AccessKeyID)
			instances = append(instances, fp.Instance.ID)
			accounts = append(accounts, fp.Instance.AccountID)
			exps = append(exps, exp.Unix())
			recvs = append(recvs, now.UnixNano())
			senders = append(senders, r.sender)
			bodies = append(bodies, string(r.bodies[i]))
		}
	}
	added := map[string]bool{}
	err := collectIDs(ctx, s.db, `INSERT INTO fingerprints (id, access_key_id, instance_id, account_id, expiration, received, sender, body)
		SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::text[], $8::text[])
		ON CONFLICT (id) DO NOTHING RETURNING id`, []any{ids, keys, instances, accounts, exps, recvs, senders, bodies}, added)
	if err != nil {
		return err
	}
	credit(group, added)
	s.commits.Add(1)
	return nil
}

// Commits is the number of fingerprint transactions committed: with group commit,
// fewer than the Puts.
func (s *DB) Commits() int64 { return s.commits.Load() }

// Purge removes fingerprints that expired before t, and says how many. (intake.Store)
func (s *DB) Purge(ctx context.Context, t time.Time) (int64, error) {
	defer s.lockWrites()()
	res, err := s.db.ExecContext(ctx, s.q(`DELETE FROM fingerprints WHERE expiration < ?`), t.Unix())
	if err != nil {
		return 0, fmt.Errorf("purge fingerprints: %w", err)
	}
	n, _ := res.RowsAffected()
	return n, nil
}

// Len is the number of stored fingerprints.
func (s *DB) Len(ctx context.Context) (int64, error) {
	var n int64
	if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM fingerprints`).Scan(&n); err != nil {
		return 0, fmt.Errorf("count fingerprints: %w", err)
	}
	return n, nil
}

// ByAccessKey implements fpstore.Store. A database error is logged and gives none.
func (s *DB) ByAccessKey(accessKeyID string) []wire.Fingerprint {
	var out []wire.Fingerprint
	err := s.scan(func(fp wire.Fingerprint) { out = append(out, fp) },
		`SELECT body FROM fingerprints WHERE access_key_id = ? ORDER BY received, id`, accessKeyID)
	if err != nil {
		s.log.Error().Str("event", "fingerprint_read_failed").Str("access_key_id", accessKeyID).Err(err).Msg("reading fingerprints failed")
	}
	return out
}

// All implements fpstore.Store. A database error is logged and ends the walk.
func (s *DB) All(fn func(wire.Fingerprint)) {
	if err := s.scan(fn, `SELECT body FROM fingerprints ORDER BY received, id`); err != nil {
		s.log.Error().Str("event", "fingerprint_read_failed").Err(err).Msg("reading fingerprints failed")
	}
}

func (s *DB) scan(fn func(wire.Fingerprint), query string, args ...any) error {
	rows, err := s.db.Query(s.q(query), args...)
	if err != nil {
		return fmt.Errorf("query fingerprints: %w", err)
	}
	defer rows.Close()
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
	rows.Close()
	for _, fp := range fps {
		fn(fp)
	}
	return nil
}
