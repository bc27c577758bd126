package intake

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
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

// noIdentity is a host that cannot read IMDS.
type noIdentity struct{ asked atomic.Int64 }

func (n *noIdentity) Document(context.Context) (string, string, error) {
	n.asked.Add(1)
	return "", "", fmt.Errorf("no IMDS on this host")
}

// TestForwarderMTLSOnly: a host that is no EC2 instance sends with a real TLS client
// certificate to an intake that checks no identity documents (client_ca only). Every
// fingerprint arrives, the sender is the certificate's subject, and IMDS is never asked.
func TestForwarderMTLSOnly(t *testing.T) {
	store, err := OpenSQLite(filepath.Join(t.TempDir(), "fp.db"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	h := NewHandler(Options{Store: store, Log: zerolog.Nop()})
	f := makeTLS(t)
	srv, err := NewServer(ServerConfig{Listen: "127.0.0.1:0", TLSCert: f.serverCert, TLSKey: f.serverKey, ClientCA: f.ca, PurgeGrace: time.Hour}, h, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	// The client certificate and key as files, the way the agent's config names them.
	certPath, keyPath := filepath.Join(f.dir, "client.pem"), filepath.Join(f.dir, "client.key")
	kder, err := x509.MarshalPKCS8PrivateKey(f.client.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.client.Certificate[0]}), 0o600)
	os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600)

	sp, err := spool.Open(filepath.Join(t.TempDir(), "spool"), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	for i := range 15 {
		data, _ := json.Marshal(fp(fmt.Sprintf("mtls%d", i), "mi-0123456789abcdef0", ""))
		if _, err := sp.Append(data); err != nil {
			t.Fatal(err)
		}
	}
	id := &noIdentity{}
	fw, err := forwarder.New(forwarder.Config{URL: "https://" + ln.Addr().String() + "/v1/fingerprints", CAFile: f.ca,
		ClientCert: certPath, ClientKey: keyPath, BatchSize: 10, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond},
		sp, id, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	fctx, fcancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- fw.Run(fctx) }()
	deadline := time.Now().Add(20 * time.Second)
	for fw.Stats.Sent.Load() < 15 {
		if time.Now().After(deadline) {
			t.Fatalf("forwarder sent %d of 15; failures %d", fw.Stats.Sent.Load(), fw.Stats.Failures.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	fcancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if id.asked.Load() != 0 || fw.Stats.Failures.Load() != 0 {
		t.Fatalf("identity asked %d times, %d failures", id.asked.Load(), fw.Stats.Failures.Load())
	}
	var n int
	var sender string
	if err := store.SQL().QueryRow(`SELECT count(*), min(sender) FROM fingerprints`).Scan(&n, &sender); err != nil || n != 15 || !strings.Contains(sender, "CN=build-host-7") {
		t.Fatalf("stored %d from %q: %v", n, sender, err)
	}
	// An older agent still sends its document: on an intake that checks none, the
	// certificate decides, instead of a 401 the agent would retry forever.
	pool := x509.NewCertPool()
	pool.AddCert(f.caCert)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{f.client}}}}
	body, _ := json.Marshal(signedBatch(t, awsSigner(t), account, instance, fp("mtls-doc", "mi-0123456789abcdef0", "")))
	resp, err := client.Post("https://"+ln.Addr().String()+"/v1/fingerprints", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("document and certificate on an mTLS-only intake: %d", resp.StatusCode)
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}
