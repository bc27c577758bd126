// Package broker is the local HTTP endpoint that the kernel redirects allowed IMDS
// connections to. It knows the process behind each connection from the kernel's
// connect-time record, classifies every request (token PUT, IMDSv2, IMDSv1), refuses
// IMDSv1 where a rule requires IMDSv2, and forwards the rest to the real IMDS over
// sockets of its own that the kernel never redirects.
//
// It is no open proxy: it serves only connections the kernel redirected, talks only to
// IMDS, follows no redirects, adds no X-Forwarded-For, refuses a token PUT that carries
// one (as IMDS itself does), caps header and body sizes and times out slow clients.
package broker

import (
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

	"github.com/imdsguard/imdsguard/internal/agent/hook"
)

// Config is the broker's part of the agent configuration.
type Config struct {
	Port int
	Mark int // SO_MARK on upstream sockets, for firewall rules; the kernel does not trust it
	// Own registers an upstream socket, before it connects, as the agent's own (the
	// kernel lets it through unjudged and unredirected); nil registers nothing.
	Own             func(fd int) error
	IMDS4, IMDS6    netip.Addr
	IMDSPort        int
	Enforce         bool // false: IMDSv1 where v2 is required is forwarded and counted
	MaxHeaderBytes  int
	MaxBodyBytes    int64
	ReadTimeout     time.Duration
	IdleTimeout     time.Duration
	UpstreamTimeout time.Duration
}

// Redirects finds the kernel's record of an accepted connection by both its ends: the
// client's address and port, and the broker's.
type Redirects interface {
	LookupRedirect(client, server netip.AddrPort) (hook.Redirect, error)
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
	Conn     hook.Redirect
	Method   string
	Path     string
	Version  Version
	Status   int
	Refused  string // why the broker answered itself, "" when IMDS answered
	Started  time.Time
	Duration time.Duration
	// Body is IMDS's answer to a credential request (status 200), for fingerprinting.
	// It holds secrets: never log it.
	Body []byte
}

// Broker serves redirected IMDS connections.
type Broker struct {
	enforce   atomic.Bool // changes on reload
	cfg       Config
	redirects Redirects
	record    func(Request)
	log       zerolog.Logger
	upstream  *http.Transport
	servers   []*http.Server
	wg        sync.WaitGroup
	ipv4      bool // Listen holds the 127.0.0.1 listener
	ipv6      bool // and the [::1] one
}

type ctxKey struct{}

type connInfo struct {
	r   hook.Redirect
	err error
}

// New returns a broker; record is called once per request, from the serving goroutine.
func New(cfg Config, redirects Redirects, record func(Request), log zerolog.Logger) *Broker {
	b := &Broker{cfg: cfg, redirects: redirects, record: record, log: log}
	b.enforce.Store(cfg.Enforce)
	dialer := MarkedDialer(cfg.Mark, cfg.UpstreamTimeout, cfg.Own)
	b.upstream = &http.Transport{
		Proxy:                 nil, // never an HTTP proxy from the environment: IMDS only
		DialContext:           dialer.DialContext,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       30 * time.Second,
		ResponseHeaderTimeout: cfg.UpstreamTimeout,
		DisableCompression:    true,
	}
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

// Serve serves one listener (tests use their own).
func (b *Broker) Serve(ln net.Listener) {
	srv := &http.Server{
		Handler:           b,
		MaxHeaderBytes:    b.cfg.MaxHeaderBytes,
		ReadHeaderTimeout: b.cfg.ReadTimeout,
		ReadTimeout:       b.cfg.ReadTimeout,
		WriteTimeout:      b.cfg.ReadTimeout + b.cfg.UpstreamTimeout,
		IdleTimeout:       b.cfg.IdleTimeout,
		ErrorLog:          nil,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, ctxKey{}, b.identify(c))
		},
	}
	srv.SetKeepAlivesEnabled(true)
	b.servers = append(b.servers, srv)
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			b.log.Error().Err(err).Str("event", "broker_serve_failed").Msg("broker listener failed")
		}
	}()
}

// identify finds the kernel's record of the connection, by both its ends, once per
// connection.
func (b *Broker) identify(c net.Conn) *connInfo {
	client, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		return &connInfo{err: fmt.Errorf("peer address %q: %w", c.RemoteAddr(), err)}
	}
	server, err := netip.ParseAddrPort(c.LocalAddr().String())
	if err != nil {
		return &connInfo{err: fmt.Errorf("local address %q: %w", c.LocalAddr(), err)}
	}
	r, err := b.redirects.LookupRedirect(client, server)
	return &connInfo{r: r, err: err}
}

// Shutdown stops accepting, lets requests in flight finish until ctx is done, and
// closes idle connections.
func (b *Broker) Shutdown(ctx context.Context) error {
	var errs []error
	for _, s := range b.servers {
		errs = append(errs, s.Shutdown(ctx))
	}
	b.wg.Wait()
	b.upstream.CloseIdleConnections()
	return errors.Join(errs...)
}

