// Package broker is the local HTTP endpoint that the kernel redirects allowed IMDS
// connections to. It knows the process behind each connection from the kernel's
// connect-time record, classifies every request (token PUT, IMDSv2, IMDSv1), refuses
// IMDSv1 where a rule requires IMDSv2, and forwards the rest to the real IMDS over
// sockets of its own that the kernel never redirects.
//
// It forwards like a proxy built for the job: one connection to IMDS per client
// connection, each request head parsed once (request.go), answers streamed back over the
// raw connections as IMDS framed them (response.go); the only body it reads is a
// credential answer, to fingerprint it.
//
// It is no open proxy: it serves only connections the kernel redirected, talks only to
// IMDS, follows no redirects, adds no X-Forwarded-For, refuses a token PUT that carries
// one (as IMDS itself does), caps header and body sizes and times out slow clients.
//
// It serves the ECS task credential endpoint and the EKS Pod Identity agent the same way
// (endpoints.go): the kernel's record says which endpoint the client connected to.
package broker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/imdsguard/imdsguard/internal/agent/hook"
)

// Config is the broker's part of the agent configuration.
type Config struct {
	Port int
	Mark int // SO_MARK on upstream sockets, for firewall rules; the kernel does not trust it
	// Own registers an upstream socket, before it connects, as the agent's own (the
	// kernel lets it through unjudged and unredirected); nil registers nothing.
	Own          func(fd int) error
	IMDS4, IMDS6 netip.Addr
	IMDSPort     int
	// Endpoints are the other guarded credential endpoints (ECS, Pod Identity): a
	// connection whose kernel record names one of their addresses is forwarded there.
	Endpoints []Endpoint
	// CredentialsOwner, when set, tells an ECS credential request for another task's id
	// (refused with 403 in enforce mode, marked in audit mode).
	CredentialsOwner CredentialsOwner
	Enforce          bool // false: IMDSv1 where v2 is required is forwarded and counted
	MaxHeaderBytes   int
	MaxBodyBytes     int64
	ReadTimeout      time.Duration
	IdleTimeout      time.Duration
	UpstreamTimeout  time.Duration
	// Caps on open client connections, idle keep-alive ones included (0: none). A
	// connection over a cap is reset at once: every open connection holds a goroutine
	// and a read buffer, and nothing else bounds how many one user opens.
	MaxConns           int // all clients together
	MaxConnsPerUID     int // one uid's processes; connections not redirected share one budget
	MaxConnsPerProcess int // one process (tgid and start time)
}

// capLogInterval is how often a refused connection is logged per uid; those in between
// are counted into the next line.
const capLogInterval = time.Minute

// Redirects finds the kernel's record of an accepted connection by both its ends: the
// client's address and port, and the broker's.
type Redirects interface {
	LookupRedirect(client, server netip.AddrPort) (hook.Redirect, error)
}

// NetnsRedirects finds the kernel's record of a connection accepted on a listener in
// another network namespace (a container's, ServeNetns): the same look-up as Redirects,
// keyed by that namespace's cookie instead of the agent's own. Redirects that do not
// implement it vouch for no connection in another namespace: each is refused (403).
type NetnsRedirects interface {
	LookupRedirectIn(netns uint64, client, server netip.AddrPort) (hook.Redirect, error)
}

// Version is how a request authenticates to IMDS.
type Version string

const (
	VersionToken Version = "token" // PUT /latest/api/token
	VersionV2    Version = "v2"    // carries X-aws-ec2-metadata-token
	VersionV1    Version = "v1"    // no token
)

// Request is one request the broker handled, for events and metrics.
type Request struct {
	Conn hook.Redirect
	// Netns is the cookie of the network namespace of the listener the connection came
	// in on (the agent's own for the host's listeners; 0 when the kernel could not say).
	Netns    uint64
	Endpoint EndpointKind
	Method   string
	// Path is the path as the client sent it; for ECS, in canonical form with the
	// credentials id replaced (it is a bearer secret). Never the query.
	Path string
	// Version is how an IMDS request authenticates; "" for the other endpoints.
	Version Version
	// ForeignTask is the ECS task that the credentials id of this request was handed to,
	// when that is not the requesting process's task.
	ForeignTask string
	Status      int
	Refused     string // why the broker answered itself, "" when IMDS answered
	// WouldRefuse is why enforce mode would have refused a request that audit mode
	// forwarded (imdsv2_required), "" otherwise.
	WouldRefuse string
	Started     time.Time
	Duration    time.Duration
	// Body is IMDS's answer to a credential request (status 200), for fingerprinting.
	// It holds secrets: never log it.
	Body []byte
}

