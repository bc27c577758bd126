package intake

import (
	"context"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/fpstore"
	"github.com/imdsguard/imdsguard/internal/correlator/store"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// Store is where accepted fingerprints are kept. It is a fpstore.Store, so the
// detector reads it directly. store.DB implements it on SQLite (one correlator, the
// default) and on PostgreSQL (replicas sharing one database: INSERT ... ON CONFLICT
// (id) DO NOTHING, and a purge that any replica may run).
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

// RawStore is a Store that also takes each fingerprint's JSON as the sender wrote it
// (bodies[i] is fps[i]'s), to keep without encoding it again.
type RawStore interface {
	PutRaw(ctx context.Context, fps []wire.Fingerprint, bodies [][]byte, sender string) (added, duplicates int, err error)
}

// SQLite is the embedded default Store: the correlator's database (package store) on
// SQLite. PostgreSQL, for several replicas, is the same type opened with store.Open.
type SQLite = store.DB

// OpenSQLite opens (creating and migrating if needed) the SQLite database at path.
// Errors of the read methods that fpstore.Store cannot return are logged to log.
func OpenSQLite(path string, log zerolog.Logger) (*SQLite, error) {
	return store.Open(context.Background(), store.SQLite, path, log)
}
