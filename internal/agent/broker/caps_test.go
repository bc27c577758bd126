package broker

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hook"
)

// addrRedirects vouches for each connection with the record of its client address:
// 127.0.0.1 is uid 1000, 127.0.0.2 uid 2000; each client port its own process, unless
// onePID makes all of 127.0.0.1 one.
type addrRedirects struct{ onePID bool }

func (f addrRedirects) LookupRedirect(client, server netip.AddrPort) (hook.Redirect, error) {
	r := hook.Redirect{UID: 1000, PID: uint32(client.Port()), Dst: netip.MustParseAddrPort("169.254.169.254:80")}
	if client.Addr() == netip.MustParseAddr("127.0.0.2") {
		r.UID = 2000
	}
	if f.onePID && r.UID == 1000 {
		r.PID = 7
	}
	return r, nil
}

// startCapped is a broker with caps in front of the fake IMDS.
func startCapped(t *testing.T, redirects Redirects, maxConns, perUID, perProc int) (*Broker, string) {
	t.Helper()
	up := &http.Server{Handler: &fakeIMDS{}}
	upLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go up.Serve(upLn)
	t.Cleanup(func() { up.Close() })
	upAddr := netip.MustParseAddrPort(upLn.Addr().String())
	b := New(Config{IMDS4: upAddr.Addr(), IMDSPort: int(upAddr.Port()), Enforce: true,
		MaxHeaderBytes: 4096, MaxBodyBytes: 1024, ReadTimeout: 2 * time.Second, IdleTimeout: time.Minute,
		UpstreamTimeout: 2 * time.Second, MaxConns: maxConns, MaxConnsPerUID: perUID, MaxConnsPerProcess: perProc},
		redirects, nil, zerolog.Nop())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		b.Shutdown(ctx)
	})
	return b, ln.Addr().String()
}

// keepAlive opens a connection from src, asks one request on it and leaves it open
// and idle; it reports whether the broker answered.
func keepAlive(t *testing.T, src, addr string) (net.Conn, bool) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if errors.Is(err, syscall.ECONNRESET) {
		// Reset before the non-blocking connect was reported: as refused as it gets.
		return nil, false
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: T\r\n\r\n"); err != nil {
		return c, false
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatal("broker neither answered nor closed the connection")
		}
		return c, false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return c, resp.StatusCode == 200
}

// Issue 11 item 7: 4,000 idle keep-alive connections from one uid once grew the agent
// by 85 MB. Now that uid holds at most its cap, the rest are reset at once, and another
// uid is still served.
func TestConnectionCapPerUID(t *testing.T) {
	const perUID, attempts = 64, 4000
	b, addr := startCapped(t, addrRedirects{}, 1024, perUID, perUID)
	served := 0
	for i := 0; i < attempts; i++ {
		c, ok := keepAlive(t, "127.0.0.1", addr)
		if ok {
			served++
		} else if c != nil {
			c.Close() // the refused ones go, as a client's failed connects do
		}
	}
	if served != perUID {
		t.Fatalf("uid 1000 was served on %d idle connections, want its cap %d", served, perUID)
	}
	st := b.Stats()
	if st.Conns != perUID || st.ConnsRefused != attempts-perUID {
		t.Fatalf("stats %+v, want %d open and %d refused", st, perUID, attempts-perUID)
	}
	if _, ok := keepAlive(t, "127.0.0.2", addr); !ok {
		t.Fatal("uid 2000 was refused while uid 1000 was at its cap")
	}
}