// Broker serves redirected IMDS connections.
type Broker struct {
	enforce   atomic.Bool // changes on reload
	closing   atomic.Bool
	cfg       Config
	redirects Redirects
	record    func(Request)
	log       zerolog.Logger
	dialer    *net.Dialer

	mu        sync.Mutex
	listeners []*listener
	conns     map[*clientConn]struct{}
	wg        sync.WaitGroup
	perUID    map[uint32]int    // open connections by uid (admit)
	perProc   map[procKey]int   // and by process
	capLog    map[uint32]capLog // last cap refusal logged, by uid

	capRefused    atomic.Uint64 // connections reset over a cap
	tokenRejected atomic.Uint64 // requests with a token IMDS answered 401

	readers, upReaders sync.Pool // *bufio.Reader
	bufs               sync.Pool // *[]byte

	// Connections to IMDS ready for the next client connection, per address family:
	// one dialled ahead, and those client connections left clean (their last answer
	// whole, IMDS keeping the connection open), so that a new client connection neither
	// waits for a dial nor pays for one (the dial's port search among TIME_WAIT sockets
	// was the largest part of the agent's cost per new connection). Each client
	// connection has one of its own while it lasts; HTTP to IMDS keeps no state per
	// connection (a token is a header of each request).
	spare4, spare6 spare

	ipv4 bool // Listen holds the 127.0.0.1 listener
	ipv6 bool // and the [::1] one
}

// listener is one listening socket the broker accepts on, with its own accept loop.
type listener struct {
	ln    net.Listener
	netns uint64 // its network namespace's cookie (SO_NETNS_COOKIE); 0 unknown
	// guest: a network namespace other than the agent's (ServeNetns); its connections'
	// records are looked up by netns.
	guest bool
	done  chan struct{} // closed once its accept loop returned
}

// procKey names a process for the per-process cap; the start time tells a reused pid
// from its predecessor.
type procKey struct {
	pid   uint32
	start uint64
}

type capLog struct {
	at      time.Time
	refused int // since at
}

// Stats are the broker's counters.
type Stats struct {
	Conns         int    // client connections open now
	ConnsRefused  uint64 // client connections reset over a cap
	TokenRejected uint64 // requests carrying a token that IMDS answered 401
}

// Stats returns the broker's counters.
func (b *Broker) Stats() Stats {
	b.mu.Lock()
	n := len(b.conns)
	b.mu.Unlock()
	return Stats{Conns: n, ConnsRefused: b.capRefused.Load(), TokenRejected: b.tokenRejected.Load()}
}

// spareConns bounds the idle IMDS connections kept per address family.
const spareConns = 4

type spare struct {
	conns    chan net.Conn // capacity spareConns
	dialling atomic.Bool
}

// New returns a broker; record is called once per request, from the serving goroutine,
// after the client has its answer.
func New(cfg Config, redirects Redirects, record func(Request), log zerolog.Logger) *Broker {
	b := &Broker{cfg: cfg, redirects: redirects, record: record, log: log,
		dialer: MarkedDialer(cfg.Mark, cfg.UpstreamTimeout, cfg.Own), conns: map[*clientConn]struct{}{},
		perUID: map[uint32]int{}, perProc: map[procKey]int{}, capLog: map[uint32]capLog{}}
	b.enforce.Store(cfg.Enforce)
	b.spare4.conns, b.spare6.conns = make(chan net.Conn, spareConns), make(chan net.Conn, spareConns)
	// A request head must fit in the client reader's buffer; 64 kB bounds what one
	// idle connection holds even when max_header_bytes is larger.
	size := min(max(cfg.MaxHeaderBytes+1024, 4096), 64<<10)
	b.readers.New = func() any { return bufio.NewReaderSize(nil, size) }
	b.upReaders.New = func() any { return bufio.NewReaderSize(nil, 4096) }
	b.bufs.New = func() any { buf := make([]byte, 0, 2048); return &buf }
	return b
}

