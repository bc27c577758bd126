package intake

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
	"github.com/imdsguard/imdsguard/internal/wire"
)

const (
	account  = "123456789012"
	instance = "i-0abc1234def567890"
)

func document(acct, inst string) string {
	return fmt.Sprintf("{\n\t\"accountId\": %q,\n\t\"architecture\": \"x86_64\",\n\t\"availabilityZone\": \"us-east-1a\",\n\t\"instanceId\": %q,\n\t\"privateIp\": \"10.0.0.5\",\n\t\"region\": \"us-east-1\"\n}", acct, inst)
}

// signer is made once: RSA key generation is slow on a shared 2-core machine.
var (
	signerOnce sync.Once
	testSigner *iddoc.Signer
	otherOnce  sync.Once
	otherSign  *iddoc.Signer
)

func awsSigner(t testing.TB) *iddoc.Signer {
	signerOnce.Do(func() {
		var err error
		if testSigner, err = iddoc.NewSigner(); err != nil {
			t.Fatal(err)
		}
	})
	return testSigner
}

func otherSigner(t testing.TB) *iddoc.Signer {
	otherOnce.Do(func() {
		var err error
		if otherSign, err = iddoc.NewSigner(); err != nil {
			t.Fatal(err)
		}
	})
	return otherSign
}

// fpTime is the issue time of every test fingerprint: one instant for the whole run,
// so that two fingerprints made a second apart (a replay) are equal.
var fpTime = time.Now().UTC().Truncate(time.Second)

func fp(id, inst, acct string) wire.Fingerprint {
	now := fpTime
	return wire.Fingerprint{
		ID: id, AccessKeyID: "ASIA" + strings.ToUpper(id), Role: "web",
		LastUpdated: now, Expiration: now.Add(6 * time.Hour),
		Instance: wire.Instance{ID: inst, AccountID: acct, Region: "us-east-1", AvailabilityZone: "us-east-1a"},
		Process:  wire.Process{PID: 4242, Exe: "/usr/bin/curl", User: "root"}, IMDSVersion: "v1",
	}
}

