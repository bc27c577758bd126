package policy

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
)

func parse(t *testing.T, yaml string) config.Config {
	t.Helper()
	cfg, err := config.Parse([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestResolve(t *testing.T) {
	// A fake cgroup tree: units and a container scope.
	root := t.TempDir()
	id := strings.Repeat("ab", 32)
	for _, d := range []string{"system.slice/app.service/sub", "system.slice/docker-" + id + ".scope", "user.slice/app.service"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	exe, _ := os.Executable()
	cfg := parse(t, `
mode: enforce
default_action: deny
rules:
  - name: me
    exe: `+exe+`
    action: allow
    imdsv2: required
  - name: root
    user: root
    action: allow
  - name: app
    unit: app.service
    action: allow
  - name: box
    container: `+id+`
    action: deny
  - name: ghost
    user: no-such-user-imdsguard
    action: allow
  - name: gone
    exe: /nonexistent/bin
    action: allow
`)
	p := Resolve(cfg, root)
	k := p.Kernel
	if !k.Enforce || k.DefaultAllow || len(k.Rules) != 6 || p.RuleName(2) != "app" || p.RuleName(-1) != "" {
		t.Fatalf("policy %+v", p)
	}
	var st syscall.Stat_t
	syscall.Stat(exe, &st)
	if r := k.Rules[0]; !r.HasExe || len(r.Exes) != 1 || r.Exes[0].Ino != st.Ino || !r.V2Required || !r.Allow {
		t.Errorf("exe rule %+v", r)
	}
	if r := k.Rules[1]; !r.HasUID || len(r.UIDs) != 1 || r.UIDs[0] != 0 {
		t.Errorf("user rule %+v", r)
	}
	// Both app.service cgroups, not the sub-cgroup (the kernel checks ancestors).
	if r := k.Rules[2]; !r.HasCgroup || len(r.Cgroups) != 2 {
		t.Errorf("unit rule %+v", r)
	}
	if r := k.Rules[3]; len(r.Cgroups) != 1 || r.Allow {
		t.Errorf("container rule %+v", r)
	}
	// Unresolvable criteria stay criteria: the rule can never match.
	if r := k.Rules[4]; !r.HasUID || len(r.UIDs) != 0 {
		t.Errorf("ghost rule %+v", r)
	}
	if r := k.Rules[5]; !r.HasExe || len(r.Exes) != 0 {
		t.Errorf("gone rule %+v", r)
	}
	if len(p.Unresolved) != 2 {
		t.Errorf("unresolved %v", p.Unresolved)
	}
	if !Equal(p, Resolve(cfg, root)) {
		t.Error("same input resolved differently")
	}
	os.MkdirAll(filepath.Join(root, "system.slice/other/app.service"), 0o755)
	if Equal(p, Resolve(cfg, root)) {
		t.Error("a new unit cgroup did not change the policy")
	}
}

func TestEqualSeesEveryKernelField(t *testing.T) {
	base := Policy{Names: []string{"a"}, Kernel: hook.KernelPolicy{Rules: []hook.KernelRule{{Allow: true, UIDs: []uint32{0}, HasUID: true}}}}
	if !Equal(base, base) {
		t.Fatal("a policy differs from itself")
	}
	for name, change := range map[string]func(*Policy){
		"broker port": func(p *Policy) { p.Kernel.BrokerPort = 4258 },
		"agent tgid":  func(p *Policy) { p.Kernel.AgentTGID = 42 },
		"broker ipv6": func(p *Policy) { p.Kernel.BrokerIPv6 = true },
		"host netns":  func(p *Policy) { p.Kernel.HostNetns = 7 },
		"enforce":     func(p *Policy) { p.Kernel.Enforce = true },
		"rule uid":    func(p *Policy) { p.Kernel.Rules = []hook.KernelRule{{Allow: true, UIDs: []uint32{1}, HasUID: true}} },
		"names":       func(p *Policy) { p.Names = []string{"b"} },
	} {
		other := base
		other.Kernel.Rules = slices.Clone(base.Kernel.Rules)
		change(&other)
		if Equal(base, other) {
			t.Errorf("%s: a changed policy compares equal", name)
		}
	}
}