// MarkedDialer dials the agent's own sockets: each is registered with own before it
// connects (the kernel program then lets it go straight to IMDS, unjudged and never
// redirected) and carries mark (SO_MARK, for firewall rules; 0: none). The broker's
// upstream connections and the agent's own IMDS requests use it.
func MarkedDialer(mark int, timeout time.Duration, own func(fd int) error) *net.Dialer {
	return &net.Dialer{
		Timeout: timeout,
		Control: func(network, address string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				if mark != 0 {
					if err := syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, mark); err != nil {
						serr = fmt.Errorf("mark socket: %w", err)
						return
					}
				}
				if own != nil {
					serr = own(int(fd))
				}
			}); err != nil {
				return err
			}
			return serr
		},
	}
}

// Listen opens the broker's listeners on 127.0.0.1 and [::1] and serves them until
// Shutdown. A family whose port another process holds (it bound it first), or that the
// host lacks (no IPv6 loopback), is skipped: Families says which listeners are the
// agent's, and the kernel redirects only those families. Any other failure, such as no
// permission for a privileged port, is an error.
func (b *Broker) Listen() error {
	if start, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(start))); err == nil && b.cfg.Port >= n {
			b.log.Warn().Str("event", "broker_port_unprivileged").Int("port", b.cfg.Port).Int("ip_unprivileged_port_start", n).
				Msg("any user may bind the broker's port while the agent is down; its family is then not redirected")
		}
	}
	for _, fam := range []struct {
		host string
		held *bool
	}{{"127.0.0.1", &b.ipv4}, {"::1", &b.ipv6}} {
		if *fam.held {
			continue // adopted from an earlier agent (Adopt)
		}
		addr := net.JoinHostPort(fam.host, strconv.Itoa(b.cfg.Port))
		ln, err := net.Listen("tcp", addr)
		switch {
		case errors.Is(err, syscall.EADDRINUSE):
			b.log.Error().Err(err).Str("event", "broker_port_taken").Str("addr", addr).
				Msg("another process holds the broker's port: connections of this family are not redirected")
			continue
		case errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT):
			b.log.Warn().Err(err).Str("event", "broker_listen_skipped").Str("addr", addr).Msg("no loopback address of this family")
			continue
		case err != nil:
			return fmt.Errorf("broker listen on %s: %w", addr, err)
		}
		*fam.held = true
		b.Serve(ln)
	}
	return nil
}

// Families says which of the broker's loopback listeners Listen holds.
func (b *Broker) Families() (ipv4, ipv6 bool) { return b.ipv4, b.ipv6 }

// Serve serves one listener of the agent's own network namespace (tests use their own).
func (b *Broker) Serve(ln net.Listener) {
	l := &listener{ln: ln, netns: listenerNetns(ln), done: make(chan struct{})}
	b.mu.Lock()
	b.listeners = append(b.listeners, l)
	b.wg.Add(1)
	b.mu.Unlock()
	go b.accept(l)
}

// ServeNetns serves a listener created in another network namespace (a container's),
// whose cookie is netns: its connections are looked up in that namespace
// (NetnsRedirects) and their requests carry it; the caps are shared with every other
// listener, and upstream connections are dialled from the agent's own namespace as for
// the host's. CloseListener stops serving it. An error means the broker is shutting
// down; the caller still owns ln.
func (b *Broker) ServeNetns(ln net.Listener, netns uint64) error {
	l := &listener{ln: ln, netns: netns, guest: true, done: make(chan struct{})}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing.Load() {
		return errors.New("broker is shutting down")
	}
	b.listeners = append(b.listeners, l)
	b.wg.Add(1)
	go b.accept(l)
	return nil
}

