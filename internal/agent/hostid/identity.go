// Package hostid is the agent's one client of IMDS for its own needs: it learns which EC2
// instance the agent runs on (instance id, account, region, availability zone, instance
// type, AMI) from the instance identity document, over IMDSv2, keeps that document and
// its signature for the fingerprint forwarder, and reads the host facts fingerprints
// carry. The agent must keep guarding when IMDS is unreachable, so the lookup
// runs in the background, retries with backoff and says clearly that it is still
// missing; metrics go out without the instance's dimensions until it arrives.
package hostid

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/retry"
)

// Identity is what the instance identity document says about this instance.
type Identity struct {
	InstanceID       string `json:"instance_id"`
	AccountID        string `json:"account_id"`
	Region           string `json:"region"`
	AvailabilityZone string `json:"availability_zone"`
	InstanceType     string `json:"instance_type"`
	ImageID          string `json:"image_id"`
}

// Options shape a Source. Only Endpoint is usually set.
type Options struct {
	// Endpoint is IMDS's base URL, e.g. "http://169.254.169.254". Empty means the SDK's
	// default (which honours AWS_EC2_METADATA_SERVICE_ENDPOINT).
	Endpoint string
	// HTTPClient, when set, carries the requests. The agent passes one whose sockets
	// the kernel program does not redirect to the broker (the agent must reach the real
	// IMDS, not itself).
	HTTPClient *http.Client
	// FirstBackoff and MaxBackoff bound the wait between attempts (defaults 1s, 5m).
	FirstBackoff, MaxBackoff time.Duration
	// AttemptTimeout bounds one attempt, token and document included (default 5s).
	AttemptTimeout time.Duration
	Log            zerolog.Logger
}

// Source holds the identity once learnt. It is safe for concurrent use.
type Source struct {
	client *Client
	opts   Options

	mu      sync.Mutex
	id      Identity
	known   bool
	ready   chan struct{}
	doc     string // the identity document and its signature, as IMDS served them
	sig     string
	fetched time.Time
}

// New returns a Source; call Run to learn the identity.
func New(opts Options) *Source {
	if opts.FirstBackoff <= 0 {
		opts.FirstBackoff = time.Second
	}
	if opts.MaxBackoff < opts.FirstBackoff {
		opts.MaxBackoff = max(5*time.Minute, opts.FirstBackoff)
	}
	if opts.AttemptTimeout <= 0 {
		opts.AttemptTimeout = 5 * time.Second
	}
	return &Source{client: NewClient(opts.Endpoint, opts.HTTPClient), opts: opts, ready: make(chan struct{})}
}

// Get returns the identity and whether it is known yet.
func (s *Source) Get() (Identity, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.id, s.known
}

// Ready is closed once the identity is known.
func (s *Source) Ready() <-chan struct{} { return s.ready }

// Run tries until the identity is learnt or ctx is done. It warns on the first
// failure and then at every doubling of the attempt count, so a host without IMDS
// says so plainly without flooding the log.
func (s *Source) Run(ctx context.Context) error {
	backoff := retry.Backoff{Min: s.opts.FirstBackoff, Max: s.opts.MaxBackoff}
	for attempt := 1; ; attempt++ {
		id, err := s.fetch(ctx)
		if err == nil {
			s.mu.Lock()
			s.id, s.known = id, true
			s.mu.Unlock()
			close(s.ready)
			s.opts.Log.Info().Str("event", "identity_learnt").Int("attempt", attempt).
				Str("instance_id", id.InstanceID).Str("account_id", id.AccountID).Str("region", id.Region).
				Str("availability_zone", id.AvailabilityZone).Str("instance_type", id.InstanceType).
				Str("image_id", id.ImageID).Msg("instance identity learnt from IMDS")
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		wait := backoff.Next()
		if attempt&(attempt-1) == 0 {
			s.opts.Log.Warn().Str("event", "identity_unavailable").Err(err).Int("attempt", attempt).
				Dur("retry_in", wait).
				Msg("cannot learn the instance identity from IMDS; metrics go out without InstanceId until it can")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

// Client is the IMDS client the Source uses, for the agent's other reads.
func (s *Source) Client() *Client { return s.client }

// Document returns the identity document and its signature, fetched again when older
// than an hour; the forwarder sends them with every batch.
func (s *Source) Document(ctx context.Context) (string, string, error) {
	s.mu.Lock()
	doc, sig, fetched := s.doc, s.sig, s.fetched
	s.mu.Unlock()
	if sig != "" && time.Since(fetched) < time.Hour {
		return doc, sig, nil
	}
	doc, sig, err := s.client.Document(ctx)
	if err != nil {
		return "", "", err
	}
	s.mu.Lock()
	s.doc, s.sig, s.fetched = doc, sig, time.Now()
	s.mu.Unlock()
	return doc, sig, nil
}

// fetch learns the identity from the document alone: metrics need no signature.
func (s *Source) fetch(ctx context.Context) (Identity, error) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.AttemptTimeout)
	defer cancel()
	doc, err := s.client.dynamic(ctx, "instance-identity/document")
	if err != nil {
		return Identity{}, fmt.Errorf("get instance identity document: %w", err)
	}
	return ParseDocument(doc)
}
