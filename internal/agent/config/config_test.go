package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/yamlfile"
)

func TestParseDefaults(t *testing.T) {
	cfg, err := Parse([]byte(""))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.IMDS.Addr4.String() != "169.254.169.254" || cfg.IMDS.Addr6.String() != "fd00:ec2::254" || cfg.IMDS.Port != 80 {
		t.Errorf("imds defaults = %+v", cfg.IMDS)
	}
	if cfg.Events.Output != "stdout" || cfg.Cgroup != "" {
		t.Errorf("defaults: events.output=%q cgroup=%q", cfg.Events.Output, cfg.Cgroup)
	}
}

func TestParseContractKeys(t *testing.T) {
	cfg, err := Parse([]byte(`
cgroup: /sys/fs/cgroup/unified/some/child
imds:
  ipv4: 10.0.0.1
  ipv6: fd00::1
  port: 8080
events:
  output: /var/log/imdsguard/events.json
agent:
  stats_interval: 5s
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Cgroup != "/sys/fs/cgroup/unified/some/child" || cfg.IMDS.Addr4.String() != "10.0.0.1" ||
		cfg.IMDS.Addr6.String() != "fd00::1" || cfg.IMDS.Port != 8080 ||
		cfg.Events.Output != "/var/log/imdsguard/events.json" || cfg.Agent.StatsInterval != 5*time.Second {
		t.Errorf("parsed %+v", cfg)
	}
}

func TestParseErrorsNameKeyAndLine(t *testing.T) {
	cases := []struct {
		name, yaml, want string
	}{
		{"unknown top key", "cgroup: /x\nbogus: 1\n", "2: bogus: unknown key"},
		{"unknown nested key", "imds:\n  ipv4: 169.254.169.254\n  prot: 80\n", "3: imds.prot: unknown key"},
		{"bad ipv4", "imds:\n  ipv4: 300.1.1.1\n", "2: imds.ipv4: not an IPv4 address"},
		{"ipv6 given as ipv4", "imds:\n  ipv4: fd00::1\n", "2: imds.ipv4: not an IPv4 address"},
		{"bad ipv6", "imds:\n  ipv6: 169.254.169.254\n", "2: imds.ipv6: not an IPv6 address"},
		{"port range", "\n\nimds:\n  port: 70000\n", "4: imds.port: must be 1-65535"},
		{"port type", "imds:\n  port: eighty\n", "2: imds.port: cannot unmarshal"},
		{"relative cgroup", "cgroup: some/child\n", "1: cgroup: must be an absolute path"},
		{"relative output", "events:\n  output: events.json\n", "2: events.output: must be"},
		{"bad duration", "agent:\n  stats_interval: soon\n", "2: agent.stats_interval: cannot unmarshal"},
		{"not a mapping", "imds: 169.254.169.254\n", "1: imds: must be a mapping"},
		{"syntax", "imds:\n  ipv4: [\n", "2: did not find"},
		{"log level", "log:\n  level: loud\n", "2: log.level"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatalf("accepted bad config:\n%s", tc.yaml)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

func TestLoadNamesFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte("imds:\n  port: 0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(p)
	var ce *yamlfile.Error
	if !errors.As(err, &ce) || ce.File != p || ce.Line != 2 || ce.Key != "imds.port" {
		t.Fatalf("Load error = %#v", err)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Fatal("missing file accepted")
	}
}