// CloseListener closes a listener given to ServeNetns (or Serve) and waits until its
// accept loop has returned: afterwards the broker holds no reference to it.
// Connections already accepted on it are served to their end.
func (b *Broker) CloseListener(ln net.Listener) error {
	b.mu.Lock()
	var l *listener
	for i, x := range b.listeners {
		if x.ln == ln {
			l = x
			b.listeners = append(b.listeners[:i], b.listeners[i+1:]...)
			break
		}
	}
	b.mu.Unlock()
	if l == nil {
		return errors.New("close listener: not the broker's")
	}
	err := ln.Close()
	<-l.done
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("close listener: %w", err)
	}
	return nil
}

// listenerNetns reads the cookie of the network namespace a listener belongs to (Linux
// 5.14+); 0 when it cannot.
func listenerNetns(ln net.Listener) uint64 {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return 0
	}
	rc, err := tl.SyscallConn()
	if err != nil {
		return 0
	}
	var cookie uint64
	_ = rc.Control(func(fd uintptr) {
		cookie, _ = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	})
	return cookie
}

// accept is a listener's accept loop.
func (b *Broker) accept(l *listener) {
	defer b.wg.Done()
	defer close(l.done)
	ln := l.ln
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if b.closing.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			b.log.Warn().Err(err).Str("event", "broker_accept_failed").Msg("broker accept")
			time.Sleep(delay)
			continue
		}
		delay = 0
		// Identified here, before the connection costs a goroutine or a buffer: a
		// connection over a cap is reset at once (a map lookup each).
		cc := &clientConn{b: b, c: c, info: b.identify(c, l)}
		switch ok, reason := b.track(cc); {
		case !ok && reason == "": // shutting down
			c.Close()
			return
		case !ok:
			// Counted before the reset: whoever sees the reset sees it counted.
			b.refusedOverCap(cc.info, reason)
			resetConn(c)
			continue
		}
		go cc.serve()
	}
}

// unidentifiedUID is the per-uid budget that connections the kernel did not redirect
// share (they are answered 403, but hold a connection until then). No kernel record
// carries it: the kernel reports no uid above 2^32-2.
const unidentifiedUID = ^uint32(0)

func connOwner(info connInfo) (uint32, procKey, bool) {
	if info.err != nil {
		return unidentifiedUID, procKey{}, false
	}
	return info.r.UID, procKey{pid: info.r.PID, start: info.r.StartBoottime}, true
}

// track admits a connection under the caps; reason names the cap it is over.
func (b *Broker) track(cc *clientConn) (ok bool, reason string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing.Load() {
		return false, ""
	}
	uid, proc, known := connOwner(cc.info)
	switch c := b.cfg; {
	case c.MaxConns > 0 && len(b.conns) >= c.MaxConns:
		return false, "max_connections"
	case c.MaxConnsPerUID > 0 && b.perUID[uid] >= c.MaxConnsPerUID:
		return false, "max_connections_per_uid"
	case known && c.MaxConnsPerProcess > 0 && b.perProc[proc] >= c.MaxConnsPerProcess:
		return false, "max_connections_per_process"
	}
	b.conns[cc] = struct{}{}
	b.perUID[uid]++
	if known {
		b.perProc[proc]++
	}
	b.wg.Add(1)
	return true, ""
}

func (b *Broker) untrack(cc *clientConn) {
	uid, proc, known := connOwner(cc.info)
	b.mu.Lock()
	delete(b.conns, cc)
	if b.perUID[uid]--; b.perUID[uid] <= 0 {
		delete(b.perUID, uid)
	}
	if known {
		if b.perProc[proc]--; b.perProc[proc] <= 0 {
			delete(b.perProc, proc)
		}
	}
	b.mu.Unlock()
	b.wg.Done()
}

