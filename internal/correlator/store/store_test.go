package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/testing/pgtest"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// pg is the PostgreSQL every test of this binary shares (each gets its own database).
var pg *pgtest.Server

func TestMain(m *testing.M) {
	var err error
	pg, err = pgtest.Start()
	if err != nil {
		// make test installs postgresql (TEST_DEPS); a laptop without it runs SQLite only.
		if !errors.Is(err, pgtest.ErrNoPostgres) || os.Getenv("IMDSGUARD_PRIVILEGED") == "1" {
			fmt.Fprintln(os.Stderr, "start postgres:", err)
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "postgres tests skipped:", err)
	}
	code := m.Run()
	if pg != nil {
		if err := pg.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stop postgres:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// engines runs fn against SQLite and against PostgreSQL; open opens another handle
// on the same database (another replica).
func engines(t *testing.T, fn func(t *testing.T, open func() *DB)) {
	t.Run("sqlite", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "c.db")
		fn(t, func() *DB { return openT(t, SQLite, path) })
	})
	t.Run("postgres", func(t *testing.T) {
		if pg == nil {
			t.Skip("no PostgreSQL installed")
		}
		dsn, err := pg.NewDatabase(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		fn(t, func() *DB { return openT(t, Postgres, dsn) })
	})
}

func openT(t *testing.T, driver, dsn string) *DB {
	t.Helper()
	db, err := Open(context.Background(), driver, dsn, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func TestMigrationsOnceEvenWhenReplicasStartTogether(t *testing.T) {
	engines(t, func(t *testing.T, open func() *DB) {
		var wg sync.WaitGroup
		dbs := make([]*DB, 4)
		for i := range dbs {
			wg.Add(1)
			go func() { defer wg.Done(); dbs[i] = open() }()
		}
		wg.Wait()
		for _, db := range dbs {
			if db == nil {
				t.FailNow()
			}
		}
		v, err := dbs[0].Version(context.Background())
		if err != nil || v != len(migrations) {
			t.Fatalf("version %d, %v", v, err)
		}
		var n int
		dbs[0].db.QueryRow(`SELECT count(*) FROM schema_migrations`).Scan(&n)
		if n != len(migrations) {
			t.Fatalf("%d migrations recorded", n)
		}
	})
}

func TestFingerprints(t *testing.T) {
	engines(t, func(t *testing.T, open func() *DB) {
		db := open()
		ctx := context.Background()
		exp := time.Now().Add(time.Hour).Truncate(time.Second)
		fps := []wire.Fingerprint{
			{ID: "a", AccessKeyID: "ASIA1", Expiration: exp, Instance: wire.Instance{ID: "i-1", AccountID: "111111111111"}},
			{ID: "b", AccessKeyID: "ASIA1", Expiration: time.Now().Add(-time.Hour), Instance: wire.Instance{ID: "i-1", AccountID: "111111111111"}},
			{ID: "a", AccessKeyID: "ASIA1"},
		}
		added, dups, err := db.Put(ctx, fps, "instance:x")
		if err != nil || added != 2 || dups != 1 {
			t.Fatalf("put: %d %d %v", added, dups, err)
		}
		// One stored before, one new: the insert that counts rows finds the duplicate
		// and names the rows added instead.
		added, dups, err = db.Put(ctx, []wire.Fingerprint{{ID: "c", AccessKeyID: "ASIA2"}, {ID: "b", AccessKeyID: "ASIA1"}}, "instance:x")
		if err != nil || added != 1 || dups != 1 {
			t.Fatalf("put again: %d %d %v", added, dups, err)
		}
		if got := db.ByAccessKey("ASIA2"); len(got) != 1 {
			t.Fatalf("new fingerprint of a batch with a duplicate: %+v", got)
		}
		if _, err := db.SQL().Exec(`DELETE FROM fingerprints WHERE id = 'c'`); err != nil {
			t.Fatal(err)
		}
		if got := db.ByAccessKey("ASIA1"); len(got) != 2 || got[0].ID != "a" || !got[0].Expiration.Equal(exp) {
			t.Fatalf("%+v", got)
		}
		if n, err := db.Purge(ctx, time.Now()); err != nil || n != 1 {
			t.Fatalf("purge %d %v", n, err)
		}
		if n, _ := db.Len(ctx); n != 1 {
			t.Fatalf("len %d", n)
		}
	})
}

func findings(n int, count int64) []detector.Finding {
	w := time.Date(2026, 11, 20, 10, 0, 0, 0, time.UTC)
	var fs []detector.Finding
	for i := range n {
		fs = append(fs, detector.Finding{ID: fmt.Sprintf("f%03d", i), Count: count, WindowStart: w.Add(time.Duration(i%3) * time.Hour)})
	}
	return fs
}

// Two replicas claim the same findings at the same time, over and over: each update of
// each finding is claimed exactly once between them.
func TestClaimOnceAcrossReplicas(t *testing.T) {
	engines(t, func(t *testing.T, open func() *DB) {
		ctx := context.Background()
		replicas := []*DB{open(), open()}
		var mu sync.Mutex
		got := map[string]int{}
		var wg sync.WaitGroup
		for _, db := range replicas {
			for count := int64(1); count <= 5; count++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					out, err := db.Claim(ctx, findings(40, count))
					if err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					defer mu.Unlock()
					for _, f := range out {
						got[fmt.Sprintf("%s/%d", f.ID, f.Count)]++
					}
				}()
			}
		}
		wg.Wait()
		// Claims at lower counts may lose to a higher one that came first; what
		// matters is no update twice, and the highest count of each claimed.
		for k, n := range got {
			if n != 1 {
				t.Errorf("%s claimed %d times", k, n)
			}
		}
		for _, f := range findings(40, 5) {
			if got[f.ID+"/5"] != 1 {
				t.Errorf("%s/5 never claimed", f.ID)
			}
		}
		// Nothing new: nothing claimed; a grown count: claimed again, by one.
		if out, _ := replicas[1].Claim(ctx, findings(40, 5)); len(out) != 0 {
			t.Fatalf("claimed again: %d", len(out))
		}
		if out, _ := replicas[0].Claim(ctx, findings(40, 6)); len(out) != 40 {
			t.Fatalf("grown counts: %d claimed", len(out))
		}
		// Forgetting the first window keeps what was published lately: another
		// replica may still hold those findings.
		w0 := findings(1, 0)[0].WindowStart.Add(time.Minute)
		if err := replicas[1].Forget(ctx, w0); err != nil {
			t.Fatal(err)
		}
		if out, _ := replicas[0].Claim(ctx, findings(40, 6)); len(out) != 0 {
			t.Fatalf("claimed again after a fresh forget: %d", len(out))
		}
		// Past the retention, they go, and may be claimed anew.
		if err := replicas[1].forget(ctx, w0, time.Now().Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
		if out, _ := replicas[0].Claim(ctx, findings(40, 6)); len(out) != 14 {
			t.Fatalf("after forget: %d claimed", len(out))
		}
	})
}

// The database restarts under a replica: its next calls succeed on new connections.
func TestPostgresRestart(t *testing.T) {
	if pg == nil {
		t.Skip("no PostgreSQL installed")
	}
	ctx := context.Background()
	dsn, err := pg.NewDatabase(ctx)
	if err != nil {
		t.Fatal(err)
	}
	db := openT(t, Postgres, dsn)
	if out, err := db.Claim(ctx, findings(3, 1)); err != nil || len(out) != 3 {
		t.Fatalf("%d %v", len(out), err)
	}
	if err := pg.Restart(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := db.Claim(ctx, findings(3, 2))
		if err == nil {
			if len(out) != 3 {
				t.Fatalf("after restart: %d claimed", len(out))
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no claim after restart: %v\n%s", err, pg.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if out, _ := db.Claim(ctx, findings(3, 2)); len(out) != 0 {
		t.Fatalf("claimed twice across the restart: %d", len(out))
	}
}

// Puts that wait while a commit is under way share the next transaction; a batch that
// cannot be stored fails alone.
func TestGroupCommit(t *testing.T) {
	db := openT(t, SQLite, filepath.Join(t.TempDir(), "c.db"))
	ctx := context.Background()
	if _, err := db.SQL().Exec(`CREATE TRIGGER refuse_bad BEFORE INSERT ON fingerprints WHEN NEW.id = 'bad' BEGIN SELECT RAISE(ABORT, 'injected'); END`); err != nil {
		t.Fatal(err)
	}
	// round holds the writer until every Put has been handed to the committer, so
	// that they can only be committed in at most two groups.
	round := func(ids ...string) (failed int) {
		errs := make(chan error, len(ids))
		db.writeMu.Lock()
		for _, id := range ids {
			go func() {
				_, _, err := db.Put(ctx, []wire.Fingerprint{{ID: id, AccessKeyID: "ASIA" + id}}, "x")
				errs <- err
			}()
		}
		for db.waiting.Load() != int64(len(ids)) {
			time.Sleep(time.Millisecond)
		}
		db.writeMu.Unlock()
		for range ids {
			if err := <-errs; err != nil {
				if !strings.Contains(err.Error(), "injected") {
					t.Fatal(err)
				}
				failed++
			}
		}
		return failed
	}
	var ids []string
	for i := range 20 {
		ids = append(ids, fmt.Sprint("p", i))
	}
	if failed := round(ids...); failed != 0 || db.Commits() > 2 {
		t.Fatalf("20 puts: %d failed, %d commits", failed, db.Commits())
	}
	ids[7] = "bad"
	for i := range ids {
		ids[i] = strings.Replace(ids[i], "p", "q", 1)
	}
	if failed := round(ids...); failed != 1 {
		t.Fatalf("%d puts failed, want the bad one only", failed)
	}
	if n, _ := db.Len(ctx); n != 39 {
		t.Fatalf("stored %d, want 39", n)
	}
}

func TestState(t *testing.T) {
	engines(t, func(t *testing.T, open func() *DB) {
		db := open()
		ctx := context.Background()
		if b, err := db.LoadState(ctx, "serve"); err != nil || b != nil {
			t.Fatalf("%q %v", b, err)
		}
		for _, body := range []string{`{"a":1}`, `{"a":2}`} {
			if err := db.SaveState(ctx, "serve", []byte(body)); err != nil {
				t.Fatal(err)
			}
		}
		if b, err := open().LoadState(ctx, "serve"); err != nil || string(b) != `{"a":2}` {
			t.Fatalf("%q %v", b, err)
		}
	})
}

// Replicas taking turns at the shared state number their deltas without gaps or
// repeats; a compacted base replaces the deltas it includes; a turn rolled back leaves
// neither its delta nor its claims.
func TestStateTurns(t *testing.T) {
	engines(t, func(t *testing.T, open func() *DB) {
		ctx := context.Background()
		replicas := []*DB{open(), open()}
		var wg sync.WaitGroup
		for i, db := range replicas {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := range 10 {
					turn, err := db.TakeStateTurn(ctx)
					if err != nil {
						t.Error(err)
						return
					}
					if _, err := turn.Append(ctx, []byte(fmt.Sprintf("r%d-%d", i, j))); err != nil {
						t.Error(err)
					}
					if err := turn.Commit(); err != nil {
						t.Error(err)
					}
				}
			}()
		}
		wg.Wait()
		turn, err := replicas[0].TakeStateTurn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ds, err := turn.DeltasAfter(ctx, 0)
		if err != nil || len(ds) != 20 || ds[0].Seq != 1 || ds[19].Seq != 20 {
			t.Fatalf("%d deltas %v", len(ds), err)
		}
		if err := turn.Compact(ctx, 15, []byte("base")); err != nil {
			t.Fatal(err)
		}
		if err := turn.Commit(); err != nil {
			t.Fatal(err)
		}
		turn, _ = replicas[1].TakeStateTurn(ctx)
		seq, body, err := turn.Base(ctx)
		if err != nil || seq != 15 || string(body) != "base" {
			t.Fatalf("base %d %q %v", seq, body, err)
		}
		if ds, _ := turn.DeltasAfter(ctx, 0); len(ds) != 5 {
			t.Fatalf("%d deltas after compaction", len(ds))
		}
		if seq, err := turn.Append(ctx, []byte("x")); err != nil || seq != 21 {
			t.Fatalf("seq %d %v", seq, err)
		}
		if out, err := turn.Claim(ctx, findings(2, 1)); err != nil || len(out) != 2 {
			t.Fatalf("claim %d %v", len(out), err)
		}
		turn.Rollback()
		turn.Rollback()
		turn, _ = replicas[0].TakeStateTurn(ctx)
		defer turn.Rollback()
		if ds, _ := turn.DeltasAfter(ctx, 0); len(ds) != 5 {
			t.Fatalf("rolled-back delta kept: %d", len(ds))
		}
		if out, err := turn.Claim(ctx, findings(2, 1)); err != nil || len(out) != 2 {
			t.Fatalf("rolled-back claims kept: %d %v", len(out), err)
		}
	})
}

// PutRaw keeps each fingerprint's JSON as its sender wrote it.
func TestPutRawKeepsTheSendersBytes(t *testing.T) {
	engines(t, func(t *testing.T, open func() *DB) {
		db := open()
		ctx := context.Background()
		body := []byte(`{ "id": "r1",  "access_key_id": "ASIARAW" }`)
		fps := []wire.Fingerprint{{ID: "r1", AccessKeyID: "ASIARAW"}}
		if added, _, err := db.PutRaw(ctx, fps, [][]byte{body}, "x"); err != nil || added != 1 {
			t.Fatalf("%d %v", added, err)
		}
		var got string
		if err := db.SQL().QueryRow(`SELECT body FROM fingerprints WHERE id = 'r1'`).Scan(&got); err != nil || got != string(body) {
			t.Fatalf("%q %v", got, err)
		}
		if fps := db.ByAccessKey("ASIARAW"); len(fps) != 1 || fps[0].ID != "r1" {
			t.Fatalf("%+v", fps)
		}
		if _, _, err := db.PutRaw(ctx, fps, nil, "x"); err == nil {
			t.Fatal("bodies missing: no error")
		}
	})
}

// Every SQLite connection commits durably: WAL with synchronous=FULL (a batch the
// intake acknowledged survives a power loss), on each connection of the pool, also
// the ones opened while others are busy.
func TestSQLiteDurability(t *testing.T) {
	s := openT(t, SQLite, filepath.Join(t.TempDir(), "c.db"))
	ctx := context.Background()
	conns := make([]*sql.Conn, 3)
	for i := range conns {
		c, err := s.SQL().Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	for i, c := range conns {
		var mode string
		var sync int
		if err := c.QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&mode); err != nil {
			t.Fatal(err)
		}
		if err := c.QueryRowContext(ctx, `PRAGMA synchronous`).Scan(&sync); err != nil {
			t.Fatal(err)
		}
		if mode != "wal" || sync != 2 {
			t.Errorf("connection %d: journal_mode %s, synchronous %d; want wal, 2 (FULL)", i, mode, sync)
		}
	}
}

// The objects read are recorded in the turn: a second turn recording the same object
// (bucket, key and ETag) learns that it was, another ETag is another object, and
// ObjectRead sees what a committed turn recorded and nothing of a rolled-back one.
func TestObjectsRead(t *testing.T) {
	engines(t, func(t *testing.T, open func() *DB) {
		s := open()
		ctx := context.Background()
		a := Object{Bucket: "trail", Key: "k1", ETag: `"e1"`}
		b := Object{Bucket: "trail", Key: "k1", ETag: `"e2"`}
		turn, err := s.TakeStateTurn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if already, err := turn.RecordObjects(ctx, []Object{a}); err != nil || len(already) != 0 {
			t.Fatalf("first record: %v %v", already, err)
		}
		if err := turn.Commit(); err != nil {
			t.Fatal(err)
		}
		turn, err = s.TakeStateTurn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		already, err := turn.RecordObjects(ctx, []Object{b, a})
		if err != nil || len(already) != 1 || already[0] != a {
			t.Fatalf("second record: %v %v", already, err)
		}
		turn.Rollback()
		if read, err := s.ObjectRead(ctx, a); err != nil || !read {
			t.Errorf("committed object: read %v, %v", read, err)
		}
		if read, err := s.ObjectRead(ctx, b); err != nil || read {
			t.Errorf("rolled-back object: read %v, %v", read, err)
		}
	})
}