func TestConnectionCapPerProcessAndGlobal(t *testing.T) {
	t.Run("process", func(t *testing.T) {
		_, addr := startCapped(t, addrRedirects{onePID: true}, 100, 100, 3)
		for i := range 5 {
			if _, ok := keepAlive(t, "127.0.0.1", addr); ok != (i < 3) {
				t.Fatalf("connection %d of one process: served %v, per-process cap 3", i, ok)
			}
		}
		if _, ok := keepAlive(t, "127.0.0.2", addr); !ok {
			t.Fatal("another process was refused")
		}
	})
	t.Run("global", func(t *testing.T) {
		b, addr := startCapped(t, addrRedirects{}, 4, 100, 100)
		for i := range 3 {
			if _, ok := keepAlive(t, "127.0.0.1", addr); !ok {
				t.Fatalf("connection %d refused under the global cap", i)
			}
		}
		c, ok := keepAlive(t, "127.0.0.2", addr)
		if !ok {
			t.Fatal("fourth connection refused")
		}
		if _, ok := keepAlive(t, "127.0.0.2", addr); ok {
			t.Fatal("fifth connection served over the global cap of 4")
		}
		// A connection that ends frees its place.
		c.Close()
		for deadline := time.Now().Add(2 * time.Second); b.Stats().Conns >= 4; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("closed connection still counted")
			}
		}
		if _, ok := keepAlive(t, "127.0.0.2", addr); !ok {
			t.Fatal("refused after a connection ended")
		}
	})
	t.Run("not redirected", func(t *testing.T) {
		// Connections the kernel did not redirect share one uid's budget.
		b, addr := startCapped(t, &fakeRedirects{refuse: true}, 100, 2, 2)
		d := net.Dialer{}
		for range 2 {
			c, err := d.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
		}
		for deadline := time.Now().Add(2 * time.Second); b.Stats().Conns < 2; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("direct connections not accepted")
			}
		}
		c, err := d.Dial("tcp", addr)
		switch {
		case errors.Is(err, syscall.ECONNRESET): // reset before connect was reported
		case err != nil:
			t.Fatal(err)
		default:
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || strings.Contains(err.Error(), "timeout") {
				t.Fatalf("third direct connection: read %d, %v; want it reset", n, err)
			}
		}
		if st := b.Stats(); st.ConnsRefused != 1 {
			t.Fatalf("stats %+v", st)
		}
	})
}

// Issue 11 item 9: a token request is a token request however its method and path are
// spelt, and no PUT gets past with X-Forwarded-For.
func TestClassifyNormalises(t *testing.T) {
	for _, tc := range []struct {
		line string
		want Version
	}{
		{"PUT /latest/api/token", VersionToken},
		{"put /latest/api/token", VersionToken},
		{"Put /latest/api/token/", VersionToken},
		{"PUT //latest/./api//token?x=1", VersionToken},
		{"PUT /latest/api/%74oken", VersionToken},
		{"PUT /2021-03-23/API/TOKEN", VersionToken},
		{"GET /latest/api/token", VersionV1},
		{"PUT /latest/meta-data/instance-id", VersionV1},
	} {
		req, err := readHead(bufio.NewReader(strings.NewReader(tc.line+" HTTP/1.1\r\nHost: x\r\n\r\n")), 4096, nil)
		if err != nil {
			t.Fatalf("%s: %v", tc.line, err)
		}
		if got := classify(&req); got != tc.want {
			t.Errorf("%s: classified %s, want %s", tc.line, got, tc.want)
		}
	}
	b := start(t, true, v4Redirect(true))
	addr := strings.TrimPrefix(b.url, "http://")
	for _, line := range []string{"PUT /latest/api/token/", "put /latest/api/token", "PUT /latest/meta-data/x", "pUt /"} {
		st := rawStatus(t, addr, line+" HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n")
		if st != http.StatusForbidden {
			t.Errorf("%s with X-Forwarded-For: %d, want 403", line, st)
		}
	}
	if n := len(b.imds.requests()); n != 0 {
		t.Fatalf("IMDS saw %d PUTs with X-Forwarded-For", n)
	}
	for _, r := range b.recorded(4) {
		if r.Refused != "x_forwarded_for" {
			t.Errorf("recorded %+v, want refused x_forwarded_for", r)
		}
	}
}

func rawStatus(t *testing.T, addr, req string) int {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, req)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("%q: %v", req, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// Issue 11 item 9: a v2-required process's bogus token is forwarded; IMDS, the only
// judge of its tokens, answers 401, and the broker records and counts that answer.
func TestBogusTokenForwardedAndCounted(t *testing.T) {
	b := start(t, true, v4Redirect(true))
	c := &http.Client{}
	st, body := do(t, c, "GET", b.url+"/latest/meta-data/iam/security-credentials/role", map[string]string{"X-aws-ec2-metadata-token": bogusToken})
	if st != http.StatusUnauthorized || strings.Contains(body, "ASIA") {
		t.Fatalf("bogus token: %d %q, want IMDS's 401", st, body)
	}
	recs := b.recorded(1)
	if len(recs) != 1 || recs[0].Version != VersionV2 || recs[0].Status != 401 || recs[0].Refused != "" || recs[0].Body != nil {
		t.Fatalf("recorded %+v", recs)
	}
	if n := len(b.imds.requests()); n != 1 {
		t.Fatalf("IMDS saw %d requests, want the one forwarded", n)
	}
}