// refusedOverCap counts a connection reset over a cap and logs it once per uid per
// capLogInterval, with the count of those not logged: a user opening thousands of
// connections costs one log line a minute.
func (b *Broker) refusedOverCap(info connInfo, reason string) {
	b.capRefused.Add(1)
	uid, proc, _ := connOwner(info)
	now := time.Now()
	b.mu.Lock()
	l := b.capLog[uid]
	l.refused++
	logIt := now.Sub(l.at) >= capLogInterval
	if logIt {
		if len(b.capLog) >= 4096 { // bounded: drop the entries whose minute is over
			for u, e := range b.capLog {
				if now.Sub(e.at) >= capLogInterval {
					delete(b.capLog, u)
				}
			}
		}
		b.capLog[uid] = capLog{at: now}
	} else {
		b.capLog[uid] = l
	}
	open := b.perUID[uid]
	b.mu.Unlock()
	if !logIt {
		return
	}
	ev := b.log.Warn().Str("event", "broker_connection_cap").Str("cap", reason).Int("refused", l.refused).
		Int("uid_connections", open)
	if uid != unidentifiedUID {
		ev = ev.Uint32("uid", uid).Uint32("pid", proc.pid)
	} else {
		ev = ev.Bool("redirected", false)
	}
	ev.Msg("client connection over the broker's cap reset; further ones of this uid counted for a minute")
}

// Shutdown stops accepting, closes idle connections, lets requests in flight finish
// until ctx is done, then closes what is left.
func (b *Broker) Shutdown(ctx context.Context) error {
	b.closing.Store(true)
	b.mu.Lock()
	var errs []error
	for _, l := range b.listeners {
		if err := l.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	b.mu.Unlock()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		b.mu.Lock()
		n := len(b.conns)
		for cc := range b.conns {
			if cc.idle.Load() {
				cc.c.Close()
			}
		}
		b.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-ctx.Done():
			b.mu.Lock()
			for cc := range b.conns {
				cc.c.Close()
			}
			b.mu.Unlock()
			errs = append(errs, ctx.Err())
			b.wg.Wait()
			b.dropSpares()
			return errors.Join(errs...)
		case <-tick.C:
		}
	}
	b.wg.Wait()
	b.dropSpares()
	return errors.Join(errs...)
}

// dropSpares closes the connections dialled ahead.
func (b *Broker) dropSpares() {
	for _, s := range []*spare{&b.spare4, &b.spare6} {
		for s.dialling.Load() {
			time.Sleep(time.Millisecond) // a dial in flight ends within UpstreamTimeout
		}
		for len(s.conns) > 0 {
			select {
			case c := <-s.conns:
				c.Close()
			default:
			}
		}
	}
}

// SetEnforce switches between refusing IMDSv1 where v2 is required (true) and
// forwarding it (audit).
func (b *Broker) SetEnforce(on bool) { b.enforce.Store(on) }

// classify says how a request authenticates to IMDS. It judges the method without
// regard to case and the path in canonical form, so that no spelling of a token
// request ("put", "/latest/api/token/") passes for IMDSv1 and escapes its checks.
func classify(r *request) Version {
	if isPut(r.method) && IsTokenPath(r.path) {
		return VersionToken
	}
	if r.token {
		return VersionV2
	}
	return VersionV1
}

func isPut(method string) bool { return strings.EqualFold(method, "PUT") }

// clientConn is one redirected client connection and its own connection to IMDS.
type clientConn struct {
	b    *Broker
	c    net.Conn
	idle atomic.Bool // waiting for a request: Shutdown may close it

	br     *bufio.Reader
	up     net.Conn
	upbr   *bufio.Reader
	served int    // exchanges over up
	warm   bool   // up was dialled ahead or left by another client: IMDS may have closed it meanwhile
	sp     *spare // where up came from, and goes back to when left clean
	info   connInfo
}

type connInfo struct {
	r     hook.Redirect
	netns uint64 // the listener's network namespace
	err   error
	// kind is the endpoint the client connected to; upstream its address, for the
	// endpoints other than IMDS.
	kind     EndpointKind
	upstream netip.AddrPort
}

