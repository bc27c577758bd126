package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// SaveState replaces the state saved under name.
func (s *DB) SaveState(ctx context.Context, name string, body []byte) error {
	defer s.lockWrites()()
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO serve_state (name, body, saved_at) VALUES (?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET body = excluded.body, saved_at = excluded.saved_at`), name, string(body), nowNano())
	if err != nil {
		return fmt.Errorf("save state %s: %w", name, err)
	}
	return nil
}

// LoadState returns the state saved under name, or nil when there is none.
func (s *DB) LoadState(ctx context.Context, name string) ([]byte, error) {
	var body string
	err := s.db.QueryRowContext(ctx, s.q(`SELECT body FROM serve_state WHERE name = ?`), name).Scan(&body)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load state %s: %w", name, err)
	}
	return []byte(body), nil
}
