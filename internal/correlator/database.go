package correlator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

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

// ledger is where serve records the findings it published: in the database when
// there is one, so that neither a restart nor a second replica publishes an update
// twice (replicas share it on PostgreSQL: a SQLite file is no place for them to meet).
// Without a database it is in memory.
func ledger(db *store.DB) outputs.Ledger {
	if db != nil {
		return db
	}
	return &outputs.MemoryLedger{}
}

// serveState is what serve keeps in the database after every cycle. The checkpoint
// goes with the detector's snapshot, in one write: after a crash, the files read since
// the last save are read again into the state saved before them, so nothing is
// counted twice or lost (and the ledger keeps their findings from going out twice).
type serveState struct {
	Detector   json.RawMessage              `json:"detector"`
	Checkpoint map[string]map[string]string `json:"checkpoint"`
	Latest     time.Time                    `json:"latest"`
}

const serveStateName = "serve"

func (d *detection) save(ctx context.Context) error {
	if d.state == nil {
		return nil
	}
	var snap bytes.Buffer
	if err := d.det.Snapshot(&snap); err != nil {
		return err
	}
	body, err := json.Marshal(serveState{Detector: snap.Bytes(), Checkpoint: d.checkpoint.Done, Latest: d.latest})
	if err != nil {
		return fmt.Errorf("encode serve state: %w", err)
	}
	// A cycle's state is saved even when shutdown was asked for meanwhile: cutting the
	// write would make a clean stop exit 1 and the next start redo the cycle.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	return d.state.SaveState(ctx, serveStateName, body)
}

func (d *detection) restore(ctx context.Context) error {
	// With a database the checkpoint lives there, saved with the detector's state; a
	// checkpoint file is read once, when the database has no state yet (an upgrade),
	// and no longer written.
	d.checkpoint.InMemory()
	body, err := d.state.LoadState(ctx, serveStateName)
	if err != nil {
		return err
	}
	if body == nil {
		if n := len(d.checkpoint.Done); n > 0 && d.e.cfg.Serve.Checkpoint != "" {
			d.e.log.Info().Str("event", "checkpoint_migrated").Str("file", d.e.cfg.Serve.Checkpoint).
				Msg("checkpoint file read into the database; the file is no longer written")
		}
		return nil
	}
	var st serveState
	if err := json.Unmarshal(body, &st); err != nil {
		return fmt.Errorf("decode serve state: %w", err)
	}
	if err := d.det.Restore(bytes.NewReader(st.Detector)); err != nil {
		return err
	}
	if st.Checkpoint != nil {
		// The database's checkpoint, not the file's: it matches the snapshot.
		d.checkpoint.Done = st.Checkpoint
	}
	d.latest = st.Latest
	d.e.log.Info().Str("event", "state_restored").Int("groups", d.det.Stats().Groups).Time("latest", st.Latest).Msg("detector state restored from the database")
	return nil
}