// SetEnforce switches between refusing IMDSv1 where v2 is required (true) and
// forwarding it (audit).
func (b *Broker) SetEnforce(on bool) { b.enforce.Store(on) }

// Classify says how a request authenticates to IMDS.
func Classify(r *http.Request) Version {
	if r.Method == http.MethodPut && r.URL.Path == "/latest/api/token" {
		return VersionToken
	}
	if r.Header.Get("X-aws-ec2-metadata-token") != "" {
		return VersionV2
	}
	return VersionV1
}

// hopByHop headers describe one connection, not the request: never forwarded.
var hopByHop = []string{"Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

func (b *Broker) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	info, _ := r.Context().Value(ctxKey{}).(*connInfo)
	req := Request{Method: r.Method, Path: r.URL.Path, Version: Classify(r), Started: start}
	if info != nil {
		req.Conn = info.r
	}
	finish := func(status int, refused string) {
		req.Status, req.Refused, req.Duration = status, refused, time.Since(start)
		if b.record != nil {
			b.record(req)
		}
	}
	refuse := func(status int, reason, body string) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Connection", "close")
		w.WriteHeader(status)
		io.WriteString(w, body)
		finish(status, reason)
	}
	switch {
	case info == nil || info.err != nil:
		// Dialled directly, not redirected: no process to vouch for it.
		refuse(http.StatusForbidden, "not_redirected", "403 - Forbidden: connection not redirected by imdsguard\n")
		return
	case r.ContentLength > b.cfg.MaxBodyBytes:
		refuse(http.StatusRequestEntityTooLarge, "body_too_large", "413 - Request Entity Too Large\n")
		return
	case req.Version == VersionToken && len(r.Header.Values("X-Forwarded-For")) > 0:
		// IMDS refuses token requests that went through a proxy; so do we.
		refuse(http.StatusForbidden, "x_forwarded_for", "403 - Forbidden\n")
		return
	case req.Version == VersionV1 && info.r.V2Required && b.enforce.Load():
		// What IMDS answers with HttpTokens=required: SDKs fetch a token and retry.
		refuse(http.StatusUnauthorized, "imdsv2_required", "401 - Unauthorized\n")
		return
	}
	body := http.MaxBytesReader(w, r.Body, b.cfg.MaxBodyBytes)
	status, creds, err := b.forward(w, r, body, info.r)
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			refuse(http.StatusRequestEntityTooLarge, "body_too_large", "413 - Request Entity Too Large\n")
			return
		}
		if r.Context().Err() != nil && status == 0 {
			finish(0, "client_gone") // nobody left to answer
			return
		}
		b.log.Warn().Err(err).Str("event", "broker_upstream_failed").Str("path", r.URL.Path).Msg("forwarding to IMDS")
		if status == 0 {
			refuse(http.StatusBadGateway, "upstream_error", "502 - Bad Gateway\n")
			return
		}
	}
	req.Body = creds
	finish(status, "")
}

// forward sends the request to IMDS and copies the answer back. It returns the status
// written (0 if nothing was) and, for a successful credential request, the body.
func (b *Broker) forward(w http.ResponseWriter, r *http.Request, body io.Reader, conn hook.Redirect) (int, []byte, error) {
	host := b.cfg.IMDS4.String()
	if conn.Dst.Addr().Is6() && !conn.Dst.Addr().Is4In6() {
		host = "[" + b.cfg.IMDS6.String() + "]"
	}
	u := *r.URL
	u.Scheme, u.Host = "http", host+":"+strconv.Itoa(b.cfg.IMDSPort)
	ctx, cancel := context.WithTimeout(r.Context(), b.cfg.UpstreamTimeout)
	defer cancel()
	if r.ContentLength == 0 {
		body = http.NoBody
	}
	up, err := http.NewRequestWithContext(ctx, r.Method, u.String(), body)
	if err != nil {
		return 0, nil, fmt.Errorf("build upstream request: %w", err)
	}
	up.Header = r.Header.Clone()
	for _, h := range hopByHop {
		up.Header.Del(h)
	}
	up.Host = r.Host
	up.ContentLength = r.ContentLength
	resp, err := b.upstream.RoundTrip(up) // RoundTrip follows no redirects
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	for k, vs := range resp.Header {
		for _, v := range vs {
			w.Header().Add(k, v)
		}
	}
	for _, h := range hopByHop {
		w.Header().Del(h)
	}
	w.WriteHeader(resp.StatusCode)
	if resp.StatusCode == http.StatusOK && r.Method == http.MethodGet && IsCredentialPath(r.URL.Path) {
		data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if err != nil {
			return resp.StatusCode, nil, fmt.Errorf("read credentials: %w", err)
		}
		_, err = w.Write(data)
		return resp.StatusCode, data, err
	}
	_, err = io.Copy(w, resp.Body)
	return resp.StatusCode, nil, err
}
