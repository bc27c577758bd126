package broker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hook"
)

// bogusToken is a token the fake IMDS did not issue.
const bogusToken = "AQAEAbogus=="

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
	case r.Header.Get("X-aws-ec2-metadata-token") == bogusToken: // as IMDS answers a token it did not issue
		http.Error(w, "", http.StatusUnauthorized)
	case r.URL.Path == "/latest/api/token":
		io.WriteString(w, "TOKEN")
	case r.URL.Path == "/latest/meta-data/redirect":
		http.Redirect(w, r, "http://198.51.100.1/elsewhere", http.StatusFound)
	case r.URL.Path == "/latest/meta-data/hop":
		w.Header().Set("Connection", "X-Hop")
		w.Header().Set("X-Hop", "secret")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-End", "kept")
		io.WriteString(w, "hop")
	case r.URL.Path == "/latest/user-data":
		io.WriteString(w, strings.Repeat("u", 200<<10)) // large: chunked, streamed
	case r.URL.Path == "/latest/meta-data/iam/security-credentials/chunked":
		io.WriteString(w, `{"Code":"Success",`)
		w.(http.Flusher).Flush() // forces chunked framing
		io.WriteString(w, `"AccessKeyId":"ASIACHUNK","SecretAccessKey":"s3cr3t","Token":"t0k"}`)
	case strings.Contains(r.URL.Path, "/meta-data/iam/security-credentials/"):
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
	stopIMDS func()
	upSrv    *httptest.Server
	upMu     sync.Mutex
	upConns  map[net.Conn]bool // connections IMDS served a request on
	upClosed int
	imdsAddr string
	url      string
	mu       sync.Mutex
	requests []Request
}

func (b *bed) upstreamConns() int {
	b.upMu.Lock()
	defer b.upMu.Unlock()
	return len(b.upConns)
}

// closeUpstreamIdle makes IMDS close its idle keep-alive connections, as a server's
// idle timeout does. Turning keep-alives off closes those already idle; one still
// finishing its answer is caught on the next turn.
func (b *bed) closeUpstreamIdle() {
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		b.upSrv.Config.SetKeepAlivesEnabled(false)
		b.upSrv.Config.SetKeepAlivesEnabled(true)
		b.upMu.Lock()
		closed := b.upClosed
		b.upMu.Unlock()
		if closed > 0 {
			return
		}
	}
}

func (b *bed) recorded(want int) []Request {
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		b.mu.Lock()
		recs := append([]Request(nil), b.requests...)
		b.mu.Unlock()
		if len(recs) >= want || time.Now().After(deadline) {
			return recs
		}
	}
}

func start(t testing.TB, enforce bool, redirects Redirects) *bed {
	t.Helper()
	return startWith(t, enforce, redirects, nil, zerolog.Nop())
}

// startWith is start with the broker's configuration changed by set and its log.
func startWith(t testing.TB, enforce bool, redirects Redirects, set func(*Config), log zerolog.Logger) *bed {
	t.Helper()
	tb := &bed{imds: &fakeIMDS{}}
	up := httptest.NewUnstartedServer(tb.imds)
	tb.upConns = map[net.Conn]bool{}
	up.Config.ConnState = func(c net.Conn, st http.ConnState) {
		tb.upMu.Lock()
		defer tb.upMu.Unlock()
		switch st {
		case http.StateActive:
			tb.upConns[c] = true
		case http.StateClosed:
			tb.upClosed++
		}
	}
	up.Start()
	tb.upSrv = up
	t.Cleanup(up.Close)
	tb.stopIMDS = up.Close
	upAddr := netip.MustParseAddrPort(up.Listener.Addr().String())
	tb.imdsAddr = upAddr.String()
	cfg := Config{
		IMDS4: upAddr.Addr(), IMDS6: netip.MustParseAddr("::1"), IMDSPort: int(upAddr.Port()), Enforce: enforce,
		MaxHeaderBytes: 4096, MaxBodyBytes: 1024, ReadTimeout: 300 * time.Millisecond,
		IdleTimeout: time.Second, UpstreamTimeout: 2 * time.Second,
	}
	if set != nil {
		set(&cfg)
	}
	b := New(cfg, redirects, func(r Request) {
		tb.mu.Lock()
		tb.requests = append(tb.requests, r)
		tb.mu.Unlock()
	}, log)
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
			recs := b.recorded(3)
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
	recs := b.recorded(2)
	if len(recs) != 2 || recs[0].Body != nil || !strings.Contains(string(recs[1].Body), "ASIAFAKE") {
		t.Fatalf("recorded %+v", recs)
	}
}

