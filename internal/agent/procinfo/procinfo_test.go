package procinfo

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/imdsguard/imdsguard/internal/agent/containers"
)

func TestUnitAndContainer(t *testing.T) {
	id := strings.Repeat("0123456789abcdef", 4)
	cases := []struct{ path, unit, container string }{
		{"/system.slice/amazon-ssm-agent.service", "amazon-ssm-agent.service", ""},
		{"/system.slice/nginx.service/worker", "nginx.service", ""},
		{"/user.slice/user-1000.slice/session-3.scope", "session-3.scope", ""},
		{"/system.slice/docker-" + id + ".scope", "docker-" + id + ".scope", id},
		{"/docker/" + id, "", id},
		{"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-" + id + ".scope", "cri-containerd-" + id + ".scope", id},
		{"/kubepods/besteffort/pod0d4f/" + id, "", id},
		{"/machine.slice/libpod-" + id + ".scope/container", "libpod-" + id + ".scope", id},
		{"/ecs/3c2b5d/" + id, "", id},
		{"/", "", ""},
		{"", "", ""},
		{"/system.slice/" + id[:63] + ".service", id[:63] + ".service", ""},
	}
	for _, c := range cases {
		if got := UnitFromCgroup(c.path); got != c.unit {
			t.Errorf("UnitFromCgroup(%q) = %q, want %q", c.path, got, c.unit)
		}
		if got := ContainerFromCgroup(c.path); got != c.container {
			t.Errorf("ContainerFromCgroup(%q) = %q, want %q", c.path, got, c.container)
		}
	}
}

func TestStartTicks(t *testing.T) {
	// A comm with spaces and a ')' must not shift the fields.
	stat := []byte("1234 (we ird) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 50 18446744073709551615")
	got, err := StartTicks(stat)
	if err != nil || got != 98765 {
		t.Fatalf("StartTicks = %d, %v", got, err)
	}
	if _, err := StartTicks([]byte("garbage")); err == nil {
		t.Fatal("parsed garbage")
	}
}

type fakePaths map[uint64]string

func (f fakePaths) Lookup(id uint64) (string, bool) { p, ok := f[id]; return p, ok }

// selfProcess describes this test process as the kernel would.
func selfProcess(t *testing.T) Process {
	t.Helper()
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Skip("no /proc")
	}
	ticks, err := StartTicks(stat)
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/self/exe", &st); err != nil {
		t.Fatal(err)
	}
	return Process{PID: uint32(os.Getpid()), StartBoottime: ticks * NsPerTick, UID: uint32(os.Getuid()),
		CgroupID: 7, ExePath: "/kernel/view", ExeDev: st.Dev, ExeIno: st.Ino}
}

func TestResolveLiveProcess(t *testing.T) {
	p := selfProcess(t)
	r := NewResolver("/proc", fakePaths{7: "/system.slice/test.service"}, 16)
	info := r.Resolve(p)
	exe, _ := os.Executable()
	if info.Exe != exe {
		t.Errorf("exe %q, want %q", info.Exe, exe)
	}
	if len(info.Cmdline) == 0 || info.Cmdline[0] != os.Args[0] {
		t.Errorf("cmdline %q", info.Cmdline)
	}
	if info.Unit != "test.service" || info.Cgroup != "/system.slice/test.service" {
		t.Errorf("cgroup %q unit %q", info.Cgroup, info.Unit)
	}
	if len(info.Missing) != 0 {
		t.Errorf("missing %v", info.Missing)
	}
}

func TestResolveRefusesReusedPID(t *testing.T) {
	p := selfProcess(t)
	p.StartBoottime += 10 * NsPerTick // an earlier process that had this pid
	r := NewResolver("/proc", fakePaths{}, 16)
	info := r.Resolve(p)
	if info.Exe != "/kernel/view" {
		t.Errorf("exe %q: took /proc of another process", info.Exe)
	}
	if !contains(info.Missing, "cmdline") || !contains(info.Missing, "cgroup") || info.Cmdline != nil {
		t.Errorf("info %+v", info)
	}
}

