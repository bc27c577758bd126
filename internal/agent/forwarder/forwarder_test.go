package forwarder

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/spool"
	"github.com/imdsguard/imdsguard/internal/wire"
)

type fixedIdentity struct{}

func (fixedIdentity) Document(context.Context) (string, string, error) {
	return `{"instanceId":"i-1","accountId":"123456789012"}`, "MIIBsig", nil
}

// correlator stands in for the intake: it fails the first failures requests, then
// stores fingerprints idempotently by id.
type correlator struct {
	mu       sync.Mutex
	failures int
	status   int
	got      map[string]int
	requests int
}

func (c *correlator) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.requests++
	if c.failures > 0 {
		c.failures--
		http.Error(w, `{"error":"down"}`, http.StatusServiceUnavailable)
		return
	}
	if c.status != 0 {
		http.Error(w, `{"error":"no"}`, c.status)
		return
	}
	var req wire.Batch
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil || req.Document == "" || req.PKCS7 == "" || req.BatchID == "" {
		http.Error(w, `{"error":"bad"}`, http.StatusBadRequest)
		return
	}
	for _, fp := range req.Fingerprints {
		c.got[fp.ID]++
	}
	fmt.Fprintf(w, `{"accepted":%d,"duplicates":0}`, len(req.Fingerprints))
}

func setup(t *testing.T, c *correlator, n int) (*Forwarder, *spool.Spool) {
	t.Helper()
	srv := httptest.NewTLSServer(c)
	t.Cleanup(srv.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600)
	sp, err := spool.Open(filepath.Join(t.TempDir(), "spool"), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		sp.Append([]byte(fmt.Sprintf(`{"id":"fp-%d","access_key_id":"ASIA%d"}`, i, i)))
	}
	f, err := New(Config{URL: srv.URL + "/v1/fingerprints", CAFile: ca, BatchSize: 10,
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}, sp, fixedIdentity{}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	return f, sp
}

func runUntil(t *testing.T, f *Forwarder, done func() bool) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { f.Run(ctx); close(stopped) }()
	deadline := time.After(10 * time.Second)
	for !done() {
		select {
		case <-deadline:
			cancel()
			t.Fatal("forwarder did not finish")
		case <-time.After(10 * time.Millisecond):
		}
	}
	cancel()
	<-stopped
}

func TestRetriesUntilTakenExactlyOnce(t *testing.T) {
	c := &correlator{failures: 3, got: map[string]int{}}
	f, sp := setup(t, c, 35)
	runUntil(t, f, func() bool { return f.Stats.Sent.Load() == 35 })
	for i := 0; i < 35; i++ {
		if n := c.got[fmt.Sprintf("fp-%d", i)]; n != 1 {
			t.Errorf("fp-%d arrived %d times", i, n)
		}
	}
	if f.Stats.Failures.Load() != 3 {
		t.Errorf("failures %d, want 3", f.Stats.Failures.Load())
	}
	if recs, _ := sp.Peek(100); len(recs) != 0 {
		t.Errorf("%d fingerprints left in the spool", len(recs))
	}
}

func TestMalformedBatchIsSetAside(t *testing.T) {
	c := &correlator{status: http.StatusBadRequest, got: map[string]int{}}
	f, sp := setup(t, c, 5)
	runUntil(t, f, func() bool { return f.Stats.Discarded.Load() == 5 })
	if recs, _ := sp.Peek(100); len(recs) != 0 {
		t.Error("a refused batch blocks the spool")
	}
}

func TestUnauthorizedIsRetried(t *testing.T) {
	c := &correlator{status: http.StatusForbidden, got: map[string]int{}}
	f, sp := setup(t, c, 5)
	runUntil(t, f, func() bool { return f.Stats.Failures.Load() >= 2 })
	if recs, _ := sp.Peek(100); len(recs) != 5 {
		t.Errorf("a 403 lost fingerprints: %d left", len(recs))
	}
}

func TestInstanceFilledFromDocument(t *testing.T) {
	fp := withInstance(wire.Fingerprint{ID: "a"},
		`{"instanceId":"i-9","accountId":"123456789012","region":"eu-west-1","availabilityZone":"eu-west-1a"}`)
	if fp.ID != "a" || fp.Instance.ID != "i-9" || fp.Instance.AccountID != "123456789012" {
		t.Fatalf("filled %+v", fp)
	}
	// A fingerprint that knows its instance is sent as it is.
	known := wire.Fingerprint{ID: "b", Instance: wire.Instance{ID: "i-1"}}
	if got := withInstance(known, `{"instanceId":"i-9"}`); got.Instance.ID != "i-1" {
		t.Fatalf("rewrote %+v", got)
	}
}
