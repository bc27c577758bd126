package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestFullFile(t *testing.T) {
	cfg, err := Parse([]byte(`
ip_ranges: /etc/imdsguard/ip-ranges.json
affiliate_accounts: ["111122223333"]
egress_cidrs: ["198.51.100.7/32", "2001:db8::1"]
trusted_cidrs: ["203.0.113.0/24"]
window: 30m
suppress:
  - name: build farm
    roles: [ci-runner]
    cidrs: [192.0.2.0/24]
outputs:
  asff_file: /var/lib/x/findings.asff.json
  webhook: {url: "http://127.0.0.1:9/hook", retries: 2}
  metrics_namespace: Security/imdsguard
  eventbridge: {event_bus: default}
  security_hub: {enabled: true, region: eu-west-1}
  queue_size: 16
serve:
  directory: /var/log/cloudtrail
  checkpoint: /var/lib/x/checkpoint.json
intake:
  listen: ":8443"
  tls_cert: /etc/x/tls.pem
  tls_key: /etc/x/tls.key
  aws_certificates: [/etc/x/aws-us-east-1.pem]
  allowed_accounts: ["123456789012"]
  database: /var/lib/x/fingerprints.db
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Window != 30*time.Minute || len(cfg.Egress) != 2 || cfg.Egress[1].Bits() != 128 || cfg.Trusted[0].String() != "203.0.113.0/24" {
		t.Fatalf("%+v", cfg)
	}
	if cfg.Intake.Listen != ":8443" || cfg.Intake.PurgeGrace != 24*time.Hour || cfg.Intake.AllowedAccounts[0] != "123456789012" {
		t.Fatalf("intake: %+v", cfg.Intake)
	}
	if cfg.Suppress[0].Prefixes[0].String() != "192.0.2.0/24" || cfg.Outputs.Webhook.Retries != 2 || cfg.Outputs.Webhook.Timeout != 10*time.Second {
		t.Fatalf("%+v", cfg)
	}
	o := cfg.Outputs
	if o.MetricsNamespace != "Security/imdsguard" || o.EventBridge.EventBus != "default" || o.EventBridge.Source != "imdsguard" ||
		o.EventBridge.Region != "us-east-1" || !o.SecurityHub.Enabled || o.SecurityHub.Region != "eu-west-1" || o.QueueSize != 16 ||
		o.ShutdownGrace != 10*time.Second {
		t.Fatalf("outputs: %+v", o)
	}
}

func TestErrorsNameKeyAndLine(t *testing.T) {
	cases := map[string]string{
		"egress_cidrs: [\"10.0.0.0/8\", \"nope\"]\n":                   `1: egress_cidrs[1]: not a CIDR or address: "nope"`,
		"\ntrusted_cidrs:\n  - 203.0.113.0/24\n  - x/99\n":             `4: trusted_cidrs[1]: not a CIDR`,
		"affiliate_accounts: [\"1234\"]\n":                             `1: affiliate_accounts[0]: not a 12-digit account id`,
		"ip_ranges: relative.json\n":                                   `1: ip_ranges: must be an absolute path`,
		"window: 1h\nfoo: 1\n":                                         `2: foo: unknown key`,
		"suppress:\n  - roles: [a]\n    colour: red\n":                 `3: suppress[0].colour: unknown key`,
		"suppress:\n  - name: all\n":                                   `2: suppress[0]: rule matches everything`,
		"window: soon\n":                                               `1: window:`,
		"outputs:\n  webhook:\n    url: ftp://x\n":                     `3: outputs.webhook.url: must be an http(s) URL`,
		"serve:\n  s3:\n    prefix: AWSLogs/\n":                        `serve.s3.bucket: must be set`,
		"outputs:\n  eventbridge:\n    source: aws.guardduty\n":        `3: outputs.eventbridge.source: must be set and not start with "aws."`,
		"outputs:\n  eventbridge:\n    endpoint: http://127.0.0.1:1\n": `outputs.eventbridge.event_bus: must be set`,
		"outputs:\n  security_hub:\n    endpoint: x\n":                 `3: outputs.security_hub.endpoint: must be an http(s) URL`,
		"outputs:\n  queue_size: 0\n":                                  `2: outputs.queue_size: must be 1-100000`,
		"outputs:\n  metrics_namespace: \"\"\n":                        `2: outputs.metrics_namespace: must be 1-255 characters`,
		"affiliate_accounts: \"111122223333\"\n":                       `1: affiliate_accounts:`,
		"intake:\n  database: /var/lib/fp.db\n":                        `intake.listen: must be set`,
		"intake:\n  listen: nope\n":                                    `2: intake.listen: must be host:port`,
		"intake:\n  listen: 0.0.0.0:80\n  plain_http: true\n":          `3: intake.plain_http: only allowed on a loopback`,
		"intake:\n  listen: :8443\n  database: /x.db\n  aws_certificates: [/a.pem]\n  allowed_accounts: [\"123456789012\"]\n":                      `intake.tls_cert: intake.tls_cert and intake.tls_key must be set`,
		"intake:\n  listen: 127.0.0.1:0\n  plain_http: true\n  database: /x.db\n  aws_certificates: [/a.pem, b.pem]\n":                             `5: intake.aws_certificates[1]: must be an absolute path`,
		"intake:\n  listen: 127.0.0.1:0\n  plain_http: true\n  database: /x.db\n  aws_certificates: [/a.pem]\n":                                    `intake.allowed_accounts: must list`,
		"intake:\n  listen: 127.0.0.1:0\n  plain_http: true\n  database: /x.db\n  aws_certificates: [/a.pem]\n  allowed_accounts:\n    - \"12\"\n": `7: intake.allowed_accounts[0]: not a 12-digit account id`,
		"intake:\n  listen: 127.0.0.1:0\n  plain_http: true\n  database: /x.db\n":                                                                  `intake.aws_certificates: intake needs aws_certificates`,
		"intake:\n  listen: 127.0.0.1:0\n  tls_cert: /c.pem\n  tls_key: /k.pem\n  client_ca: /ca.pem\n":                                            `intake.database: must be set`,
		"intake:\n  purge_grace: -1h\n":                                                            `2: intake.purge_grace: must not be negative`,
		"intake:\n  tls: yes\n":                                                                    `2: intake.tls: unknown key`,
		"inventory:\n  files:\n    - /a.json\n    - b.json\n":                                      `4: inventory.files[1]: must be an absolute path`,
		"inventory:\n  ec2: {regions: [us-east-1], frequency: 1m}\n":                               `2: inventory.ec2.frequency: unknown key`,
		"inventory:\n  ec2:\n    regions: [us-east-1, Mars]\n":                                     `3: inventory.ec2.regions[1]: not a region`,
		"inventory:\n  ec2:\n    regions: [us-east-1]\n    role_arns: [arn:aws:iam::123:role/x]\n": `4: inventory.ec2.role_arns[0]: not an IAM role ARN`,
		"inventory:\n  ec2:\n    role_arns: [arn:aws:iam::222222222222:role/inventory]\n":          `3: inventory.ec2.role_arns: needs inventory.ec2.regions`,
		"inventory:\n  ec2:\n    interval: 10s\n":                                                  `3: inventory.ec2.interval: must be 1m-24h`,
		"store:\n  driver: mysql\n":                                                                `2: store.driver: must be sqlite or postgres`,
		"store:\n  driver: postgres\n":                                                             `store.dsn: must be set for postgres`,
		"store:\n  dsn: rel.db\n":                                                                  `2: store.dsn: must be an absolute path for sqlite`,
	}
	for in, want := range cases {
		_, err := Parse([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want %q", in, err, want)
		}
	}
}

func TestLoadNamesFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(p, []byte("window: 0s\n"), 0o600)
	_, err := Load(p)
	if err == nil || !strings.HasPrefix(err.Error(), p+":1: window:") {
		t.Fatalf("got %v", err)
	}
	if cfg, err := Parse(nil); err != nil || cfg.Window != time.Hour {
		t.Fatalf("empty: %v", err)
	}
}
