package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/broker"
	"github.com/imdsguard/imdsguard/internal/agent/config"
)

// imdsIdentity fetches the instance identity document and its PKCS#7 signature over
// IMDSv2, on marked sockets the kernel never redirects, and keeps them for an hour.
type imdsIdentity struct {
	base   string
	client *http.Client

	mu      sync.Mutex
	doc     string
	sig     string
	fetched time.Time
}

func newIMDSIdentity(cfg config.Config) *imdsIdentity {
	return &imdsIdentity{
		base:   "http://" + net.JoinHostPort(cfg.IMDS.Addr4.String(), strconv.Itoa(cfg.IMDS.Port)),
		client: markedIMDSClient(cfg),
	}
}

// markedIMDSClient carries the agent's own requests (to IMDS, and to AWS APIs) over
// marked sockets: the kernel program neither judges nor redirects them, so the agent
// never talks to its own broker.
func markedIMDSClient(cfg config.Config) *http.Client {
	dialer := broker.MarkedDialer(cfg.Broker.Mark, 5*time.Second)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext = dialer.DialContext
	return &http.Client{Timeout: 30 * time.Second, Transport: tr}
}

func (i *imdsIdentity) Document(ctx context.Context) (string, string, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.doc != "" && time.Since(i.fetched) < time.Hour {
		return i.doc, i.sig, nil
	}
	token, err := i.do(ctx, http.MethodPut, "/latest/api/token", "")
	if err != nil {
		return "", "", err
	}
	doc, err := i.do(ctx, http.MethodGet, "/latest/dynamic/instance-identity/document", token)
	if err != nil {
		return "", "", err
	}
	sig, err := i.do(ctx, http.MethodGet, "/latest/dynamic/instance-identity/pkcs7", token)
	if err != nil {
		return "", "", err
	}
	i.doc, i.sig, i.fetched = doc, sig, time.Now()
	return doc, sig, nil
}

func (i *imdsIdentity) do(ctx context.Context, method, path, token string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, method, i.base+path, nil)
	if err != nil {
		return "", err
	}
	if token == "" {
		req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
	} else {
		req.Header.Set("X-aws-ec2-metadata-token", token)
	}
	resp, err := i.client.Do(req)
	if err != nil {
		return "", fmt.Errorf("IMDS %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", fmt.Errorf("IMDS %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("IMDS %s: status %d", path, resp.StatusCode)
	}
	return string(body), nil
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
func (i *imdsIdentity) learnHostMeta(ctx context.Context, m *hostMeta, log zerolog.Logger) {
	for {
		wait := time.Hour
		if err := i.fetchHostMeta(ctx, m); err != nil {
			wait = 30 * time.Second
			log.Warn().Err(err).Str("event", "host_meta_unavailable").Msg("fingerprints lack the instance profile and public addresses for now")
		} else {
			arn, public := m.get()
			log.Info().Str("event", "host_meta_learnt").Str("instance_profile_arn", arn).Int("public_addresses", len(public)).
				Msg("instance profile and public addresses learnt")
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

func (i *imdsIdentity) fetchHostMeta(ctx context.Context, m *hostMeta) error {
	token, err := i.do(ctx, http.MethodPut, "/latest/api/token", "")
	if err != nil {
		return err
	}
	var info struct{ InstanceProfileArn string }
	if body, err := i.do(ctx, http.MethodGet, "/latest/meta-data/iam/info", token); err == nil {
		_ = json.Unmarshal([]byte(body), &info)
	}
	var public []netip.Addr
	for _, path := range []string{"/latest/meta-data/public-ipv4", "/latest/meta-data/ipv6"} {
		// 404 on instances without one: not an error.
		if body, err := i.do(ctx, http.MethodGet, path, token); err == nil {
			for _, f := range strings.Fields(body) {
				if a, err := netip.ParseAddr(f); err == nil {
					public = append(public, a)
				}
			}
		}
	}
	m.mu.Lock()
	m.profileARN, m.public = info.InstanceProfileArn, public
	m.mu.Unlock()
	return nil
}