// signedBatch is a batch from instance of account, signed by s.
func signedBatch(t testing.TB, s *iddoc.Signer, acct, inst string, fps ...wire.Fingerprint) Batch {
	doc := document(acct, inst)
	p7, err := s.Sign([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return Batch{Document: doc, PKCS7: p7, BatchID: "b-" + fmt.Sprint(len(fps)), Fingerprints: fps}
}

type bed struct {
	h     *Handler
	store *SQLite
	srv   *httptest.Server
}

func newBed(t testing.TB) *bed {
	t.Helper()
	store, err := OpenSQLite(filepath.Join(t.TempDir(), "fp.db"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	h := NewHandler(Options{Store: store, AWSCertificates: []*x509.Certificate{awsSigner(t).Cert}, AllowedAccounts: []string{account}, Log: zerolog.Nop()})
	return &bed{h: h, store: store, srv: newTLSServer(t, h)}
}

func newTLSServer(t testing.TB, h http.Handler) *httptest.Server {
	srv := httptest.NewTLSServer(h)
	t.Cleanup(srv.Close)
	return srv
}

func (b *bed) post(t testing.TB, body []byte) (int, map[string]any) {
	t.Helper()
	resp, err := b.srv.Client().Post(b.srv.URL+"/v1/fingerprints", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("answer is not JSON: %v", err)
	}
	return resp.StatusCode, out
}

func (b *bed) postBatch(t testing.TB, batch Batch) (int, map[string]any) {
	t.Helper()
	body, err := json.Marshal(batch)
	if err != nil {
		t.Fatal(err)
	}
	return b.post(t, body)
}

func (b *bed) count(t testing.TB) int64 {
	t.Helper()
	n, err := b.store.Len(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestAcceptAndReplay(t *testing.T) {
	b := newBed(t)
	batch := signedBatch(t, awsSigner(t), account, instance, fp("a1", instance, account), fp("a2", instance, account))
	status, out := b.postBatch(t, batch)
	if status != 200 || out["accepted"] != 2.0 || out["duplicates"] != 0.0 {
		t.Fatalf("first send: %d %v", status, out)
	}
	// Replayed (the agent did not see the answer): nothing doubled.
	status, out = b.postBatch(t, batch)
	if status != 200 || out["accepted"] != 0.0 || out["duplicates"] != 2.0 {
		t.Fatalf("replay: %d %v", status, out)
	}
	// A batch that repeats an id within itself, and one new.
	batch = signedBatch(t, awsSigner(t), account, instance, fp("a3", instance, account), fp("a3", instance, account), fp("a1", instance, account))
	status, out = b.postBatch(t, batch)
	if status != 200 || out["accepted"] != 1.0 || out["duplicates"] != 2.0 {
		t.Fatalf("mixed: %d %v", status, out)
	}
	// A document that verified once (and is cached) does not carry another signature.
	forged := batch
	forged.PKCS7 = signedBatch(t, otherSigner(t), account, instance).PKCS7
	forged.Fingerprints = []wire.Fingerprint{fp("a4", instance, account)}
	if status, out := b.postBatch(t, forged); status != 401 {
		t.Fatalf("cached document with a forged signature: %d %v", status, out)
	}
	if n := b.count(t); n != 3 {
		t.Fatalf("stored %d, want 3", n)
	}
	got := b.store.ByAccessKey("ASIAA1")
	if len(got) != 1 || got[0].Process.Exe != "/usr/bin/curl" || got[0].Instance.ID != instance || !got[0].Expiration.Equal(batch.Fingerprints[2].Expiration) {
		t.Fatalf("ByAccessKey: %+v", got)
	}
	all := 0
	b.store.All(func(wire.Fingerprint) { all++ })
	if all != 3 {
		t.Fatalf("All gave %d, want 3", all)
	}
	c := b.h.Counts()
	if c.Accepted != 3 || c.Duplicates != 4 || c.Batches != 3 {
		t.Fatalf("counts: %+v", c)
	}
	var sender string
	if err := b.store.SQL().QueryRow(`SELECT sender FROM fingerprints WHERE id = 'a1'`).Scan(&sender); err != nil || sender != "instance:"+account+"/"+instance {
		t.Fatalf("sender %q, %v", sender, err)
	}
}

func TestRefusals(t *testing.T) {
	good := func() Batch {
		return signedBatch(t, awsSigner(t), account, instance, fp("r1", instance, account), fp("r2", instance, account))
	}
	enc := func(v any) []byte {
		data, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	big := make([]wire.Fingerprint, MaxBatch+1)
	for i := range big {
		big[i] = fp(fmt.Sprintf("big%d", i), instance, account)
	}
	cases := []struct {
		name   string
		body   func() []byte
		status int
		reason string
	}{
		{"bad signature", func() []byte {
			return enc(signedBatch(t, otherSigner(t), account, instance, fp("r1", instance, account)))
		}, 401, reasonBadSignature},
		{"document not the signed one", func() []byte {
			b := good()
			b.Document = strings.Replace(b.Document, "10.0.0.5", "10.0.0.6", 1)
			return enc(b)
		}, 401, reasonBadSignature},
		{"no document, no client certificate", func() []byte {
			b := good()
			b.Document, b.PKCS7 = "", ""
			return enc(b)
		}, 401, reasonUnauthenticated},
		{"wrong account", func() []byte {
			return enc(signedBatch(t, awsSigner(t), "999999999999", instance, fp("r1", instance, "999999999999")))
		}, 403, reasonAccount},
		{"mismatched instance", func() []byte {
			return enc(signedBatch(t, awsSigner(t), account, instance, fp("r1", instance, account), fp("r2", "i-0ffffffffffffffff", account)))
		}, 403, reasonInstance},
		{"mismatched account in a fingerprint", func() []byte {
			return enc(signedBatch(t, awsSigner(t), account, instance, fp("r1", instance, "999999999999")))
		}, 403, reasonInstance},
		{"malformed JSON", func() []byte { return []byte(`{"document": "x", `) }, 400, reasonMalformed},
		{"not an object", func() []byte { return []byte(`[1,2]`) }, 400, reasonMalformed},
		{"data after the batch", func() []byte { return append(enc(good()), []byte(` {}`)...) }, 400, reasonMalformed},
		{"unknown field", func() []byte {
			return bytes.Replace(enc(good()), []byte(`"batch_id"`), []byte(`"secret_access_key":"x","batch_id"`), 1)
		}, 400, reasonMalformed},
		{"unknown field in a fingerprint", func() []byte {
			return bytes.Replace(enc(good()), []byte(`"role"`), []byte(`"token":"x","role"`), 1)
		}, 400, reasonMalformed},
		{"empty batch", func() []byte { return enc(signedBatch(t, awsSigner(t), account, instance)) }, 400, reasonBadBatch},
		{"batch too long", func() []byte { return enc(signedBatch(t, awsSigner(t), account, instance, big...)) }, 400, reasonBadBatch},
		{"fingerprint without id", func() []byte {
			return enc(signedBatch(t, awsSigner(t), account, instance, fp("", instance, account)))
		}, 400, reasonBadBatch},
		{"fingerprint without access key", func() []byte {
			f := fp("r1", instance, account)
			f.AccessKeyID = ""
			return enc(signedBatch(t, awsSigner(t), account, instance, f))
		}, 400, reasonBadBatch},
		{"body too large", func() []byte {
			b := good()
			b.BatchID = strings.Repeat("x", MaxBodyBytes)
			return enc(b)
		}, 413, reasonTooLarge},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := newBed(t)
			status, out := b.post(t, c.body())
			if status != c.status {
				t.Fatalf("status %d, want %d (%v)", status, c.status, out)
			}
			if msg, _ := out["error"].(string); msg == "" {
				t.Fatalf("no error message: %v", out)
			}
			if n := b.count(t); n != 0 {
				t.Fatalf("%d fingerprints stored from a refused batch", n)
			}
			if got := b.h.Counts().Refused[c.reason]; got != 1 {
				t.Fatalf("refused[%s] = %d, want 1 (%v)", c.reason, got, b.h.Counts().Refused)
			}
			if m := b.metricsText(t); !strings.Contains(m, fmt.Sprintf("imdsguard_intake_batches_refused_total{reason=%q} 1\n", c.reason)) {
				t.Fatalf("metrics do not count it:\n%s", m)
			}
		})
	}
}

func (b *bed) metricsText(t testing.TB) string {
	t.Helper()
	resp, err := b.srv.Client().Get(b.srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return string(data)
}

func TestHealthzMetricsMethod(t *testing.T) {
	b := newBed(t)
	resp, err := b.srv.Client().Get(b.srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || strings.TrimSpace(string(data)) != "ok" {
		t.Fatalf("healthz: %d %q", resp.StatusCode, data)
	}
	resp, err = b.srv.Client().Get(b.srv.URL + "/v1/fingerprints")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("GET /v1/fingerprints: %d", resp.StatusCode)
	}
	b.postBatch(t, signedBatch(t, awsSigner(t), account, instance, fp("m1", instance, account)))
	b.postBatch(t, signedBatch(t, awsSigner(t), account, instance, fp("m1", instance, account)))
	m := b.metricsText(t)
	for _, want := range []string{
		"# TYPE imdsguard_intake_fingerprints_accepted_total counter\n",
		"imdsguard_intake_fingerprints_accepted_total 1\n",
		"imdsguard_intake_fingerprints_duplicate_total 1\n",
		"imdsguard_intake_batches_accepted_total 2\n",
		`imdsguard_intake_batches_refused_total{reason="bad_method"} 1` + "\n",
	} {
		if !strings.Contains(m, want) {
			t.Fatalf("metrics lack %q:\n%s", want, m)
		}
	}
}

// TestAllOrNothing makes the database fail on the second row of a batch: the first
// must not stay behind, and the sender is told to send again.
func TestAllOrNothing(t *testing.T) {
	b := newBed(t)
	if _, err := b.store.SQL().Exec(`CREATE TRIGGER fail_x2 BEFORE INSERT ON fingerprints WHEN NEW.id = 'x2' BEGIN SELECT RAISE(ABORT, 'injected'); END`); err != nil {
		t.Fatal(err)
	}
	status, out := b.postBatch(t, signedBatch(t, awsSigner(t), account, instance, fp("x1", instance, account), fp("x2", instance, account)))
	if status != 500 {
		t.Fatalf("status %d (%v), want 500", status, out)
	}
	if n := b.count(t); n != 0 {
		t.Fatalf("%d fingerprints half-stored", n)
	}
	if b.h.Counts().Refused[reasonStore] != 1 {
		t.Fatalf("store error not counted: %+v", b.h.Counts())
	}
}

func TestPurge(t *testing.T) {
	b := newBed(t)
	old, fresh, undated := fp("p1", instance, account), fp("p2", instance, account), fp("p3", instance, account)
	old.Expiration = time.Now().Add(-3 * time.Hour)
	undated.Expiration = time.Time{}
	if _, _, err := b.store.Put(context.Background(), []wire.Fingerprint{old, fresh, undated}, "test"); err != nil {
		t.Fatal(err)
	}
	// With 4h of grace, the key that expired 3h ago stays.
	if n, err := b.store.Purge(context.Background(), time.Now().Add(-4*time.Hour)); err != nil || n != 0 {
		t.Fatalf("purge within grace: %d, %v", n, err)
	}
	// The server's timer, with 1h of grace, drops it.
	srv, err := NewServer(ServerConfig{Listen: "127.0.0.1:0", PlainHTTP: true, PurgeGrace: time.Hour, PurgeInterval: 20 * time.Millisecond}, b.h, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for b.count(t) != 2 {
		if time.Now().After(deadline) {
			t.Fatal("expired fingerprint not purged within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := b.store.ByAccessKey(fresh.AccessKeyID); len(got) != 1 {
		t.Fatalf("fresh fingerprint purged too: %v", got)
	}
	if got := b.store.ByAccessKey(undated.AccessKeyID); len(got) != 1 {
		t.Fatalf("fingerprint without expiration purged: %v", got)
	}
}

func TestPlainHTTPOnlyOnLoopback(t *testing.T) {
	b := newBed(t)
	for _, addr := range []string{"0.0.0.0:8080", ":8080", "192.0.2.1:80", "[::]:80", "example.com:80"} {
		if _, err := NewServer(ServerConfig{Listen: addr, PlainHTTP: true}, b.h, zerolog.Nop()); err == nil {
			t.Errorf("plain HTTP on %s accepted", addr)
		}
	}
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0", "localhost:0"} {
		if _, err := NewServer(ServerConfig{Listen: addr, PlainHTTP: true}, b.h, zerolog.Nop()); err != nil {
			t.Errorf("plain HTTP on %s refused: %v", addr, err)
		}
	}
}

func TestConcurrentSenders(t *testing.T) {
	b := newBed(t)
	const senders, batches, perBatch = 6, 15, 10
	var wg sync.WaitGroup
	var mu sync.Mutex
	accepted, dups := 0, 0
	for s := 0; s < senders; s++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < batches; i++ {
				fps := make([]wire.Fingerprint, perBatch)
				for j := range fps {
					// Senders overlap: two of them send each id.
					fps[j] = fp(fmt.Sprintf("c%d-%d-%d", s/2, i, j), instance, account)
				}
				status, out := b.postBatch(t, signedBatch(t, awsSigner(t), account, instance, fps...))
				if status != 200 {
					t.Errorf("status %d: %v", status, out)
					return
				}
				mu.Lock()
				accepted += int(out["accepted"].(float64))
				dups += int(out["duplicates"].(float64))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	distinct := senders / 2 * batches * perBatch
	if accepted != distinct || dups != senders*batches*perBatch-distinct {
		t.Fatalf("accepted %d duplicates %d, want %d and %d", accepted, dups, distinct, senders*batches*perBatch-distinct)
	}
	if n := b.count(t); n != int64(distinct) {
		t.Fatalf("stored %d, want %d", n, distinct)
	}
}

// tlsFiles writes a CA, a server certificate for 127.0.0.1 and a client certificate.
type tlsFiles struct {
	dir                       string
	caPEM                     []byte
	serverCert, serverKey, ca string
	client                    tls.Certificate
	caCert                    *x509.Certificate
}

func makeTLS(t *testing.T) tlsFiles {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "imdsguard test CA"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	leaf := func(serial int64, cn string, usage x509.ExtKeyUsage, ips []net.IP) ([]byte, []byte) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn, Organization: []string{"on-prem"}}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature, IPAddresses: ips}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalECPrivateKey(key)
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
	}
	f := tlsFiles{dir: dir, caCert: caCert, caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})}
	sc, sk := leaf(2, "correlator", x509.ExtKeyUsageServerAuth, []net.IP{net.IPv4(127, 0, 0, 1)})
	cc, ck := leaf(3, "build-host-7", x509.ExtKeyUsageClientAuth, nil)
	f.serverCert, f.serverKey, f.ca = filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"), filepath.Join(dir, "ca.pem")
	for p, data := range map[string][]byte{f.serverCert: sc, f.serverKey: sk, f.ca: f.caPEM} {
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if f.client, err = tls.X509KeyPair(cc, ck); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestMTLS(t *testing.T) {
	b := newBed(t)
	f := makeTLS(t)
	srv, err := NewServer(ServerConfig{Listen: "127.0.0.1:0", TLSCert: f.serverCert, TLSKey: f.serverKey, ClientCA: f.ca, PurgeGrace: time.Hour}, b.h, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	pool := x509.NewCertPool()
	pool.AddCert(f.caCert)
	client := func(certs ...tls.Certificate) *http.Client {
		return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: certs}}}
	}
	url := "https://" + ln.Addr().String() + "/v1/fingerprints"
	// A non-EC2 sender: no document, its own instance naming.
	body, _ := json.Marshal(Batch{BatchID: "onprem-1", Fingerprints: []wire.Fingerprint{fp("t1", "mi-0123456789abcdef0", "")}})
	resp, err := client(f.client).Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("mTLS batch: %d %s", resp.StatusCode, data)
	}
	var sender string
	if err := b.store.SQL().QueryRow(`SELECT sender FROM fingerprints WHERE id = 't1'`).Scan(&sender); err != nil || !strings.Contains(sender, "CN=build-host-7") {
		t.Fatalf("sender %q, %v", sender, err)
	}
	// The same without a certificate: no proof at all.
	resp, err = client().Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Fatalf("no certificate, no document: %d", resp.StatusCode)
	}
	// An instance with a document still works on the mTLS listener, without a certificate.
	body, _ = json.Marshal(signedBatch(t, awsSigner(t), account, instance, fp("t2", instance, account)))
	resp, err = client().Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("document on mTLS listener: %d", resp.StatusCode)
	}
	// A certificate from another CA does not get through the handshake.
	other := makeTLS(t)
	if resp, err := client(other.client).Post(url, "application/json", bytes.NewReader(body)); err == nil {
		resp.Body.Close()
		t.Fatalf("certificate of an unknown CA accepted: %d", resp.StatusCode)
	}
	if n := b.count(t); n != 2 {
		t.Fatalf("stored %d, want 2", n)
	}
}
