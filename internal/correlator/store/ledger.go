package store

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// Claim records fs as published and returns those whose (id, count) no one had
// claimed before: an outputs.Ledger shared by every replica on the database. One
// transaction claims them all; a finding two replicas see at the same count is
// claimed by one of them only, because the row is written only when the stored count
// is lower. The claim is made before delivery: a replica that dies between the two
// loses that update rather than letting a second replica send it again (at most once).
func (s *DB) Claim(ctx context.Context, fs []detector.Finding) ([]detector.Finding, error) {
	if len(fs) == 0 {
		return nil, nil
	}
	defer s.lockWrites()()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("begin claim: %w", err)
	}
	defer tx.Rollback()
	out, err := s.claim(ctx, tx, fs)
	if err != nil {
		return nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("commit claim: %w", err)
	}
	return out, nil
}

// claim is Claim inside tx.
func (s *DB) claim(ctx context.Context, tx *sql.Tx, fs []detector.Finding) ([]detector.Finding, error) {
	if len(fs) == 0 {
		return nil, nil
	}
	// The same order in every replica: two claims that overlap wait for each other
	// instead of deadlocking.
	sorted := slices.Clone(fs)
	slices.SortFunc(sorted, func(a, b detector.Finding) int { return strings.Compare(a.ID, b.ID) })
	stmt, err := tx.PrepareContext(ctx, s.q(`INSERT INTO published_findings (finding_id, count, window_start, published_at) VALUES (?, ?, ?, ?)
		ON CONFLICT (finding_id) DO UPDATE SET count = excluded.count, published_at = excluded.published_at
		WHERE published_findings.count < excluded.count`))
	if err != nil {
		return nil, fmt.Errorf("prepare claim: %w", err)
	}
	defer stmt.Close()
	claimed := map[string]bool{}
	now := time.Now().UnixNano()
	for _, f := range sorted {
		res, err := stmt.ExecContext(ctx, f.ID, f.Count, f.WindowStart.UnixNano(), now)
		if err != nil {
			return nil, fmt.Errorf("claim finding %s: %w", f.ID, err)
		}
		if n, _ := res.RowsAffected(); n == 1 {
			claimed[f.ID] = true
		}
	}
	var out []detector.Finding
	for _, f := range fs {
		if claimed[f.ID] {
			out = append(out, f)
			delete(claimed, f.ID) // a finding repeated in fs goes out once
		}
	}
	return out, nil
}

// LedgerRetention is how long a published finding stays in the ledger at least, after
// its last publication. The replica that forgets is not the only one that may still
// hold the finding: another, reading older log files (SQS hands them out in any
// order), may report it a while later and must still find it claimed.
const LedgerRetention = 24 * time.Hour

// Forget drops the findings whose window started before t and that were last
// published more than LedgerRetention ago (outputs.Ledger).
func (s *DB) Forget(ctx context.Context, before time.Time) error {
	return s.forget(ctx, before, time.Now().Add(-LedgerRetention))
}

func (s *DB) forget(ctx context.Context, before, publishedBefore time.Time) error {
	defer s.lockWrites()()
	if _, err := s.db.ExecContext(ctx, s.q(`DELETE FROM published_findings WHERE window_start < ? AND published_at < ?`),
		before.UnixNano(), publishedBefore.UnixNano()); err != nil {
		return fmt.Errorf("forget published findings: %w", err)
	}
	return nil
}
