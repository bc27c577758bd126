package config

import (
	"strings"
	"testing"
	"time"
)

func TestMetricsDefaults(t *testing.T) {
	cfg, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	m := cfg.Metrics
	if m.Namespace != "IMDSGuard" || m.Interval != time.Minute || m.MaxExecutables != 20 ||
		m.CloudWatch.Enabled || m.EMF.Output != "" || m.Prometheus.Listen != "127.0.0.1:9775" {
		t.Errorf("metrics defaults = %+v", m)
	}
	if cfg.Status.Socket != DefaultStatusSocket {
		t.Errorf("status.socket default = %q", cfg.Status.Socket)
	}
}

// The keys of the contract, exactly as it writes them.
func TestMetricsContractKeys(t *testing.T) {
	cfg, err := Parse([]byte(`
events:
  output: /var/log/imdsguard/events.json
metrics:
  namespace: IMDSGuard
  interval: 60s            # publishing/aggregation interval
  max_executables: 20      # cardinality cap per interval
  cloudwatch:
    enabled: true
    region: us-east-1      # default: from instance identity
    endpoint: ""           # override, e.g. a VPC endpoint or a local stand-in
  emf:
    output: /var/log/imdsguard/emf.log   # or stdout
  prometheus:
    listen: 127.0.0.1:9775
status:
  socket: /run/imdsguard/s.sock
`))
	if err != nil {
		t.Fatal(err)
	}
	m := cfg.Metrics
	if !m.CloudWatch.Enabled || m.CloudWatch.Region != "us-east-1" || m.EMF.Output != "/var/log/imdsguard/emf.log" ||
		cfg.Status.Socket != "/run/imdsguard/s.sock" {
		t.Errorf("parsed %+v %+v", m, cfg.Status)
	}
}

func TestMetricsErrorsNameKeyAndLine(t *testing.T) {
	cases := []struct{ name, yaml, want string }{
		{"reserved namespace", "metrics:\n  namespace: AWS/EC2\n", `2: metrics.namespace: must not start with "AWS/"`},
		{"empty namespace", "metrics:\n  namespace: \"\"\n", "2: metrics.namespace: must be 1-255"},
		{"short interval", "metrics:\n  interval: 10ms\n", "2: metrics.interval: must be 1s-1h"},
		{"cap", "metrics:\n  max_executables: 0\n", "2: metrics.max_executables: must be 1-500"},
		{"region", "metrics:\n  cloudwatch:\n    region: Mars\n", "3: metrics.cloudwatch.region"},
		{"endpoint", "metrics:\n  cloudwatch:\n    endpoint: localhost:4566\n", "3: metrics.cloudwatch.endpoint"},
		{"enabled type", "metrics:\n  cloudwatch:\n    enabled: maybe\n", "3: metrics.cloudwatch.enabled: cannot unmarshal"},
		{"emf relative", "metrics:\n  emf:\n    output: emf.log\n", "3: metrics.emf.output"},
		{"emf on events", "metrics:\n  emf:\n    output: stdout\n", "3: metrics.emf.output: must differ from events.output"},
		{"listen", "metrics:\n  prometheus:\n    listen: 9775\n", "3: metrics.prometheus.listen: must be host:port"},
		{"listen no host", "metrics:\n  prometheus:\n    listen: \":9775\"\n", "3: metrics.prometheus.listen: needs an explicit host"},
		{"unknown", "metrics:\n  emf:\n    path: /x\n", "3: metrics.emf.path: unknown key"},
		{"socket", "status:\n  socket: s.sock\n", "2: status.socket: must be an absolute path"},
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