func TestResolveExitedProcess(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skip(err)
	}
	r := NewResolver("/proc", fakePaths{9: "/user.slice"}, 16)
	info := r.Resolve(Process{PID: uint32(cmd.Process.Pid), StartBoottime: 1, CgroupID: 9, ExePath: "/usr/bin/true"})
	if info.Exe != "/usr/bin/true" || info.Cgroup != "/user.slice" || !contains(info.Missing, "cmdline") {
		t.Errorf("info %+v", info)
	}
}

func TestResolverCacheIsBounded(t *testing.T) {
	// A fake /proc with three processes, all running this test binary.
	root := t.TempDir()
	exe, _ := os.Executable()
	var st syscall.Stat_t
	if err := syscall.Stat(exe, &st); err != nil {
		t.Fatal(err)
	}
	r := NewResolver(root, fakePaths{7: "/x"}, 2)
	for pid := 1; pid <= 3; pid++ {
		dir := filepath.Join(root, strconv.Itoa(pid))
		must(t, os.Mkdir(dir, 0o755))
		must(t, os.WriteFile(filepath.Join(dir, "stat"), []byte(strconv.Itoa(pid)+" (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0"), 0o644))
		must(t, os.WriteFile(filepath.Join(dir, "cmdline"), []byte("x\x00-v\x00"), 0o644))
		must(t, os.Symlink(exe, filepath.Join(dir, "exe")))
		info := r.Resolve(Process{PID: uint32(pid), StartBoottime: 500 * NsPerTick, CgroupID: 7, ExeDev: st.Dev, ExeIno: st.Ino})
		if info.Exe != exe || strings.Join(info.Cmdline, " ") != "x -v" || len(info.Missing) != 0 {
			t.Fatalf("pid %d: %+v", pid, info)
		}
		if len(r.procs) > 2 {
			t.Fatalf("cache holds %d entries, bound 2", len(r.procs))
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestResolveNamesTheContainer(t *testing.T) {
	id := strings.Repeat("0123456789abcdef", 4)
	tasks := t.TempDir()
	dir := filepath.Join(tasks, "k8s.io", id)
	must(t, os.MkdirAll(dir, 0o755))
	must(t, os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"ociVersion":"1.0.2-dev","annotations":{
"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.container-name":"api",
"io.kubernetes.cri.sandbox-name":"api-0","io.kubernetes.cri.sandbox-namespace":"payments",
"io.kubernetes.cri.sandbox-uid":"u1"}}`), 0o600))
	cg := "/kubepods.slice/kubepods-pod1.slice/cri-containerd-" + id + ".scope"
	other := strings.Repeat("fedcba9876543210", 4)
	r := NewResolver("/proc", fakePaths{7: cg + "/sub", 8: "/system.slice/docker-" + other + ".scope"}, 16).
		WithContainers(containers.NewResolver(containers.Sources{ContainerdTasks: tasks}))
	p := selfProcess(t)
	p.StartBoottime++ // not this process: the kernel's cgroup id decides
	info := r.Resolve(p)
	want := containers.Info{ID: id, Runtime: containers.Containerd, Pod: containers.Pod{Namespace: "payments", Name: "api-0", UID: "u1", Container: "api"}}
	if info.Container != want || info.ContainerID != id || contains(info.Missing, "container") {
		t.Errorf("container %+v (id %q, missing %v), want %+v", info.Container, info.ContainerID, info.Missing, want)
	}
	// A container the runtimes have no state for: named by its cgroup, and said so.
	p.CgroupID, p.StartBoottime = 8, p.StartBoottime+1 // another process
	info = r.Resolve(p)
	if info.Container != (containers.Info{ID: other, Runtime: containers.Docker}) || !contains(info.Missing, "container") {
		t.Errorf("stateless container %+v, missing %v", info.Container, info.Missing)
	}
}
