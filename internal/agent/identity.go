package agent

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/imdsguard/imdsguard/internal/broker"
	"github.com/imdsguard/imdsguard/internal/config"
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
