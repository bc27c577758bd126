package config

import (
	"strings"
	"testing"
)

func TestParsePolicyContract(t *testing.T) {
	cfg, err := Parse([]byte(`
mode: enforce
failure_mode: open
default_action: deny
pin_path: /sys/fs/bpf/imdsguard
rules:
  - name: ssm-agent
    exe: /usr/bin/amazon-ssm-agent
    action: allow
    imdsv2: required
  - name: root-tools
    user: root
    action: allow
  - name: app
    uid: 1000
    unit: app.service
    action: allow
  - name: payments-api
    pod_namespace: payments
    pod: api-0
    service_account: api
    container: 0123456789ab
    action: allow
    imdsv2: required
  - name: billing
    ecs_task_family: billing_v2
    action: deny
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Mode != "enforce" || cfg.DefaultAction != "deny" || len(cfg.Rules) != 5 ||
		cfg.Rules[0].IMDSv2 != "required" || cfg.Rules[1].IMDSv2 != "optional" || *cfg.Rules[2].UID != 1000 {
		t.Fatalf("parsed %+v", cfg)
	}
	if r := cfg.Rules[3]; r.PodNamespace != "payments" || r.Pod != "api-0" || r.ServiceAccount != "api" || !r.ContainerCriteria() ||
		cfg.Rules[4].ECSTaskFamily != "billing_v2" {
		t.Fatalf("container rules %+v", cfg.Rules[3:])
	}
	def, _ := Parse(nil)
	if def.Mode != "audit" || def.DefaultAction != "allow" || def.FailureMode != "open" || !def.Broker.Enabled {
		t.Fatalf("defaults %+v", def)
	}
}

func TestParsePolicyErrors(t *testing.T) {
	head := "rules:\n  - name: a\n    user: root\n    action: allow\n"
	cases := []struct{ name, yaml, want string }{
		{"mode", "mode: strict\n", "1: mode: must be"},
		{"failure mode", "failure_mode: maybe\n", "1: failure_mode"},
		{"unknown rule key", head + "  - name: b\n    exe: /bin/x\n    colour: red\n    action: allow\n", "7: rules[1].colour: unknown key"},
		{"relative exe", head + "  - name: b\n    exe: bin/x\n    action: allow\n", "6: rules[1].exe: must be an absolute path"},
		{"no action", head + "  - name: b\n    exe: /bin/x\n", "5: rules[1]: rule \"b\" needs an action"},
		{"bad action", head + "  - name: b\n    exe: /bin/x\n    action: maybe\n", "7: rules[1].action"},
		{"duplicate name", head + "  - name: a\n    exe: /bin/x\n    action: allow\n", "5: rules[1].name: \"a\" already names rules[0]"},
		{"no criteria", "rules:\n  - name: all\n    action: allow\n", "2: rules[0]: rule \"all\" has no criteria"},
		{"uid type", "rules:\n  - name: u\n    uid: root\n    action: allow\n", "3: rules[0].uid: cannot unmarshal"},
		{"user and uid", "rules:\n  - name: u\n    user: root\n    uid: 0\n    action: allow\n", "4: rules[0].uid: give user or uid"},
		{"container", "rules:\n  - name: c\n    container: xyz\n    action: allow\n", "3: rules[0].container"},
		{"pod namespace", "rules:\n  - name: p\n    pod_namespace: Payments\n    action: allow\n", "3: rules[0].pod_namespace: must be a Kubernetes namespace"},
		{"pod", "rules:\n  - name: p\n    pod: web/0\n    action: allow\n", "3: rules[0].pod"},
		{"service account", "rules:\n  - name: p\n    service_account: \"a b\"\n    action: allow\n", "3: rules[0].service_account"},
		{"ecs family", "rules:\n  - name: p\n    ecs_task_family: a.b\n    action: allow\n", "3: rules[0].ecs_task_family"},
		{"unit and pod", "rules:\n  - name: p\n    unit: a.service\n    pod_namespace: x\n    action: allow\n", "2: rules[0]: give at most one of unit, cgroup, or container criteria"},
		{"v2 on deny", "rules:\n  - name: c\n    exe: /bin/x\n    action: deny\n    imdsv2: required\n", "5: rules[0].imdsv2"},
		{"broker port", "broker:\n  port: 0\n", "2: broker.port"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
}
