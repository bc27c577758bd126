package hostid

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

const document = `{
  "accountId": "123456789012", "architecture": "x86_64", "availabilityZone": "eu-west-1b",
  "imageId": "ami-0123456789abcdef0", "instanceId": "i-0abc1234def567890",
  "instanceType": "m7g.large", "pendingTime": "2026-11-23T10:00:00Z", "privateIp": "10.0.0.7",
  "region": "eu-west-1", "version": "2017-09-30"
}`

// fakeIMDS answers like IMDSv2 after failing the first `fail` requests with 500.
func fakeIMDS(t *testing.T, fail int32) (*httptest.Server, *atomic.Int32, *atomic.Int32) {
	var calls, withoutToken atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) <= fail {
			http.Error(w, "not yet", http.StatusInternalServerError)
			return
		}
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			// The SDK needs the TTL back, as real IMDS sends it.
			w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds"))
			w.Write([]byte("tok-123"))
		case r.Method == http.MethodGet && r.URL.Path == "/latest/dynamic/instance-identity/document":
			if r.Header.Get("X-Aws-Ec2-Metadata-Token") != "tok-123" {
				withoutToken.Add(1)
				http.Error(w, "", http.StatusUnauthorized)
				return
			}
			w.Write([]byte(document))
		case r.Method == http.MethodGet && r.URL.Path == "/latest/dynamic/instance-identity/pkcs7":
			w.Write([]byte("MIAGCSqGSIb3DQEHAqCAMIACAQExCzAJBgUrDgMCGgUAMIAGCSqGSIb3DQEHAaCAJIAEggHb"))
		case r.Method == http.MethodGet && r.URL.Path == "/latest/meta-data/instance-id":
			w.Write([]byte("i-0abc1234def567890"))
		case r.Method == http.MethodGet && r.URL.Path == "/latest/meta-data/iam/info":
			w.Write([]byte(`{"Code":"Success","InstanceProfileArn":"arn:aws:iam::123456789012:instance-profile/web"}`))
		case r.Method == http.MethodGet && r.URL.Path == "/latest/meta-data/public-ipv4":
			w.Write([]byte("203.0.113.7"))
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &calls, &withoutToken
}

func TestRetriesUntilIMDSAnswers(t *testing.T) {
	srv, calls, withoutToken := fakeIMDS(t, 3)
	var logBuf bytes.Buffer
	s := New(Options{Endpoint: srv.URL, FirstBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond,
		Log: zerolog.New(&logBuf)})
	if _, ok := s.Get(); ok {
		t.Fatal("identity known before Run")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Run(ctx); err != nil {
		t.Fatalf("Run: %v\n%s", err, logBuf.String())
	}
	select {
	case <-s.Ready():
	default:
		t.Fatal("Ready not closed")
	}
	id, ok := s.Get()
	want := Identity{InstanceID: "i-0abc1234def567890", AccountID: "123456789012", Region: "eu-west-1",
		AvailabilityZone: "eu-west-1b", InstanceType: "m7g.large", ImageID: "ami-0123456789abcdef0"}
	if !ok || id != want {
		t.Errorf("identity = %+v, %v; want %+v", id, ok, want)
	}
	if calls.Load() < 5 || withoutToken.Load() != 0 {
		t.Errorf("calls = %d, requests without a token = %d", calls.Load(), withoutToken.Load())
	}
	if !strings.Contains(logBuf.String(), `"event":"identity_unavailable"`) ||
		!strings.Contains(logBuf.String(), `"event":"identity_learnt"`) {
		t.Errorf("log does not tell the story:\n%s", logBuf.String())
	}
}

// Without IMDS, Run keeps trying (warning with backoff, not once per attempt) until
// its context ends.
func TestKeepsTryingWhenUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens: connection refused, fast and local
	var logBuf bytes.Buffer
	s := New(Options{Endpoint: "http://" + addr, FirstBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond,
		Log: zerolog.New(&logBuf)})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := s.Run(ctx); err == nil {
		t.Fatal("Run returned nil without IMDS")
	}
	if _, ok := s.Get(); ok {
		t.Fatal("identity known without IMDS")
	}
	warns := strings.Count(logBuf.String(), `"event":"identity_unavailable"`)
	if warns < 3 || warns > 12 {
		t.Errorf("%d warnings in 300ms; want a few (first, then at doublings):\n%s", warns, logBuf.String())
	}
}

// A custom HTTP client carries the requests: the agent passes one whose sockets the
// broker must not redirect.
func TestUsesGivenHTTPClient(t *testing.T) {
	srv, _, _ := fakeIMDS(t, 0)
	var dials atomic.Int32
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}}
	s := New(Options{Endpoint: srv.URL, HTTPClient: client, Log: zerolog.Nop()})
	if err := s.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if dials.Load() == 0 {
		t.Error("custom client not used")
	}
}

// The document and its signature are fetched once for the forwarder's batches, not once
// a batch; host facts come through the same client, and 404s (no IPv6) are not errors.
func TestDocumentCachedAndHostFacts(t *testing.T) {
	srv, calls, withoutToken := fakeIMDS(t, 0)
	s := New(Options{Endpoint: srv.URL, Log: zerolog.Nop()})
	ctx := context.Background()
	doc, sig, err := s.Document(ctx)
	if err != nil || doc != document || !strings.HasPrefix(sig, "MIAG") {
		t.Fatalf("Document: %q %q %v", doc, sig, err)
	}
	before := calls.Load()
	for range 5 {
		if _, _, err := s.Document(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if calls.Load() != before {
		t.Errorf("Document went back to IMDS %d times", calls.Load()-before)
	}
	arn, public, err := s.Client().HostFacts(ctx)
	if err != nil || arn != "arn:aws:iam::123456789012:instance-profile/web" || len(public) != 1 || public[0].String() != "203.0.113.7" {
		t.Errorf("HostFacts: %q %v %v", arn, public, err)
	}
	if withoutToken.Load() != 0 {
		t.Errorf("%d requests without a token", withoutToken.Load())
	}
}
