package intake

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/forwarder"
	"github.com/imdsguard/imdsguard/internal/agent/spool"
)

type signedIdentity struct{ doc, p7 string }

func (s signedIdentity) Document(context.Context) (string, string, error) { return s.doc, s.p7, nil }

// TestForwarderToIntake runs the agent's forwarder against the real intake: the intake
// is down for the first request, then every fingerprint arrives once, and a resent
// spool (an agent that lost its acknowledgement) doubles nothing.
func TestForwarderToIntake(t *testing.T) {
	b := newBed(t)
	var calls atomic.Int64
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			http.Error(w, `{"error":"starting"}`, http.StatusServiceUnavailable)
			return
		}
		b.h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	batch := signedBatch(t, awsSigner(t), account, instance)
	id := signedIdentity{batch.Document, batch.PKCS7}

	send := func(n int) *forwarder.Forwarder {
		t.Helper()
		sp, err := spool.Open(filepath.Join(t.TempDir(), "spool"), 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		defer sp.Close()
		for i := 0; i < n; i++ {
			data, _ := json.Marshal(fp(fmt.Sprintf("fw%d", i), instance, account))
			if _, err := sp.Append(data); err != nil {
				t.Fatal(err)
			}
		}
		f, err := forwarder.New(forwarder.Config{URL: srv.URL + "/v1/fingerprints", CAFile: ca, BatchSize: 10,
			MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}, sp, id, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- f.Run(ctx) }()
		deadline := time.Now().Add(20 * time.Second)
		for f.Stats.Sent.Load() < uint64(n) {
			if time.Now().After(deadline) {
				t.Fatalf("forwarder sent %d of %d", f.Stats.Sent.Load(), n)
			}
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		return f
	}
	f := send(25)
	if f.Stats.Failures.Load() < 1 || f.Stats.Discarded.Load() != 0 {
		t.Fatalf("forwarder stats: failures %d discarded %d", f.Stats.Failures.Load(), f.Stats.Discarded.Load())
	}
	if n := b.count(t); n != 25 {
		t.Fatalf("stored %d, want 25", n)
	}
	send(25)
	c := b.h.Counts()
	if n := b.count(t); n != 25 || c.Accepted != 25 || c.Duplicates != 25 {
		t.Fatalf("after resending: stored %d, counts %+v", n, c)
	}
}
