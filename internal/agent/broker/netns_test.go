package broker

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hook"
)

// netnsRedirects vouches for host connections with one record and for connections of
// other namespaces with another, and remembers which namespaces it was asked about.
type netnsRedirects struct {
	host, guest hook.Redirect
	mu          sync.Mutex
	asked       []uint64
}

func (f *netnsRedirects) LookupRedirect(client, server netip.AddrPort) (hook.Redirect, error) {
	return f.host, nil
}

func (f *netnsRedirects) LookupRedirectIn(netns uint64, client, server netip.AddrPort) (hook.Redirect, error) {
	f.mu.Lock()
	f.asked = append(f.asked, netns)
	f.mu.Unlock()
	return f.guest, nil
}

// netnsAddrRedirects are addrRedirects in every namespace.
type netnsAddrRedirects struct{ addrRedirects }

func (f netnsAddrRedirects) LookupRedirectIn(_ uint64, client, server netip.AddrPort) (hook.Redirect, error) {
	return f.LookupRedirect(client, server)
}

func guestBroker(t *testing.T, redirects Redirects, maxConns int) (*Broker, *bed) {
	t.Helper()
	tb := start(t, true, redirects)
	// start's broker serves tb.url; this one shares its fake IMDS.
	up := netip.MustParseAddrPort(tb.imdsAddr)
	b := New(Config{IMDS4: up.Addr(), IMDSPort: int(up.Port()), Enforce: true, MaxHeaderBytes: 4096, MaxBodyBytes: 1024,
		ReadTimeout: time.Second, IdleTimeout: time.Minute, UpstreamTimeout: 2 * time.Second, MaxConns: maxConns},
		redirects, func(r Request) {
			tb.mu.Lock()
			tb.requests = append(tb.requests, r)
			tb.mu.Unlock()
		}, zerolog.Nop())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		b.Shutdown(ctx)
	})
	return b, tb
}

func listenLoopback(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// A listener served for another network namespace looks its connections up in that
// namespace, and its requests carry it; the same IMDSv2 rule applies as on the host.
func TestServeNetnsLooksUpInItsNamespace(t *testing.T) {
	const cookie = 777
	red := &netnsRedirects{
		host:  hook.Redirect{PID: 1, UID: 0, Dst: netip.MustParseAddrPort("169.254.169.254:80")},
		guest: hook.Redirect{PID: 42, UID: 1000, V2Required: true, Dst: netip.MustParseAddrPort("169.254.169.254:80")},
	}
	b, tb := guestBroker(t, red, 0)
	host, guest := listenLoopback(t), listenLoopback(t)
	b.Serve(host)
	if err := b.ServeNetns(guest, cookie); err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	if st, _ := do(t, c, "GET", "http://"+guest.Addr().String()+"/latest/meta-data/instance-id", nil); st != 401 {
		t.Fatalf("v1 from the guest namespace under a v2 rule: %d, want 401", st)
	}
	if st, _ := do(t, c, "GET", "http://"+guest.Addr().String()+"/latest/meta-data/instance-id", map[string]string{"X-aws-ec2-metadata-token": "T"}); st != 200 {
		t.Fatalf("v2 from the guest namespace: %d", st)
	}
	if st, _ := do(t, c, "PUT", "http://"+guest.Addr().String()+"/latest/api/token", map[string]string{"X-Forwarded-For": "203.0.113.9"}); st != 403 {
		t.Fatalf("token PUT with XFF from the guest namespace: %d, want 403", st)
	}
	if st, _ := do(t, c, "GET", "http://"+host.Addr().String()+"/latest/meta-data/instance-id", nil); st != 200 {
		t.Fatalf("v1 on the host listener: %d", st)
	}
	recs := tb.recorded(4)
	if len(recs) != 4 {
		t.Fatalf("recorded %d requests, want 4", len(recs))
	}
	guests := 0
	for _, r := range recs { // recorded after each answer: not necessarily in order
		switch {
		case r.Netns == cookie && r.Conn.PID == 42:
			guests++
		case r.Netns == cookie || r.Conn.PID == 42:
			t.Errorf("request recorded with netns %d pid %d: a guest's look-up mixed with the host's", r.Netns, r.Conn.PID)
		case r.Netns == 0:
			t.Errorf("host request recorded without the agent's netns")
		}
	}
	if guests != 3 {
		t.Errorf("%d requests recorded in the guest namespace, want 3", guests)
	}
	red.mu.Lock()
	defer red.mu.Unlock()
	for _, n := range red.asked {
		if n != cookie {
			t.Errorf("guest connection looked up in netns %d, want %d", n, cookie)
		}
	}
	if len(red.asked) != 3 {
		t.Errorf("%d guest look-ups, want 3", len(red.asked))
	}
}

// Redirects that cannot look up other namespaces vouch for none of their connections.
func TestServeNetnsWithoutNetnsLookupRefuses(t *testing.T) {
	b, tb := guestBroker(t, v4Redirect(false), 0)
	guest := listenLoopback(t)
	if err := b.ServeNetns(guest, 5); err != nil {
		t.Fatal(err)
	}
	if st, _ := do(t, &http.Client{}, "GET", "http://"+guest.Addr().String()+"/latest/meta-data/instance-id", nil); st != 403 {
		t.Fatalf("guest connection without a namespace look-up: %d, want 403", st)
	}
	if len(tb.imds.requests()) != 0 {
		t.Fatal("an unvouched guest connection reached IMDS")
	}
}

// The caps count connections of every listener together, and a closed listener
// accepts nothing more while its open connections are still served.
func TestServeNetnsCapsAndClose(t *testing.T) {
	b, _ := guestBroker(t, netnsAddrRedirects{}, 2)
	host, g1, g2 := listenLoopback(t), listenLoopback(t), listenLoopback(t)
	b.Serve(host)
	for i, ln := range []net.Listener{g1, g2} {
		if err := b.ServeNetns(ln, uint64(10+i)); err != nil {
			t.Fatal(err)
		}
	}
	c1, ok1 := keepAlive(t, "127.0.0.1", g1.Addr().String())
	_, ok2 := keepAlive(t, "127.0.0.1", host.Addr().String())
	if !ok1 || !ok2 {
		t.Fatalf("first two connections: served %v %v", ok1, ok2)
	}
	if _, ok := keepAlive(t, "127.0.0.1", g2.Addr().String()); ok {
		t.Fatal("a third connection on another listener was served over max_connections 2")
	}
	if err := b.CloseListener(g1); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", g1.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Fatal("a closed listener still accepts")
	}
	// The connection accepted before still answers.
	if _, err := c1.Write([]byte("GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: T\r\n\r\n")); err != nil {
		t.Fatalf("open connection of a closed listener: %v", err)
	}
	if err := b.CloseListener(g1); err == nil {
		t.Fatal("closing a listener twice: no error")
	}
	if st := b.Stats(); st.ConnsRefused != 1 {
		t.Fatalf("refused %d, want 1", st.ConnsRefused)
	}
}

// Once the broker shuts down it takes no new listener.
func TestServeNetnsAfterShutdown(t *testing.T) {
	b, _ := guestBroker(t, v4Redirect(false), 0)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := b.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	ln := listenLoopback(t)
	defer ln.Close()
	if err := b.ServeNetns(ln, 3); err == nil {
		t.Fatal("a shut-down broker took a listener")
	}
}
