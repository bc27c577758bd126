package broker

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hook"
)

// fakeIMDS answers like IMDS and remembers what it was sent.
type fakeIMDS struct {
	mu   sync.Mutex
	seen []*http.Request
}

func (f *fakeIMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.seen = append(f.seen, r.Clone(context.Background()))
	f.mu.Unlock()
	switch {
	case r.URL.Path == "/latest/api/token":
		io.WriteString(w, "TOKEN")
	case r.URL.Path == "/latest/meta-data/redirect":
		http.Redirect(w, r, "http://198.51.100.1/elsewhere", http.StatusFound)
	case strings.HasPrefix(r.URL.Path, "/latest/meta-data/iam/security-credentials/"):
		io.WriteString(w, `{"Code":"Success","AccessKeyId":"ASIAFAKE","SecretAccessKey":"s3cr3t","Token":"t0k"}`)
	default:
		io.WriteString(w, "i-0123456789")
	}
}

func (f *fakeIMDS) requests() []*http.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*http.Request(nil), f.seen...)
}

// fakeRedirects vouches for every connection with the same record, unless refuse.
type fakeRedirects struct {
	r      hook.Redirect
	refuse bool
}

func (f *fakeRedirects) LookupRedirect(client, server netip.AddrPort) (hook.Redirect, error) {
	if f.refuse {
		return hook.Redirect{}, hook.ErrNotRedirected
	}
	return f.r, nil
}

type bed struct {
	imds     *fakeIMDS
	imdsAddr string
	url      string
	mu       sync.Mutex
	requests []Request
}

func (b *bed) recorded() []Request {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]Request(nil), b.requests...)
}

func start(t testing.TB, enforce bool, redirects Redirects) *bed {
	t.Helper()
	tb := &bed{imds: &fakeIMDS{}}
	up := httptest.NewServer(tb.imds)
	t.Cleanup(up.Close)
	upAddr := netip.MustParseAddrPort(up.Listener.Addr().String())
	tb.imdsAddr = upAddr.String()
	cfg := Config{
		IMDS4: upAddr.Addr(), IMDS6: netip.MustParseAddr("::1"), IMDSPort: int(upAddr.Port()), Enforce: enforce,
		MaxHeaderBytes: 4096, MaxBodyBytes: 1024, ReadTimeout: 300 * time.Millisecond,
		IdleTimeout: time.Second, UpstreamTimeout: 2 * time.Second,
	}
	b := New(cfg, redirects, func(r Request) {
		tb.mu.Lock()
		tb.requests = append(tb.requests, r)
		tb.mu.Unlock()
	}, zerolog.Nop())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		b.Shutdown(ctx)
	})
	tb.url = "http://" + ln.Addr().String()
	return tb
}

func v4Redirect(v2 bool) *fakeRedirects {
	return &fakeRedirects{r: hook.Redirect{PID: 42, UID: 1000, Rule: 0, V2Required: v2,
		Dst: netip.MustParseAddrPort("169.254.169.254:80")}}
}

