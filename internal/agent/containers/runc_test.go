package containers_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/cgroup"
	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/containers"
	"github.com/imdsguard/imdsguard/internal/agent/policy"
	"github.com/imdsguard/imdsguard/internal/agent/procinfo"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedRuncContainer runs a real container with Debian's runc, from a bundle
// laid out where containerd keeps a Kubernetes container's (its config.json carrying
// the CRI's annotations) and in the cgroup the kubelet's cgroupfs driver gives it, in a
// network namespace of its own. The enrichment and the pod rules must name it from the
// real cgroup and the real bundle.
func TestPrivilegedRuncContainer(t *testing.T) {
	testbed.RequirePrivileged(t)
	runc, err := exec.LookPath("runc")
	if err != nil {
		t.Fatalf("runc is not installed (Debian package runc): %v", err)
	}
	root, err := cgroup.Root()
	if err != nil {
		t.Fatal(err)
	}
	id, podUID := randHex(t, 32), randHex(t, 16)
	tasks, state := t.TempDir(), t.TempDir()
	bundle := filepath.Join(tasks, "k8s.io", id)
	rootfs := filepath.Join(bundle, "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		t.Fatal(err)
	}
	sleeper(t, filepath.Join(rootfs, "sleeper"))
	rel := "/kubepods/besteffort/pod" + podUID + "/" + id
	testbed.RemoveRuncCgroups(t, "/kubepods/besteffort/pod"+podUID)
	writeBundle(t, bundle, rel)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// The detached container keeps runc's stdio: files, not pipes, or reading them
	// would wait for the container to end.
	log, err := os.Create(filepath.Join(t.TempDir(), "runc.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.CommandContext(ctx, runc, "--root", state, "run", "--detach", "--bundle", bundle, id)
	cmd.Stdout, cmd.Stderr = log, log
	err = cmd.Run()
	t.Cleanup(func() {
		// Also on failure: the container, its cgroup and its state go.
		_ = exec.Command(runc, "--root", state, "delete", "--force", id).Run()
	})
	if err != nil {
		out, _ := os.ReadFile(log.Name())
		t.Fatalf("runc run: %v: %s", err, out)
	}
	out, err := exec.CommandContext(ctx, runc, "--root", state, "state", id).Output()
	if err != nil {
		t.Fatalf("runc state: %v", err)
	}
	var st struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal(out, &st); err != nil || st.Pid <= 0 {
		t.Fatalf("runc state %s: %v", out, err)
	}

	// runc run --detach returns once it has told the container to start: its process
	// may still be runc init, about to exec /sleeper. Wait for the exec.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		cmdline, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(st.Pid), "cmdline"))
		if strings.HasPrefix(string(cmdline), "/sleeper\x00") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the container's process never ran /sleeper: cmdline %q", cmdline)
		}
	}

	// The kernel's view of the container's process: its pid and start time, and the id
	// of the cgroup runc put it in.
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(st.Pid), "stat"))
	if err != nil {
		t.Fatal(err)
	}
	ticks, err := procinfo.StartTicks(stat)
	if err != nil {
		t.Fatal(err)
	}
	cgID, err := cgroup.ID(filepath.Join(root, rel))
	if err != nil {
		t.Fatalf("the container's cgroup: %v", err)
	}
	meta := containers.NewResolver(containers.Sources{ContainerdTasks: tasks})
	info := procinfo.NewResolver("/proc", cgroup.NewPaths(root), 16).WithContainers(meta).
		Resolve(procinfo.Process{PID: uint32(st.Pid), StartBoottime: ticks * procinfo.NsPerTick, CgroupID: cgID})
	want := containers.Info{ID: id, Runtime: containers.Containerd,
		Pod: containers.Pod{Namespace: "payments", Name: "api-0", UID: podUID, Container: "api"}}
	if info.Cgroup != rel || info.Container != want || len(info.Missing) != 0 || !slices.Contains(info.Cmdline, "/sleeper") {
		t.Fatalf("resolved %+v\nwant cgroup %s, container %+v", info, rel, want)
	}

	cfg, err := config.Parse([]byte("rules:\n  - {name: payments, pod_namespace: payments, action: allow, imdsv2: required}\n" +
		"  - {name: shop, pod_namespace: shop, action: deny}\n"))
	if err != nil {
		t.Fatal(err)
	}
	p := policy.Resolve(cfg, root, meta)
	if got := p.Kernel.Rules[0].Cgroups; !slices.Equal(got, []uint64{cgID}) {
		t.Errorf("pod_namespace payments resolved to %v, want the container's cgroup %d", got, cgID)
	}
	if got := p.Kernel.Rules[1].Cgroups; len(got) != 0 {
		t.Errorf("pod_namespace shop resolved to %v, want nothing", got)
	}
}

func randHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// sleeper builds a static program that sleeps until killed: the container's only file.
func sleeper(t *testing.T, dst string) {
	t.Helper()
	src := filepath.Join(t.TempDir(), "main.go")
	prog := "package main\n\nimport \"time\"\n\nfunc main() { time.Sleep(time.Hour) }\n"
	if err := os.WriteFile(src, []byte(prog), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "build", "-o", dst, src)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build sleeper: %v: %s", err, out)
	}
}

// writeBundle writes the OCI config the way containerd's CRI plugin does for a pod's
// container (the annotations it sets, a network namespace of its own), trimmed to what
// runc needs.
func writeBundle(t *testing.T, bundle, cgroupsPath string) {
	t.Helper()
	podUID := strings.TrimPrefix(filepath.Base(filepath.Dir(cgroupsPath)), "pod")
	spec := map[string]any{
		"ociVersion": "1.0.2-dev",
		"process": map[string]any{
			"user": map[string]any{"uid": 65534, "gid": 65534}, "args": []string{"/sleeper"},
			"env": []string{"PATH=/"}, "cwd": "/", "noNewPrivileges": true,
		},
		"root":     map[string]any{"path": "rootfs", "readonly": true},
		"hostname": "api-0",
		"mounts": []map[string]any{
			{"destination": "/proc", "type": "proc", "source": "proc", "options": []string{"nosuid", "noexec", "nodev"}},
			{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		},
		"annotations": map[string]string{
			"io.kubernetes.cri.container-type":    "container",
			"io.kubernetes.cri.container-name":    "api",
			"io.kubernetes.cri.image-name":        "registry.example/api:1",
			"io.kubernetes.cri.sandbox-id":        strings.Repeat("0", 64),
			"io.kubernetes.cri.sandbox-name":      "api-0",
			"io.kubernetes.cri.sandbox-namespace": "payments",
			"io.kubernetes.cri.sandbox-uid":       podUID,
		},
		"linux": map[string]any{
			"cgroupsPath": cgroupsPath,
			"namespaces": []map[string]string{{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
				{"type": "network"}},
			"maskedPaths":   []string{"/proc/kcore", "/proc/keys"},
			"readonlyPaths": []string{"/proc/sys", "/proc/sysrq-trigger"},
		},
	}
	data, err := json.MarshalIndent(spec, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
}
