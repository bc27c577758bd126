package store

import (
	"context"
	"database/sql"
	"fmt"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// StateTurn is one replica's turn at the detector state that replicas share: a
// transaction that holds the state's lock (an advisory lock on PostgreSQL; the writer
// lock on SQLite) until Commit or Rollback. In one turn a replica catches up with the
// deltas the others appended, appends its own, claims the findings they make together
// and commits all of it at once: a delta is in the state if and only if its findings
// were claimed.
type StateTurn struct {
	s      *DB
	tx     *sql.Tx
	unlock func()
	ended  bool
}

// Delta is one appended delta.
type Delta struct {
	Seq  int64
	Body []byte
}

// stateLockID is the advisory lock of the shared detector state (migrations take
// 7243100).
const stateLockID = 7243101

// TakeStateTurn waits for the shared state's lock and returns the turn.
func (s *DB) TakeStateTurn(ctx context.Context) (*StateTurn, error) {
	unlock := s.lockWrites()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		unlock()
		return nil, fmt.Errorf("begin state turn: %w", err)
	}
	if s.driver == Postgres {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, stateLockID); err != nil {
			_ = tx.Rollback() // the lock's error is the one to report
			unlock()
			return nil, fmt.Errorf("lock shared state: %w", err)
		}
	}
	return &StateTurn{s: s, tx: tx, unlock: unlock}, nil
}

// BaseSeq is the last delta the base includes.
func (t *StateTurn) BaseSeq(ctx context.Context) (int64, error) {
	var seq int64
	if err := t.tx.QueryRowContext(ctx, `SELECT seq FROM detector_base WHERE id = 1`).Scan(&seq); err != nil {
		return 0, fmt.Errorf("read shared state base: %w", err)
	}
	return seq, nil
}

// Base returns the base snapshot and the last delta it includes; body is empty
// before the first compaction.
func (t *StateTurn) Base(ctx context.Context) (seq int64, body []byte, err error) {
	var b string
	if err := t.tx.QueryRowContext(ctx, `SELECT seq, body FROM detector_base WHERE id = 1`).Scan(&seq, &b); err != nil {
		return 0, nil, fmt.Errorf("read shared state base: %w", err)
	}
	return seq, []byte(b), nil
}

// DeltasAfter returns the deltas after seq, oldest first.
func (t *StateTurn) DeltasAfter(ctx context.Context, seq int64) ([]Delta, error) {
	rows, err := t.tx.QueryContext(ctx, t.s.q(`SELECT seq, body FROM detector_deltas WHERE seq > ? ORDER BY seq`), seq)
	if err != nil {
		return nil, fmt.Errorf("read shared state deltas: %w", err)
	}
	defer rows.Close()
	var out []Delta
	for rows.Next() {
		var d Delta
		var body string
		if err := rows.Scan(&d.Seq, &body); err != nil {
			return nil, fmt.Errorf("read shared state delta: %w", err)
		}
		d.Body = []byte(body)
		out = append(out, d)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read shared state deltas: %w", err)
	}
	return out, nil
}

// Append adds a delta and returns its seq, the next after every delta so far (the
// lock makes the numbering race-free).
func (t *StateTurn) Append(ctx context.Context, body []byte) (int64, error) {
	var seq int64
	err := t.tx.QueryRowContext(ctx, `SELECT max(seq) FROM (SELECT seq FROM detector_base UNION ALL SELECT seq FROM detector_deltas) AS s`).Scan(&seq)
	if err != nil {
		return 0, fmt.Errorf("number shared state delta: %w", err)
	}
	seq++
	if _, err := t.tx.ExecContext(ctx, t.s.q(`INSERT INTO detector_deltas (seq, body, saved_at) VALUES (?, ?, ?)`), seq, string(body), nowNano()); err != nil {
		return 0, fmt.Errorf("append shared state delta: %w", err)
	}
	return seq, nil
}

// Compact makes body (a snapshot including every delta up to seq) the base and drops
// those deltas.
func (t *StateTurn) Compact(ctx context.Context, seq int64, body []byte) error {
	if _, err := t.tx.ExecContext(ctx, t.s.q(`UPDATE detector_base SET seq = ?, body = ?, saved_at = ? WHERE id = 1`), seq, string(body), nowNano()); err != nil {
		return fmt.Errorf("compact shared state: %w", err)
	}
	if _, err := t.tx.ExecContext(ctx, t.s.q(`DELETE FROM detector_deltas WHERE seq <= ?`), seq); err != nil {
		return fmt.Errorf("compact shared state: %w", err)
	}
	return nil
}

// Claim is DB.Claim inside the turn: the claims commit with the delta.
func (t *StateTurn) Claim(ctx context.Context, fs []detector.Finding) ([]detector.Finding, error) {
	return t.s.claim(ctx, t.tx, fs)
}

// Commit ends the turn, making what it wrote durable.
func (t *StateTurn) Commit() error {
	t.ended = true
	defer t.unlock()
	if err := t.tx.Commit(); err != nil {
		return fmt.Errorf("commit state turn: %w", err)
	}
	return nil
}

// Rollback ends the turn without writing; after Commit it does nothing.
func (t *StateTurn) Rollback() {
	if t.ended {
		return
	}
	t.ended = true
	_ = t.tx.Rollback() // a broken connection's transaction is gone anyway
	t.unlock()
}
