// Package forwarder drains the fingerprint spool to the correlator: in batches, over
// HTTPS, each batch carrying the instance identity document and its PKCS#7 signature so
// the correlator can tell who is speaking. Delivery is at least once: a batch leaves the
// spool only when the correlator has taken it (which is idempotent by fingerprint id),
// failures are retried with exponential backoff and jitter, and a batch the correlator
// calls malformed is set aside (counted) so that it cannot block the rest forever.
package forwarder

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/spool"
	"github.com/imdsguard/imdsguard/internal/retry"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// Config says where and how to send.
type Config struct {
	URL        string // https://host:port/v1/fingerprints
	CAFile     string // PEM bundle to trust instead of the system roots
	ClientCert string // mTLS, with ClientKey
	ClientKey  string
	BatchSize  int
	MinBackoff time.Duration
	MaxBackoff time.Duration
	Timeout    time.Duration
}

// Identity supplies the instance identity document and its PKCS#7 signature, exactly
// as IMDS serves them.
type Identity interface {
	Document(ctx context.Context) (document, pkcs7 string, err error)
}

// Stats are the forwarder's counters.
type Stats struct {
	Sent      atomic.Uint64 // fingerprints the correlator took
	Discarded atomic.Uint64 // fingerprints in batches the correlator refused as malformed
	Failures  atomic.Uint64 // failed attempts (retried)
}

// Forwarder sends spooled fingerprints.
type Forwarder struct {
	cfg      Config
	spool    *spool.Spool
	identity Identity
	client   *http.Client
	log      zerolog.Logger
	Stats    Stats
}

// New checks cfg and builds the HTTPS client.
func New(cfg Config, sp *spool.Spool, id Identity, log zerolog.Logger) (*Forwarder, error) {
	if cfg.BatchSize <= 0 {
		cfg.BatchSize = 100
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = time.Second
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = 5 * time.Minute
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("read correlator CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("correlator CA %s holds no PEM certificate", cfg.CAFile)
		}
		tlsCfg.RootCAs = pool
	}
	if cfg.ClientCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.ClientCert, cfg.ClientKey)
		if err != nil {
			return nil, fmt.Errorf("load client certificate: %w", err)
		}
		tlsCfg.Certificates = []tls.Certificate{cert}
	}
	tr := &http.Transport{Proxy: http.ProxyFromEnvironment, TLSClientConfig: tlsCfg, MaxIdleConnsPerHost: 2}
	return &Forwarder{cfg: cfg, spool: sp, identity: id, log: log,
		client: &http.Client{Transport: tr, Timeout: cfg.Timeout}}, nil
}

// Run drains the spool until ctx is done.
func (f *Forwarder) Run(ctx context.Context) error {
	backoff := retry.Backoff{Min: f.cfg.MinBackoff, Max: f.cfg.MaxBackoff}
	idle := time.NewTicker(5 * time.Second)
	defer idle.Stop()
	for {
		sent, err := f.sendBatch(ctx)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil:
			f.Stats.Failures.Add(1)
			wait := backoff.Next()
			f.log.Warn().Err(err).Str("event", "forward_failed").Dur("retry_in", wait).Msg("correlator did not take the batch")
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		case sent > 0:
			backoff.Reset()
		default:
			select {
			case <-ctx.Done():
				return nil
			case <-f.spool.Notify():
			case <-idle.C:
			}
		}
	}
}

// jitter spreads retries of a fleet: a random wait between d/2 and d.

// sendBatch sends the oldest batch; it returns how many fingerprints left the spool.
func (f *Forwarder) sendBatch(ctx context.Context) (int, error) {
	recs, err := f.spool.Peek(f.cfg.BatchSize)
	if err != nil || len(recs) == 0 {
		return 0, err
	}
	// A sender with a client certificate proves itself with it: it may be no EC2
	// instance at all, so IMDS is not asked for a document it may not have.
	var doc, sig string
	if f.cfg.ClientCert == "" {
		if doc, sig, err = f.identity.Document(ctx); err != nil {
			return 0, fmt.Errorf("instance identity: %w", err)
		}
	}
	id := make([]byte, 8)
	_, _ = rand.Read(id)
	req := wire.Batch{Document: doc, PKCS7: sig, BatchID: hex.EncodeToString(id)}
	for _, r := range recs {
		var fp wire.Fingerprint
		if err := json.Unmarshal(r.Data, &fp); err != nil {
			// The spool's checksums passed, so this is ours but unreadable: never sendable.
			f.Stats.Discarded.Add(1)
			f.log.Error().Err(err).Str("event", "forward_discarded").Msg("spooled fingerprint is not readable")
			continue
		}
		req.Fingerprints = append(req.Fingerprints, withInstance(fp, doc))
	}
	next := recs[len(recs)-1].Next
	if len(req.Fingerprints) == 0 {
		return len(recs), f.spool.Ack(next)
	}
	body, err := json.Marshal(req)
	if err != nil {
		return 0, fmt.Errorf("encode batch: %w", err)
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, f.cfg.URL, bytes.NewReader(body))
	if err != nil {
		return 0, fmt.Errorf("build request: %w", err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := f.client.Do(hreq)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	switch {
	case resp.StatusCode == http.StatusOK:
		if err := f.spool.Ack(next); err != nil {
			return 0, err
		}
		f.Stats.Sent.Add(uint64(len(recs)))
		f.log.Debug().Str("event", "forwarded").Int("fingerprints", len(recs)).Str("batch_id", req.BatchID).Msg("batch taken")
		return len(recs), nil
	case resp.StatusCode == http.StatusBadRequest || resp.StatusCode == http.StatusRequestEntityTooLarge:
		// Sending it again cannot succeed: set it aside rather than block the spool.
		if err := f.spool.Ack(next); err != nil {
			return 0, err
		}
		f.Stats.Discarded.Add(uint64(len(recs)))
		f.log.Error().Str("event", "forward_discarded").Int("status", resp.StatusCode).Int("fingerprints", len(recs)).
			Str("batch_id", req.BatchID).Str("answer", string(answer)).Msg("correlator refused the batch as malformed")
		return len(recs), nil
	default:
		return 0, fmt.Errorf("correlator answered %d: %s", resp.StatusCode, bytes.TrimSpace(answer))
	}
}

// withInstance fills a fingerprint's instance from the identity document when the
// agent did not know it yet at fetch time (IMDS was slow at boot): the correlator
// checks that they match, and a batch it refuses for that would block the spool.
func withInstance(fp wire.Fingerprint, document string) wire.Fingerprint {
	if fp.Instance.ID != "" {
		return fp
	}
	var doc struct {
		InstanceID       string `json:"instanceId"`
		AccountID        string `json:"accountId"`
		Region           string `json:"region"`
		AvailabilityZone string `json:"availabilityZone"`
	}
	if err := json.Unmarshal([]byte(document), &doc); err != nil || doc.InstanceID == "" {
		return fp
	}
	fp.Instance = wire.Instance{ID: doc.InstanceID, AccountID: doc.AccountID, Region: doc.Region, AvailabilityZone: doc.AvailabilityZone}
	return fp
}
