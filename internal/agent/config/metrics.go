package config

import (
	"net"
	"net/url"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/imdsguard/imdsguard/internal/yamlfile"
)

// Metrics configures the MetadataNoToken-style counters the agent publishes. The key
// names are a contract (issue 4): namespace, interval, max_executables, cloudwatch.*,
// emf.output, prometheus.listen.
type Metrics struct {
	// Namespace is the CloudWatch namespace; "AWS/" is reserved by AWS.
	Namespace string `yaml:"namespace"`
	// Interval is how long counts are aggregated before they are published.
	Interval time.Duration `yaml:"interval"`
	// MaxExecutables caps the Executable (and User) dimension values per interval: the
	// top N are published, the rest are summed as "other", so that one host cannot run
	// up a CloudWatch bill.
	MaxExecutables int        `yaml:"max_executables"`
	CloudWatch     CloudWatch `yaml:"cloudwatch"`
	EMF            EMF        `yaml:"emf"`
	Prometheus     Prometheus `yaml:"prometheus"`
}

// CloudWatch configures PutMetricData.
type CloudWatch struct {
	Enabled bool `yaml:"enabled"`
	// Region defaults to the instance's own region, learnt from IMDS.
	Region string `yaml:"region"`
	// Endpoint overrides the service endpoint (a VPC endpoint, or a local stand-in).
	Endpoint string `yaml:"endpoint"`
}

// EMF configures Embedded Metric Format lines for the CloudWatch agent.
type EMF struct {
	// Output is "" (off), "stdout" or an absolute file path (appended to, created 0600).
	Output string `yaml:"output"`
}

// Prometheus configures the /metrics endpoint.
type Prometheus struct {
	// Listen is host:port; "" turns the endpoint off. Loopback by default because the
	// counts name the programs on this host.
	Listen string `yaml:"listen"`
}

// Status configures the local socket that `imdsguard status` reads.
type Status struct {
	// Socket is the unix socket path (root only, 0600); "" turns it off.
	Socket string `yaml:"socket"`
}

// DefaultStatusSocket is where the agent serves `imdsguard status` unless configured.
const DefaultStatusSocket = "/run/imdsguard/status.sock"

func defaultMetrics() Metrics {
	return Metrics{
		Namespace:      "IMDSGuard",
		Interval:       60 * time.Second,
		MaxExecutables: 20,
		Prometheus:     Prometheus{Listen: "127.0.0.1:9775"},
	}
}

func defaultStatus() Status { return Status{Socket: DefaultStatusSocket} }

var regionRE = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-[0-9]+$`)

// validateMetrics checks the metrics and status keys; events is events.output, which
// EMF must not share (two writers interleaving lines in one file).
func validateMetrics(m *Metrics, s *Status, events string, root *yaml.Node) error {
	bad := func(key, format string, args ...any) error {
		return yamlfile.Errorf(root, key, format, args...)
	}
	switch ns := m.Namespace; {
	case ns == "" || len(ns) > 255:
		return bad("metrics.namespace", "must be 1-255 characters, got %q", ns)
	case strings.HasPrefix(ns, "AWS/"):
		return bad("metrics.namespace", `must not start with "AWS/" (reserved by AWS), got %q`, ns)
	case strings.IndexFunc(ns, func(r rune) bool { return r < 0x20 || r > 0x7e }) >= 0:
		return bad("metrics.namespace", "must be printable ASCII, got %q", ns)
	}
	if m.Interval < time.Second || m.Interval > time.Hour {
		return bad("metrics.interval", "must be 1s-1h, got %s", m.Interval)
	}
	if m.MaxExecutables < 1 || m.MaxExecutables > 500 {
		return bad("metrics.max_executables", "must be 1-500, got %d", m.MaxExecutables)
	}
	if r := m.CloudWatch.Region; r != "" && !regionRE.MatchString(r) {
		return bad("metrics.cloudwatch.region", "not an AWS region name, got %q", r)
	}
	if e := m.CloudWatch.Endpoint; e != "" {
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad("metrics.cloudwatch.endpoint", "must be an http:// or https:// URL, got %q", e)
		}
	}
	if o := m.EMF.Output; o != "" && o != "stdout" && !filepath.IsAbs(o) {
		return bad("metrics.emf.output", `must be "", "stdout" or an absolute file path, got %q`, o)
	}
	if o := m.EMF.Output; o != "" && o == events {
		return bad("metrics.emf.output", "must differ from events.output (%q): both write JSON lines", events)
	}
	if l := m.Prometheus.Listen; l != "" {
		host, port, err := net.SplitHostPort(l)
		if err != nil {
			return bad("metrics.prometheus.listen", "must be host:port, got %q", l)
		}
		if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
			return bad("metrics.prometheus.listen", "port must be 1-65535, got %q", port)
		}
		if host == "" {
			return bad("metrics.prometheus.listen", "needs an explicit host (127.0.0.1 keeps it local), got %q", l)
		}
	}
	if p := s.Socket; p != "" && !filepath.IsAbs(p) {
		return bad("status.socket", "must be an absolute path, got %q", p)
	}
	return nil
}