// identify finds the kernel's record of the connection, by both its ends (a client
// that connects to the broker straight from another address must not get the record of
// a redirected connection that shares its port), once per connection.
func (b *Broker) identify(c net.Conn, l *listener) connInfo {
	client, err := addrPort(c.RemoteAddr())
	if err != nil {
		return connInfo{netns: l.netns, err: fmt.Errorf("peer address %q: %w", c.RemoteAddr(), err)}
	}
	server, err := addrPort(c.LocalAddr())
	if err != nil {
		return connInfo{netns: l.netns, err: fmt.Errorf("local address %q: %w", c.LocalAddr(), err)}
	}
	var info connInfo
	if !l.guest {
		r, err := b.redirects.LookupRedirect(client, server)
		info = connInfo{r: r, netns: l.netns, err: err}
	} else if nr, ok := b.redirects.(NetnsRedirects); ok {
		r, err := nr.LookupRedirectIn(l.netns, client, server)
		info = connInfo{r: r, netns: l.netns, err: err}
	} else {
		info = connInfo{netns: l.netns, err: hook.ErrNotRedirected}
	}
	info.kind = EndpointIMDS
	if info.err == nil {
		info.kind, info.upstream, _ = b.endpointOf(info.r.Dst)
	}
	return info
}

func addrPort(a net.Addr) (netip.AddrPort, error) {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort(), nil
	}
	return netip.ParseAddrPort(a.String())
}

func (cc *clientConn) serve() {
	b := cc.b
	defer b.untrack(cc)
	cc.br = b.readers.Get().(*bufio.Reader)
	cc.br.Reset(cc.c)
	bufp := b.bufs.Get().(*[]byte)
	defer func() {
		cc.c.Close()
		cc.release()
		cc.br.Reset(nil)
		b.readers.Put(cc.br)
		if cc.upbr != nil {
			cc.upbr.Reset(nil)
			b.upReaders.Put(cc.upbr)
		}
		if cap(*bufp) <= 64<<10 {
			b.bufs.Put(bufp)
		}
	}()
	first := true
	for {
		if !first {
			// Keep-alive: wait for the next request, up to the idle timeout.
			cc.idle.Store(true)
			if b.closing.Load() {
				return
			}
			// Setting a deadline fails only on a closed socket, which the read reports.
			_ = cc.c.SetReadDeadline(time.Now().Add(b.cfg.IdleTimeout))
			if _, err := cc.br.Peek(1); err != nil {
				return
			}
			cc.idle.Store(false)
		}
		first = false
		now := time.Now()
		_ = cc.c.SetReadDeadline(now.Add(b.cfg.ReadTimeout))
		_ = cc.c.SetWriteDeadline(now.Add(b.cfg.ReadTimeout + b.cfg.UpstreamTimeout))
		req, err := readHead(cc.br, b.cfg.MaxHeaderBytes, *bufp)
		if err != nil {
			var he *httpError
			if errors.As(err, &he) {
				answerError(cc.c, he)
			}
			return // malformed, timed out or closed: nothing more on this connection
		}
		*bufp = req.head[:0]
		if !cc.exchange(&req, time.Now()) {
			return
		}
	}
}