func do(t *testing.T, c *http.Client, method, url string, hdr map[string]string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestClassifyAndEnforce(t *testing.T) {
	for _, enforce := range []bool{true, false} {
		t.Run(fmt.Sprintf("enforce=%v", enforce), func(t *testing.T) {
			b := start(t, enforce, v4Redirect(true))
			c := &http.Client{}
			st, _ := do(t, c, "PUT", b.url+"/latest/api/token", map[string]string{"X-aws-ec2-metadata-token-ttl-seconds": "60"})
			if st != 200 {
				t.Fatalf("token PUT: %d", st)
			}
			st, body := do(t, c, "GET", b.url+"/latest/meta-data/instance-id", map[string]string{"X-aws-ec2-metadata-token": "TOKEN"})
			if st != 200 || body != "i-0123456789" {
				t.Fatalf("v2 GET: %d %q", st, body)
			}
			st, _ = do(t, c, "GET", b.url+"/latest/meta-data/instance-id", nil)
			want := 200
			if enforce {
				want = 401
			}
			if st != want {
				t.Fatalf("v1 GET with v2 required: %d, want %d", st, want)
			}
			recs := b.recorded()
			if len(recs) != 3 || recs[0].Version != VersionToken || recs[1].Version != VersionV2 || recs[2].Version != VersionV1 ||
				recs[2].Status != want || recs[0].Conn.PID != 42 {
				t.Fatalf("recorded %+v", recs)
			}
			if enforce && (recs[2].Refused != "imdsv2_required" || len(b.imds.requests()) != 2) {
				t.Fatalf("refused v1 reached IMDS: %+v", recs[2])
			}
		})
	}
}

func TestV1AllowedWhenNotRequired(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	if st, _ := do(t, &http.Client{}, "GET", b.url+"/latest/meta-data/instance-id", nil); st != 200 {
		t.Fatalf("v1: %d", st)
	}
}

func TestNoProxyHeadersAndNoRedirects(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	if st, _ := do(t, c, "PUT", b.url+"/latest/api/token", map[string]string{"X-Forwarded-For": "203.0.113.9"}); st != 403 {
		t.Fatalf("token PUT with XFF: %d, want 403", st)
	}
	if st, _ := do(t, c, "GET", b.url+"/latest/meta-data/redirect", nil); st != http.StatusFound {
		t.Fatalf("redirect: %d, want 302 passed through", st)
	}
	do(t, c, "PUT", b.url+"/latest/api/token", nil)
	for _, r := range b.imds.requests() {
		if r.Header.Get("X-Forwarded-For") != "" || r.Header.Get("Forwarded") != "" || r.Header.Get("Via") != "" {
			t.Errorf("broker added proxy headers: %v", r.Header)
		}
	}
	if n := len(b.imds.requests()); n != 2 {
		t.Fatalf("IMDS saw %d requests, want 2 (XFF PUT refused, redirect not followed)", n)
	}
}

func TestRefusesDirectConnections(t *testing.T) {
	b := start(t, true, &fakeRedirects{refuse: true})
	if st, _ := do(t, &http.Client{}, "GET", b.url+"/latest/meta-data/instance-id", nil); st != 403 {
		t.Fatalf("direct: %d", st)
	}
	if len(b.imds.requests()) != 0 {
		t.Fatal("a direct connection reached IMDS")
	}
}

func TestLimits(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	c := &http.Client{}
	if st, _ := do(t, c, "GET", b.url+"/latest/meta-data/x", map[string]string{"X-Big": strings.Repeat("a", 20000)}); st != 431 {
		t.Fatalf("big header: %d, want 431", st)
	}
	req, _ := http.NewRequest("PUT", b.url+"/latest/api/token", strings.NewReader(strings.Repeat("b", 4096)))
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 413 {
		t.Fatalf("big body: %d, want 413", resp.StatusCode)
	}
}

func TestSlowClientTimesOut(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	conn, err := net.Dial("tcp", strings.TrimPrefix(b.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n") // never finished
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadAll(conn)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("broker kept a slow client's connection open")
	}
}

func TestKeepAliveAndCredentials(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	conn, err := net.Dial("tcp", strings.TrimPrefix(b.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rd := bufio.NewReader(conn)
	for _, p := range []string{"/latest/meta-data/instance-id", "/latest/meta-data/iam/security-credentials/role"} {
		fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: T\r\n\r\n", p)
		resp, err := http.ReadResponse(rd, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d", p, resp.StatusCode)
		}
	}
	recs := b.recorded()
	if len(recs) != 2 || recs[0].Body != nil || !strings.Contains(string(recs[1].Body), "ASIAFAKE") {
		t.Fatalf("recorded %+v", recs)
	}
}

func TestIsCredentialPath(t *testing.T) {
	for p, want := range map[string]bool{
		"/latest/meta-data/iam/security-credentials/role":                              true,
		"/latest/meta-data/iam/security-credentials/":                                  false,
		"/latest/meta-data/iam/security-credentials/role/x":                            false,
		"/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance": true,
		"/latest/meta-data/instance-id":                                                false,
	} {
		if IsCredentialPath(p) != want {
			t.Errorf("IsCredentialPath(%q) != %v", p, want)
		}
	}
}
