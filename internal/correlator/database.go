package correlator

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/imdsguard/imdsguard/internal/correlator/outputs"
	"github.com/imdsguard/imdsguard/internal/correlator/store"
)

// openStore opens the configured database, or returns nil when serve needs none: no
// intake and no store.dsn.
func openStore(ctx context.Context, e *env) (*store.DB, error) {
	c := e.cfg.Store
	dsn := c.DSN
	if c.Driver == store.SQLite && dsn == "" {
		dsn = e.cfg.Intake.Database
	}
	if dsn == "" {
		return nil, nil
	}
	if c.Driver == store.SQLite {
		if err := os.MkdirAll(filepath.Dir(dsn), 0o700); err != nil {
			return nil, fmt.Errorf("create database directory: %w", err)
		}
	}
	db, err := store.Open(ctx, c.Driver, dsn, e.log)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	return db, nil
}

// ledger is where serve records the findings it published. On PostgreSQL it is the
// shared table, so replicas publish each update once between them. Otherwise it is
// in memory: the detector's windows do not survive a restart yet, and a ledger that
// did would mute a finding detected again after one.
func ledger(db *store.DB) outputs.Ledger {
	if db != nil && db.Driver() == store.Postgres {
		return db
	}
	return &outputs.MemoryLedger{}
}
