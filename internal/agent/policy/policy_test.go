package policy

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/containers"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
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
	// A fake cgroup tree: a unit and a container scope, and look-alikes of both that
	// any user with a systemd user manager could create (issue 11).
	root := t.TempDir()
	id := strings.Repeat("ab", 32)
	for _, d := range []string{"system.slice/app.service/sub", "system.slice/docker-" + id + ".scope",
		"user.slice/user-1000.slice/user@1000.service/app.slice/app.service",
		"system.slice/other.service/docker-0123456789abcdef.scope"} {
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
  - name: lookalike
    container: 0123456789abcdef
    action: allow
`)
	p := Resolve(cfg, root, nil)
	k := p.Kernel
	if !k.Enforce || k.DefaultAllow || len(k.Rules) != 7 || p.RuleName(2) != "app" || p.RuleName(-1) != "" {
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
	// The unit's own cgroup under its slice only: not the sub-cgroup (the kernel checks
	// ancestors), not a cgroup of the same name inside a user's manager.
	unitID, _ := inode(filepath.Join(root, "system.slice/app.service"))
	if r := k.Rules[2]; !r.HasCgroup || !slices.Equal(r.Cgroups, []uint64{unitID}) {
		t.Errorf("unit rule %+v, want only /system.slice/app.service (%d)", r, unitID)
	}
	if r := k.Rules[3]; len(r.Cgroups) != 1 || r.Allow {
		t.Errorf("container rule %+v", r)
	}
	// A cgroup named like a container scope, somewhere no runtime puts one, is none.
	if r := k.Rules[6]; !r.HasCgroup || len(r.Cgroups) != 0 {
		t.Errorf("look-alike container rule %+v, want no cgroup", r)
	}
	// Unresolvable criteria stay criteria: the rule can never match.
	if r := k.Rules[4]; !r.HasUID || len(r.UIDs) != 0 {
		t.Errorf("ghost rule %+v", r)
	}
	if r := k.Rules[5]; !r.HasExe || len(r.Exes) != 0 {
		t.Errorf("gone rule %+v", r)
	}
	if len(p.Unresolved) != 3 {
		t.Errorf("unresolved %v", p.Unresolved)
	}
	if !Equal(p, Resolve(cfg, root, nil)) {
		t.Error("same input resolved differently")
	}
	os.MkdirAll(filepath.Join(root, "system.slice/other.service/app.service"), 0o755)
	if !Equal(p, Resolve(cfg, root, nil)) {
		t.Error("a cgroup named like the unit inside another unit changed the policy")
	}
	// A unit's cgroup that appears (here under a slice of its own) changes the policy.
	os.MkdirAll(filepath.Join(root, "system.slice/extra.slice/app.service"), 0o755)
	if Equal(p, Resolve(cfg, root, nil)) {
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

func TestRuntimeContainerID(t *testing.T) {
	id := strings.Repeat("0123456789abcdef", 4)
	for rel, want := range map[string]string{
		"/system.slice/docker-" + id + ".scope":  id,
		"/docker/" + id:                          id,
		"/machine.slice/libpod-" + id + ".scope": id,
		"/ecs/" + id[:32] + "/" + id:             id,
		"/kubepods/burstable/pod1234-ab/" + id:   id,
		"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice/cri-containerd-" + id + ".scope": id,
		"/system.slice/docker-0123456789abcdef.scope":                                                                "", // not a full id
		"/system.slice/app.service/docker-" + id + ".scope":                                                          "", // not where Docker puts it
		"/user.slice/user-1000.slice/docker-" + id + ".scope":                                                        "",
		"/system.slice/docker-" + id + ".scope/child":                                                                "",
	} {
		if got := runtimeContainerID(rel); got != want {
			t.Errorf("runtimeContainerID(%q) = %q, want %q", rel, got, want)
		}
	}
}

// TestPrivilegedDelegatedSubtreeNeverMatches: a subtree a user owns (systemd's
// Delegate=, a user manager) is the user's to name: a slice chain and a container scope
// built inside it satisfy no system rule.
func TestPrivilegedDelegatedSubtreeNeverMatches(t *testing.T) {
	testbed.RequirePrivileged(t) // root: gives a directory to another user
	root := t.TempDir()
	id := strings.Repeat("cd", 32)
	owned := filepath.Join(root, "user.slice/user-1000.slice")
	for _, d := range []string{"user.slice/user-1000.slice/victim.service", "user.slice/user-1000.slice/system.slice/docker-" + id + ".scope"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(owned, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	cfg := parse(t, "rules:\n  - name: victim\n    unit: victim.service\n    action: allow\n  - name: box\n    container: "+id+"\n    action: allow\n")
	p := Resolve(cfg, root, nil)
	for i, r := range p.Kernel.Rules {
		if len(r.Cgroups) != 0 {
			t.Errorf("rule %s matched cgroups %v inside a user-owned subtree", p.Names[i], r.Cgroups)
		}
	}
	// The same names, owned by the system, do match: the test proves the ownership check.
	if err := os.Chown(owned, 0, 0); err != nil {
		t.Fatal(err)
	}
	if p := Resolve(cfg, root, nil); len(p.Kernel.Rules[0].Cgroups) != 1 {
		t.Errorf("a system-owned unit cgroup did not match: %+v", p.Kernel.Rules[0])
	}
}

// writeCRISpec writes the config.json containerd's CRI plugin keeps for a running
// container of pod namespace/name.
func writeCRISpec(t *testing.T, tasks, id, namespace, pod string) {
	t.Helper()
	dir := filepath.Join(tasks, "k8s.io", id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	spec := `{"ociVersion":"1.0.2-dev","annotations":{"io.kubernetes.cri.container-type":"container",
"io.kubernetes.cri.container-name":"app","io.kubernetes.cri.sandbox-name":"` + pod + `",
"io.kubernetes.cri.sandbox-namespace":"` + namespace + `","io.kubernetes.cri.sandbox-uid":"u-` + pod + `"}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(spec), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestResolvePodAndTaskRules(t *testing.T) {
	root, tasks, docker := t.TempDir(), t.TempDir(), t.TempDir()
	pay, shop, late, task := strings.Repeat("a1", 32), strings.Repeat("b2", 32), strings.Repeat("c3", 32), strings.Repeat("d4", 32)
	scope := func(id string) string {
		return "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-" + id + ".scope"
	}
	for _, d := range []string{scope(pay), scope(shop), scope(late), "system.slice/docker-" + task + ".scope",
		// A cgroup made below a container is not another container.
		scope(shop) + "/kubepods.slice/cri-containerd-" + late + ".scope"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeCRISpec(t, tasks, pay, "payments", "api-0")
	writeCRISpec(t, tasks, shop, "shop", "web-0")
	labels := `{"Name":"/ecs-billing-1-app","Config":{"Labels":{"com.amazonaws.ecs.task-arn":"arn:aws:ecs:us-east-1:012345678910:task/c/1",
"com.amazonaws.ecs.task-definition-family":"billing","com.amazonaws.ecs.container-name":"app"}}}`
	if err := os.MkdirAll(filepath.Join(docker, "containers", task), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(docker, "containers", task, "config.v2.json"), []byte(labels), 0o600); err != nil {
		t.Fatal(err)
	}
	meta := containers.NewResolver(containers.Sources{ContainerdTasks: tasks, DockerData: docker})
	cfg := parse(t, `
mode: enforce
default_action: allow
rules:
  - name: payments
    pod_namespace: payments
    action: allow
    imdsv2: required
  - name: web
    pod_namespace: shop
    pod: web-0
    action: deny
  - name: billing
    ecs_task_family: billing
    action: deny
  - name: nobody
    pod_namespace: payments
    pod: web-0
    action: deny
`)
	p := Resolve(cfg, root, meta)
	id := func(d string) uint64 {
		ino, err := inode(filepath.Join(root, d))
		if err != nil {
			t.Fatal(err)
		}
		return ino
	}
	want := [][]uint64{{id(scope(pay))}, {id(scope(shop))}, {id("system.slice/docker-" + task + ".scope")}, nil}
	for i, w := range want {
		if r := p.Kernel.Rules[i]; !r.HasCgroup || !slices.Equal(r.Cgroups, w) {
			t.Errorf("rule %s: cgroups %v, want %v", p.RuleName(i), r.Cgroups, w)
		}
	}
	if len(p.Unresolved) != 1 || !strings.Contains(p.Unresolved[0], "pod_namespace payments, pod web-0") {
		t.Errorf("unresolved %v", p.Unresolved)
	}
	// A pod that starts later is matched at the next resolution (the agent's timer).
	writeCRISpec(t, tasks, late, "payments", "api-1")
	p2 := Resolve(cfg, root, containers.NewResolver(containers.Sources{ContainerdTasks: tasks, DockerData: docker}))
	if r := p2.Kernel.Rules[0]; !slices.Equal(r.Cgroups, []uint64{id(scope(pay)), id(scope(late))}) {
		t.Errorf("after a new payments pod: %v", r.Cgroups)
	}
	if Equal(p, p2) {
		t.Error("a new pod did not change the policy")
	}
	// Without the runtimes' state, pod rules match nothing; container ids still do.
	p3 := Resolve(cfg, root, nil)
	if r := p3.Kernel.Rules[0]; !r.HasCgroup || len(r.Cgroups) != 0 {
		t.Errorf("no state: %v", r.Cgroups)
	}
}
