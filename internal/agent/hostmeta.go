package agent

import (
	"context"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/broker"
	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/retry"
)

// markedIMDSClient carries the agent's own requests (to IMDS, and to AWS APIs) over
// sockets registered with own before they connect: the kernel program neither judges
// nor redirects them, so the agent never talks to its own broker.
func markedIMDSClient(cfg config.Config, own func(fd int) error) *http.Client {
	dialer := broker.MarkedDialer(cfg.Broker.Mark, 5*time.Second, own)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext = dialer.DialContext
	return &http.Client{Timeout: 30 * time.Second, Transport: tr}
}

// hostMeta is what fingerprints add from IMDS about the host: the instance profile and
// the public addresses, from which the instance's own API calls legitimately come.
type hostMeta struct {
	mu         sync.Mutex
	profileARN string
	public     []netip.Addr
}

func (m *hostMeta) get() (string, []netip.Addr) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.profileARN, append([]netip.Addr(nil), m.public...)
}

// learnHostMeta fills m from IMDS in the background: at once, then every hour (an
// elastic IP may move), retrying every 30 s while IMDS does not answer.
func learnHostMeta(ctx context.Context, c *hostid.Client, m *hostMeta, log zerolog.Logger) {
	for {
		wait := time.Hour
		arn, public, err := c.HostFacts(ctx)
		if err != nil {
			wait = 30 * time.Second
			log.Warn().Err(err).Str("event", "host_meta_unavailable").Msg("fingerprints lack the instance profile and public addresses for now")
		} else {
			m.mu.Lock()
			m.profileARN, m.public = arn, public
			m.mu.Unlock()
			log.Info().Str("event", "host_meta_learnt").Str("instance_profile_arn", arn).Int("public_addresses", len(public)).
				Msg("instance profile and public addresses learnt")
		}
		if retry.Sleep(ctx, wait) != nil {
			return
		}
	}
}
