// Package capture turns the credential answers the broker relays into fingerprints
// (internal/wire) without keeping a secret: the agent's half of credential tracking.
package capture

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/imdsguard/imdsguard/internal/atomicfile"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// Capturer turns the credential answers the broker relayed into fingerprints: one per
// distinct credential per process, repeats only counted. The answer's secrets are read
// to be dropped: the secret access key never leaves this function, and the session
// token only as an HMAC under a per-host secret.
type Capturer struct {
	secret   []byte
	instance func() wire.Instance
	addrs    func() []netip.Addr

	mu   sync.Mutex
	seen map[seenKey]int
}

type seenKey struct {
	accessKeyID string
	pid         int
	start       uint64
}

// NewCapturer returns a capturer. instance and addrs give the host's identity and
// addresses at the time of a fetch; either may be nil.
func NewCapturer(secret []byte, instance func() wire.Instance, addrs func() []netip.Addr) *Capturer {
	return &Capturer{secret: secret, instance: instance, addrs: addrs, seen: map[seenKey]int{}}
}

// credentials is IMDS's answer; only what a fingerprint keeps is decoded, plus the
// token to hash. SecretAccessKey is deliberately not a field.
type credentials struct {
	Code        string
	RoleArn     string // ECS
	AccessKeyID string `json:"AccessKeyId"`
	Token       string
	LastUpdated time.Time
	Expiration  time.Time
}

// Observe records one credential answer for path fetched by proc (whose start time
// tells pid reuse apart). It returns the fingerprint and true the first time this
// process fetched this credential.
func (c *Capturer) Observe(urlPath string, body []byte, proc wire.Process, procStart uint64, imdsVersion string) (wire.Fingerprint, bool, error) {
	return c.ObserveEndpoint("imds", urlPath, body, proc, procStart, imdsVersion)
}

// ObserveEndpoint is Observe for a credential answer of endpoint ("imds", "ecs",
// "pod_identity"). IMDS names the role in its path; ECS in the answer's RoleArn; the
// Pod Identity agent not at all. urlPath is only read for IMDS: an ECS path holds the
// task's credentials id, a secret.
func (c *Capturer) ObserveEndpoint(endpoint, urlPath string, body []byte, proc wire.Process, procStart uint64, imdsVersion string) (wire.Fingerprint, bool, error) {
	var cr credentials
	if err := json.Unmarshal(body, &cr); err != nil {
		return wire.Fingerprint{}, false, fmt.Errorf("decode credential answer: %w", errors.New("not JSON")) // never echo the body
	}
	if cr.AccessKeyID == "" {
		return wire.Fingerprint{}, false, fmt.Errorf("decode credential answer: no AccessKeyId")
	}
	k := seenKey{cr.AccessKeyID, proc.PID, procStart}
	c.mu.Lock()
	c.seen[k]++
	first := c.seen[k] == 1
	c.mu.Unlock()
	fp := wire.Fingerprint{
		AccessKeyID: cr.AccessKeyID,
		LastUpdated: cr.LastUpdated,
		Expiration:  cr.Expiration,
		Process:     proc,
		IMDSVersion: imdsVersion,
	}
	if fp.LastUpdated.IsZero() {
		// The ECS and Pod Identity answers carry no issue time: the host had the key
		// from this fetch at the latest. Late rather than early, so the correlator
		// never dates the host's claim on the key before the host could have had it.
		fp.LastUpdated = time.Now().UTC().Truncate(time.Second)
	}
	switch endpoint {
	case "imds":
		fp.Role = path.Base(urlPath)
	default:
		fp.Endpoint = endpoint
		if _, name, ok := strings.Cut(cr.RoleArn, ":role/"); ok {
			fp.RoleARN, fp.Role = cr.RoleArn, path.Base(name)
		}
	}
	if cr.Token != "" {
		m := hmac.New(sha256.New, c.secret)
		m.Write([]byte(cr.Token))
		fp.TokenHMAC = hex.EncodeToString(m.Sum(nil))
	}
	if c.instance != nil {
		fp.Instance = c.instance()
	}
	if c.addrs != nil {
		fp.HostAddresses = c.addrs()
	}
	// Stable across agent restarts: the same process fetching the same key is the same
	// fingerprint, so the correlator can be idempotent by id.
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s|%s|%d|%d", fp.AccessKeyID, fp.Instance.ID, proc.PID, procStart)))
	fp.ID = hex.EncodeToString(sum[:16])
	return fp, first, nil
}

// HostSecret returns the per-host HMAC secret kept at path, creating it (0600) on first
// use. It never leaves the host.
func HostSecret(path string) ([]byte, error) {
	if data, err := os.ReadFile(path); err == nil && len(data) >= 32 {
		return data, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return nil, fmt.Errorf("generate host secret: %w", err)
	}
	if err := atomicfile.Write(path, secret, 0o600); err != nil {
		return nil, fmt.Errorf("write host secret: %w", err)
	}
	return secret, nil
}