// exchange judges one request and, unless refused, forwards it and relays the answer.
// It reports whether the connection may carry another request.
func (cc *clientConn) exchange(r *request, start time.Time) bool {
	b := cc.b
	kind := cc.info.kind
	rec := Request{Conn: cc.info.r, Netns: cc.info.netns, Endpoint: kind, Method: r.method, Path: redactedPath(kind, r.path), Started: start}
	imds := kind == EndpointIMDS
	if imds {
		rec.Version = classify(r)
	}
	var credID string
	if kind == EndpointECS && r.method == "GET" {
		credID = ecsCredentialsID(r.path, r.query)
	}
	if credID != "" && b.cfg.CredentialsOwner != nil {
		if task, foreign := b.cfg.CredentialsOwner(cc.info.r, credID); foreign {
			rec.ForeignTask = task
		}
	}
	finish := func(status int, refused string) {
		rec.Status, rec.Refused, rec.Duration = status, refused, time.Since(start)
		if b.record != nil {
			b.record(rec)
		}
	}
	refuse := func(status int, reason, body string) bool {
		he := &httpError{status: status, body: body}
		if !imds {
			// The ECS and Pod Identity agents answer errors in JSON.
			he.body, he.contentType = fmt.Sprintf(`{"code":"AccessDenied","message":%q}`, strings.TrimSpace(body)), "application/json"
		}
		answerError(cc.c, he)
		finish(status, reason)
		return false
	}
	switch {
	case cc.info.err != nil:
		// Dialled directly, not redirected: no process to vouch for it.
		return refuse(http.StatusForbidden, "not_redirected", "403 - Forbidden: connection not redirected by imdsguard\n")
	case r.contentLength > b.cfg.MaxBodyBytes:
		return refuse(http.StatusRequestEntityTooLarge, "body_too_large", "413 - Request Entity Too Large\n")
	case imds && isPut(r.method) && r.forwardedFor:
		// IMDS refuses token requests that went through a proxy; so do we, and any
		// other PUT as well, whatever its spelling.
		return refuse(http.StatusForbidden, "x_forwarded_for", "403 - Forbidden\n")
	case rec.Version == VersionV1 && cc.info.r.V2Required && b.enforce.Load():
		// What IMDS answers with HttpTokens=required: SDKs fetch a token and retry.
		return refuse(http.StatusUnauthorized, "imdsv2_required", "401 - Unauthorized\n")
	case rec.Version == VersionV1 && cc.info.r.V2Required:
		rec.WouldRefuse = "imdsv2_required" // audit: forwarded, marked for the operator
	case rec.ForeignTask != "" && b.enforce.Load():
		// The id is a bearer secret of another task: whoever holds it is not that task.
		return refuse(http.StatusForbidden, RefusedForeignTask, "403 - Forbidden: credentials of another task\n")
	case rec.ForeignTask != "":
		rec.WouldRefuse = RefusedForeignTask
	}
	var capture bool
	switch kind {
	case EndpointIMDS:
		capture = r.method == "GET" && IsCredentialPath(r.path)
	case EndpointECS:
		capture = credID != ""
	case EndpointPodIdentity:
		capture = r.method == "GET" && isPodIdentityCredentialPath(r.path)
	}
	res, err := cc.forward(r, capture)
	if err != nil {
		var ue *upstreamError
		isUp := errors.As(err, &ue) || !res.wrote
		if isUp {
			b.log.Warn().Err(err).Str("event", "broker_upstream_failed").Str("endpoint", string(kind)).Str("path", rec.Path).
				Msg("forwarding to the endpoint")
		}
		if !res.wrote {
			// Without the agent the client's own connection to IMDS would have failed:
			// reset its connection rather than answer an HTTP error it would treat
			// differently (cloud-init gives up on a 5xx, SDKs back off and retry).
			resetConn(cc.c)
			finish(0, "upstream_error")
			return false
		}
		if !isUp {
			finish(res.status, "client_gone")
			return false
		}
		res.close = true // cut short: the client sees its connection end, as with IMDS
	}
	if rec.Version == VersionV2 && res.status == http.StatusUnauthorized {
		// A token IMDS did not issue (or that expired): IMDS refused it and is the
		// only judge of its tokens; the request is recorded as IMDS answered it.
		b.tokenRejected.Add(1)
	}
	if capture && !res.tooLarge && res.creds != nil {
		rec.Body = res.creds
	}
	finish(res.status, "")
	return !res.close
}

// forward sends the request to IMDS over the connection's own upstream socket (dialled
// on first use) and relays the answer. A reused upstream connection that IMDS closed
// while idle is redialled once, when nothing was sent to the client yet and the
// request carried no body.
func (cc *clientConn) forward(r *request, capture bool) (response, error) {
	b := cc.b
	for attempt := 0; ; attempt++ {
		if cc.up == nil {
			if err := cc.dial(); err != nil {
				return response{}, err
			}
		}
		_ = cc.up.SetDeadline(time.Now().Add(b.cfg.UpstreamTimeout))
		res, err := cc.roundTrip(r, capture)
		if err == nil {
			cc.served++
			if res.upClose {
				cc.dropUpstream()
			}
			return res, nil
		}
		reused := cc.served > 0 || cc.warm
		cc.dropUpstream()
		if attempt == 0 && reused && !res.started && !res.wrote && r.contentLength == 0 {
			continue
		}
		return res, err
	}
}