func TestIsCredentialPath(t *testing.T) {
	for p, want := range map[string]bool{
		"/latest/meta-data/iam/security-credentials/role":                                   true,
		"/latest/meta-data/iam/security-credentials/":                                       false,
		"/latest/meta-data/iam/security-credentials/role/x":                                 false,
		"/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance":      true,
		"/latest/meta-data/instance-id":                                                     false,
		"/2021-03-23/meta-data/iam/security-credentials/role":                               true,
		"/1.0/meta-data/iam/security-credentials/role":                                      true,
		"//latest//meta-data/iam//security-credentials/role/":                               true,
		"/latest/meta-data/./iam/x/../security-credentials/role":                            true,
		"/LATEST/Meta-Data/IAM/security-credentials/role":                                   true,
		"/2021-03-23/meta-data/identity-credentials/ec2/security-credentials/ec2-instance/": true,
		"/2021-3-23/meta-data/iam/security-credentials/role":                                false,
		"/meta-data/iam/security-credentials/role":                                          false,
		"/v2/meta-data/iam/security-credentials/role":                                       false,
	} {
		if IsCredentialPath(p) != want {
			t.Errorf("IsCredentialPath(%q) != %v", p, want)
		}
	}
}

func TestIsTokenPath(t *testing.T) {
	for p, want := range map[string]bool{
		"/latest/api/token": true, "//latest/api//token/": true, "/2021-03-23/api/token": true,
		"/latest/api/token/x": false, "/api/token": false, "/latest/meta-data/api/token": false,
	} {
		if IsTokenPath(p) != want {
			t.Errorf("IsTokenPath(%q) != %v", p, want)
		}
	}
}

// Every spelling of a credential path that IMDS serves is fingerprinted alike.
func TestCredentialPathForms(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	paths := []string{
		"/latest/meta-data/iam/security-credentials/role",
		"/2021-03-23/meta-data/iam/security-credentials/role",
		"/latest/meta-data/iam/security-credentials/role/",
		"//latest//meta-data/iam/security-credentials//role",
	}
	for _, p := range paths {
		conn, err := net.Dial("tcp", strings.TrimPrefix(b.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n", p)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		io.Copy(io.Discard, resp.Body)
		conn.Close()
	}
	recs := b.recorded(len(paths))
	if len(recs) != len(paths) {
		t.Fatalf("recorded %d requests, want %d", len(recs), len(paths))
	}
	got := map[string]bool{}
	for _, r := range recs { // recorded as each answer completes: in any order
		got[r.Path] = strings.Contains(string(r.Body), "ASIAFAKE")
	}
	for _, p := range paths {
		if !got[p] {
			t.Errorf("%s: not recorded as a credential fetch: %+v", p, recs)
		}
	}
}

// In audit mode an IMDSv1 request that enforce would refuse is forwarded and marked.
func TestAuditMarksWouldRefuse(t *testing.T) {
	b := start(t, false, v4Redirect(true))
	if st, _ := do(t, &http.Client{}, "GET", b.url+"/latest/meta-data/instance-id", nil); st != 200 {
		t.Fatalf("v1 in audit: %d", st)
	}
	do(t, &http.Client{}, "GET", b.url+"/latest/meta-data/instance-id", map[string]string{"X-aws-ec2-metadata-token": "T"})
	recs := b.recorded(2)
	if len(recs) != 2 || recs[0].WouldRefuse != "imdsv2_required" || recs[0].Refused != "" || recs[1].WouldRefuse != "" {
		t.Fatalf("recorded %+v", recs)
	}
}

// An IMDS that cannot be reached looks to the client as it would without the broker:
// its connection fails (reset), it gets no HTTP answer.
func TestUpstreamDownResetsClient(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	b.stopIMDS()
	conn, err := net.Dial("tcp", strings.TrimPrefix(b.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(conn, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
	data, err := io.ReadAll(conn)
	if len(data) != 0 {
		t.Fatalf("client got an answer: %q", data)
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read: %v, want connection reset", err)
	}
	recs := b.recorded(1)
	if len(recs) != 1 || recs[0].Refused != "upstream_error" || recs[0].Status != 0 {
		t.Fatalf("recorded %+v", recs)
	}
}

// A client connection that ends cleanly leaves its IMDS connection to the next one; one
// that hangs up in the middle of an answer does not (the rest of that answer would be
// read as the next client's).
func TestUpstreamConnectionsPassedOnOnlyClean(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	addr := strings.TrimPrefix(b.url, "http://")
	get := func(path string) {
		t.Helper()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		// As an HTTP client without keep-alive asks: the client's connection ends,
		// IMDS's need not.
		fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n", path)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "i-0123456789" {
			t.Fatalf("%s: %d %q", path, resp.StatusCode, body)
		}
	}
	for i := 0; i < 10; i++ {
		get("/latest/meta-data/instance-id")
		b.recorded(i + 1) // the connection is released once the request is recorded
	}
	// The first dial and the one dialled ahead, and one more when a client came before
	// its predecessor let go of its own; each later client took a clean one (without
	// passing them on: 10 or more).
	if n := b.upstreamConns(); n > 3 {
		t.Fatalf("10 sequential client connections used %d IMDS connections, want at most 3", n)
	}

	// Hang up while the large answer is still coming.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "GET /latest/user-data HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
	buf := make([]byte, 1024)
	if _, err := io.ReadFull(conn, buf); err != nil {
		t.Fatal(err)
	}
	conn.(*net.TCPConn).SetLinger(0)
	conn.Close()
	b.recorded(11)
	for i := 0; i < 6; i++ { // drain every spare: none may carry the cut answer's rest
		get("/latest/meta-data/instance-id")
	}
}
