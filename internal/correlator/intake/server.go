package intake

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	stdlog "log"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/rs/zerolog"
)

// ServerConfig says where and how the intake listens.
type ServerConfig struct {
	Listen string
	// TLSCert and TLSKey are the server's certificate and key (PEM files).
	TLSCert, TLSKey string
	// ClientCA, when set, is a PEM file of CAs whose client certificates are accepted
	// instead of an identity document (mTLS senders).
	ClientCA string
	// PlainHTTP serves without TLS: for tests on loopback only.
	PlainHTTP bool
	// PurgeGrace is how long after its expiration a fingerprint is kept.
	PurgeGrace time.Duration
	// PurgeInterval is how often expired fingerprints are purged; default 10m.
	PurgeInterval time.Duration
}

// Server runs the intake: the HTTP(S) listener and the purge timer. It is a component
// of `imdsguard-correlator serve`.
type Server struct {
	cfg     ServerConfig
	handler *Handler
	store   Store
	log     zerolog.Logger
	tls     *tls.Config
}

// NewServer checks cfg (certificates readable, plain HTTP only on loopback) and returns
// a server for h, whose store it purges.
func NewServer(cfg ServerConfig, h *Handler, log zerolog.Logger) (*Server, error) {
	s := &Server{cfg: cfg, handler: h, store: h.opt.Store, log: log}
	if s.cfg.PurgeInterval <= 0 {
		s.cfg.PurgeInterval = 10 * time.Minute
	}
	if cfg.PlainHTTP {
		if err := CheckLoopback(cfg.Listen); err != nil {
			return nil, err
		}
		return s, nil
	}
	var err error
	if s.tls, err = TLSConfig(cfg); err != nil {
		return nil, err
	}
	return s, nil
}

// CheckLoopback refuses a listen address that is not on loopback (plain HTTP only).
func CheckLoopback(listen string) error {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("intake listen address %q: %w", listen, err)
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("plain HTTP is only allowed on a loopback address, not %q", listen)
	}
	return nil
}

// TLSConfig loads the server's key pair and, when configured, the client CAs.
func TLSConfig(cfg ServerConfig) (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("load intake tls certificate: %w", err)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{pair}}
	if cfg.ClientCA != "" {
		data, err := os.ReadFile(cfg.ClientCA)
		if err != nil {
			return nil, fmt.Errorf("read intake client ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(data) {
			return nil, fmt.Errorf("intake client ca %s: no PEM certificate", cfg.ClientCA)
		}
		// Agents prove themselves with an identity document; a certificate is the
		// alternative, so it is checked when given and not demanded.
		tc.ClientAuth = tls.VerifyClientCertIfGiven
		tc.ClientCAs = pool
	}
	return tc, nil
}

// Name implements the correlator's component.
func (s *Server) Name() string { return "intake" }

// Run listens until ctx ends, then shuts down gracefully (in-flight batches finish).
func (s *Server) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen for fingerprints: %w", err)
	}
	return s.Serve(ctx, ln)
}

// Serve is Run on a listener the caller opened.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if s.tls != nil {
		ln = tls.NewListener(ln, s.tls)
	}
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		// TLS handshake failures and the like go to the log, not to stderr.
		ErrorLog: stdlog.New(s.log.With().Str("event", "intake_http_error").Logger(), "", 0),
	}
	s.log.Info().Str("event", "intake_listening").Str("addr", ln.Addr().String()).Bool("tls", s.tls != nil).
		Bool("mtls", s.tls != nil && s.tls.ClientCAs != nil).Msg("fingerprint intake listening")
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	t := time.NewTicker(s.cfg.PurgeInterval)
	defer t.Stop()
	s.purge(ctx)
	for {
		select {
		case err := <-errc:
			return fmt.Errorf("serve fingerprints: %w", err)
		case <-t.C:
			s.purge(ctx)
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := srv.Shutdown(sctx); err != nil {
				return fmt.Errorf("shut down intake: %w", err)
			}
			if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("serve fingerprints: %w", err)
			}
			return nil
		}
	}
}

// purge drops fingerprints that expired more than PurgeGrace ago.
func (s *Server) purge(ctx context.Context) {
	n, err := s.store.Purge(ctx, time.Now().Add(-s.cfg.PurgeGrace))
	if err != nil {
		s.log.Error().Str("event", "fingerprint_purge_failed").Err(err).Msg("purging expired fingerprints failed; retrying next interval")
		return
	}
	if n > 0 {
		s.log.Info().Str("event", "fingerprints_purged").Int64("purged", n).Dur("grace", s.cfg.PurgeGrace).Msg("purged expired fingerprints")
	}
}
