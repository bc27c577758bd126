// Package config reads and validates the agent's YAML configuration. Every error names
// the key and the line it came from, so an operator can fix a file without guessing, and
// the agent refuses to start on any error rather than run with half a config.
package config

import (
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/imdsguard/imdsguard/internal/yamlfile"
)

// Config is the agent's configuration. Field names in YAML are a contract with operators
// and outside test harnesses: rename nothing.
type Config struct {
	// Cgroup is the cgroup v2 directory whose processes are guarded. Empty means the
	// cgroup2 root, i.e. every process of the host.
	Cgroup string `yaml:"cgroup"`
	IMDS   IMDS   `yaml:"imds"`
	// Endpoints are the credential endpoints guarded: IMDS (at the imds keys' addresses)
	// and, opted in, the ECS task credential endpoint and the EKS Pod Identity agent.
	Endpoints []Endpoint `yaml:"endpoints"`
	Events    Events     `yaml:"events"`
	Log       Log        `yaml:"log"`
	Agent     Agent      `yaml:"agent"`

	// Mode is "audit" (record what the allowlist would deny, deny nothing) or
	// "enforce" (EPERM at connect, 401 for IMDSv1 where a rule requires v2).
	Mode Mode `yaml:"mode"`
	// FailureMode is what the kernel does while the agent is gone: "open" (straight to
	// IMDS, still counted) or "closed" (EPERM).
	FailureMode FailureMode `yaml:"failure_mode"`
	// DefaultAction applies when no rule matches: "allow" or "deny".
	DefaultAction Action `yaml:"default_action"`
	// PinPath is where programs, links and maps are pinned, on a bpf file system, so
	// that they keep guarding across restarts. "" disables pinning.
	PinPath string `yaml:"pin_path"`
	Rules   []Rule `yaml:"rules"`
	Broker  Broker `yaml:"broker"`
	// ControlSocket is where the running agent takes commands (`imdsguard reload`).
	ControlSocket string `yaml:"control_socket"`
	// StateDir holds what the agent keeps across restarts (the per-host HMAC secret).
	StateDir     string       `yaml:"state_dir"`
	Fingerprints Fingerprints `yaml:"fingerprints"`
	// Metrics and Status are defined in metrics.go.
	Metrics Metrics `yaml:"metrics"`
	Status  Status  `yaml:"status"`
	// Containers is defined in containers.go.
	Containers Containers `yaml:"containers"`
}

// Fingerprints configures credential issuance records: which process fetched which
// AccessKeyId (never a secret).
type Fingerprints struct {
	// Output is a JSON-lines file of fingerprints, "" for none.
	Output string `yaml:"output"`
	// Correlator is where fingerprints are forwarded; no URL, no forwarding.
	Correlator Correlator `yaml:"correlator"`
	// SpoolMaxBytes bounds the on-disk spool (state_dir/spool); the oldest go first.
	SpoolMaxBytes int64 `yaml:"spool_max_bytes"`
}

// Correlator is the central service's intake.
type Correlator struct {
	URL        string `yaml:"url"`         // https://correlator:8443/v1/fingerprints
	CAFile     string `yaml:"ca_file"`     // trust this CA instead of the system's
	ClientCert string `yaml:"client_cert"` // mTLS instead of the identity document
	ClientKey  string `yaml:"client_key"`
}

// IMDS says where the Instance Metadata Service is. Only tests change the defaults.
type IMDS struct {
	IPv4 string `yaml:"ipv4"`
	IPv6 string `yaml:"ipv6"`
	Port int    `yaml:"port"`

	Addr4 netip.Addr `yaml:"-"`
	Addr6 netip.Addr `yaml:"-"`
}

// Events says where the one-JSON-line-per-connection record goes.
type Events struct {
	// Output is "stdout" or a file path (appended to, created 0600).
	Output string `yaml:"output"`
	// UDP: a UDP connect() to IMDS writes an event (the first per process each second,
	// the rest counted in a summary, as refused connects are). Off, UDP connects are
	// only counted in summaries: nothing useful answers UDP on IMDS's port, and a UDP
	// flood costs the sender nothing.
	UDP bool `yaml:"udp"`
}

// Log configures the agent's own diagnostic log (not the events).
type Log struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Output string `yaml:"output"` // stderr, stdout or a file path
}

// Agent holds tuning knobs that rarely need changing.
type Agent struct {
	// StatsInterval is how often drop counters are checked and reported.
	StatsInterval time.Duration `yaml:"stats_interval"`
	// QueueSize bounds the events waiting between the ring-buffer reader and enrichment.
	QueueSize int `yaml:"queue_size"`
	// ReadyFile, when set, is written once the hooks are attached (for supervisors/tests).
	ReadyFile string `yaml:"ready_file"`
}