func (cc *clientConn) roundTrip(r *request, capture bool) (response, error) {
	// Head and a body already read go to IMDS in one write.
	out := r.head
	n := r.contentLength
	if n > 0 && r.expect100 {
		if _, err := io.WriteString(cc.c, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			return response{wrote: true}, err
		}
	}
	if n > 0 && int64(cc.br.Buffered()) >= n {
		body, _ := cc.br.Peek(int(n))
		out = append(out, body...)
		_, _ = cc.br.Discard(int(n)) // buffered: cannot fail
		n = 0
	}
	if _, err := cc.up.Write(out); err != nil {
		return response{}, &upstreamError{fmt.Errorf("send request: %w", err)}
	}
	if n > 0 {
		if _, err := io.CopyN(cc.up, cc.br, n); err != nil {
			return response{}, fmt.Errorf("copy request body: %w", err)
		}
	}
	res, _, err := relay(cc.c, cc.upbr, r, capture, out[:0])
	return res, err
}

// dial gives the client connection its connection to IMDS: the one dialled ahead when
// there is one (once per client connection: a redial after a failure dials anew), and
// starts dialling the next.
func (cc *clientConn) dial() error {
	b := cc.b
	addr, sp := netip.AddrPortFrom(b.cfg.IMDS4, uint16(b.cfg.IMDSPort)), &b.spare4
	if d := cc.info.r.Dst.Addr(); d.Is6() && !d.Is4In6() {
		addr, sp = netip.AddrPortFrom(b.cfg.IMDS6, uint16(b.cfg.IMDSPort)), &b.spare6
	}
	if cc.info.kind != EndpointIMDS {
		// Exactly where the client connected; no connection dialled ahead: these
		// endpoints see a request per task start and credential refresh, not a stream.
		addr, sp = cc.info.upstream, nil
	}
	var up net.Conn
	if sp != nil && !cc.warm && cc.served == 0 {
		select {
		case up = <-sp.conns:
		default:
		}
	}
	cc.warm = up != nil
	if up == nil {
		var err error
		if up, err = b.dialer.Dial("tcp", addr.String()); err != nil {
			return &upstreamError{fmt.Errorf("dial %s: %w", cc.info.kind, err)}
		}
	}
	if sp != nil && len(sp.conns) == 0 && !b.closing.Load() && sp.dialling.CompareAndSwap(false, true) {
		go b.dialAhead(sp, addr)
	}
	cc.up, cc.served, cc.sp = up, 0, sp
	if cc.upbr == nil {
		cc.upbr = b.upReaders.Get().(*bufio.Reader)
	}
	cc.upbr.Reset(up)
	return nil
}

func (b *Broker) dialAhead(sp *spare, addr netip.AddrPort) {
	defer sp.dialling.Store(false)
	up, err := b.dialer.Dial("tcp", addr.String())
	if err != nil {
		return // IMDS unreachable: the next client dials itself and sees it fail
	}
	select {
	case sp.conns <- up:
	default:
		up.Close()
	}
}

// release hands the client connection's IMDS connection to the next client connection,
// or closes it. up is non-nil only while clean: every failed exchange drops it, and an
// answer IMDS framed with Connection: close drops it too. A byte IMDS sent beyond its
// answer would be taken for the next client's answer, so such a connection is closed.
func (cc *clientConn) release() {
	if cc.up == nil {
		return
	}
	if cc.sp != nil && cc.served > 0 && cc.upbr.Buffered() == 0 && !cc.b.closing.Load() {
		select {
		case cc.sp.conns <- cc.up:
			cc.up = nil
			return
		default:
		}
	}
	cc.dropUpstream()
}

func (cc *clientConn) dropUpstream() {
	if cc.up != nil {
		cc.up.Close()
		cc.up = nil
	}
}

// answerError answers a request the broker refuses itself, then ends the connection
// without a reset: what the client still sends is read and dropped for a moment (as
// net/http does), so that the answer is not lost to an RST.
func answerError(c net.Conn, e *httpError) {
	ct := e.contentType
	if ct == "" {
		ct = "text/plain"
	}
	msg := fmt.Sprintf("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		e.status, http.StatusText(e.status), ct, len(e.body), e.body)
	if _, err := io.WriteString(c, msg); err != nil {
		return
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
		_ = tc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, _ = io.CopyN(io.Discard, tc, 256<<10)
	}
}

// resetConn closes the client's connection with a TCP reset (SO_LINGER 0).
func resetConn(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	c.Close()
}