// Default returns the configuration used for every key a file leaves out.
func Default() Config {
	return Config{
		IMDS:      IMDS{IPv4: "169.254.169.254", IPv6: "fd00:ec2::254", Port: 80},
		Endpoints: defaultEndpoints(),
		Events:    Events{Output: "stdout"},
		Log:       Log{Level: "info", Output: "stderr"},
		Agent:     Agent{StatsInterval: 10 * time.Second, QueueSize: 4096},

		// A fresh install changes nothing but what is recorded: operators turn on
		// enforcement once the events show what their hosts need.
		Mode: ModeAudit, FailureMode: FailOpen, DefaultAction: Allow,
		PinPath:       "/sys/fs/bpf/imdsguard",
		Broker:        defaultBroker(),
		ControlSocket: "/run/imdsguard/control.sock",
		StateDir:      "/var/lib/imdsguard",
		Fingerprints:  Fingerprints{Output: "/var/lib/imdsguard/fingerprints.jsonl", SpoolMaxBytes: 64 << 20},
		Metrics:       defaultMetrics(),
		Status:        defaultStatus(),
		Containers:    defaultContainers(),
	}
}

// Load reads and validates the file at path.
func Load(path string) (Config, error) { return yamlfile.Load(path, Default()) }

// Parse decodes and validates YAML. Unknown keys, wrong types and bad values are errors.
func Parse(data []byte) (Config, error) { return yamlfile.Parse(data, Default()) }

// Validate checks the decoded values; errors name the key and its line in root.
func (c *Config) Validate(root *yaml.Node) error {
	bad := func(key, format string, args ...any) error {
		return yamlfile.Errorf(root, key, format, args...)
	}
	if c.Cgroup != "" && !filepath.IsAbs(c.Cgroup) {
		return bad("cgroup", "must be an absolute path, got %q", c.Cgroup)
	}
	a4, err := netip.ParseAddr(c.IMDS.IPv4)
	if err != nil || !a4.Is4() {
		return bad("imds.ipv4", "not an IPv4 address: %q", c.IMDS.IPv4)
	}
	a6, err := netip.ParseAddr(c.IMDS.IPv6)
	if err != nil || !a6.Is6() || a6.Is4In6() {
		return bad("imds.ipv6", "not an IPv6 address: %q", c.IMDS.IPv6)
	}
	c.IMDS.Addr4, c.IMDS.Addr6 = a4, a6
	if c.IMDS.Port < 1 || c.IMDS.Port > 65535 {
		return bad("imds.port", "must be 1-65535, got %d", c.IMDS.Port)
	}
	if err := c.validateEndpoints(root); err != nil {
		return err
	}
	if c.Events.Output == "" {
		return bad("events.output", `must be "stdout" or a file path`)
	}
	if c.Events.Output != "stdout" && !filepath.IsAbs(c.Events.Output) {
		return bad("events.output", `must be "stdout" or an absolute file path, got %q`, c.Events.Output)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return bad("log.level", "must be debug, info, warn or error, got %q", c.Log.Level)
	}
	if c.Log.Output != "stderr" && c.Log.Output != "stdout" && !filepath.IsAbs(c.Log.Output) {
		return bad("log.output", `must be "stderr", "stdout" or an absolute file path, got %q`, c.Log.Output)
	}
	if c.Agent.StatsInterval < time.Second {
		return bad("agent.stats_interval", "must be at least 1s, got %s", c.Agent.StatsInterval)
	}
	if c.Agent.QueueSize < 1 || c.Agent.QueueSize > 1<<20 {
		return bad("agent.queue_size", "must be 1-1048576, got %d", c.Agent.QueueSize)
	}
	if c.Agent.ReadyFile != "" && !filepath.IsAbs(c.Agent.ReadyFile) {
		return bad("agent.ready_file", "must be an absolute path, got %q", c.Agent.ReadyFile)
	}
	if !filepath.IsAbs(c.StateDir) {
		return bad("state_dir", "must be an absolute path, got %q", c.StateDir)
	}
	if c.Fingerprints.Output != "" && !filepath.IsAbs(c.Fingerprints.Output) {
		return bad("fingerprints.output", "must be an absolute path or \"\", got %q", c.Fingerprints.Output)
	}
	if u := c.Fingerprints.Correlator.URL; u != "" && !strings.HasPrefix(u, "https://") && !strings.HasPrefix(u, "http://127.0.0.1") && !strings.HasPrefix(u, "http://[::1]") {
		return bad("fingerprints.correlator.url", "must be https:// (plain http only to loopback), got %q", u)
	}
	if (c.Fingerprints.Correlator.ClientCert == "") != (c.Fingerprints.Correlator.ClientKey == "") {
		return bad("fingerprints.correlator.client_key", "client_cert and client_key go together")
	}
	if c.Fingerprints.SpoolMaxBytes < 64<<10 {
		return bad("fingerprints.spool_max_bytes", "must be at least 65536, got %d", c.Fingerprints.SpoolMaxBytes)
	}
	if c.ControlSocket != "" && !filepath.IsAbs(c.ControlSocket) {
		return bad("control_socket", "must be an absolute path, got %q", c.ControlSocket)
	}
	if err := c.validatePolicy(root); err != nil {
		return err
	}
	if err := validateContainers(&c.Containers, root); err != nil {
		return err
	}
	return validateMetrics(&c.Metrics, &c.Status, c.Events.Output, root)
}
