package netns_test

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/imdsguard/imdsguard/internal/agent/procinfo"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedRuncContainer serves a real container: Debian's runc makes its network
// namespace (and brings its lo up, which the manager requires and never does itself);
// the broker answers inside it; `runc delete` removes the endpoint.
func TestPrivilegedRuncContainer(t *testing.T) {
	e := start(t, 8)
	runc, err := exec.LookPath("runc")
	if err != nil {
		t.Fatalf("runc is not installed (Debian package runc): %v", err)
	}
	idb := make([]byte, 16)
	if _, err := rand.Read(idb); err != nil {
		t.Fatal(err)
	}
	id := "imdsguard-netns-" + hex.EncodeToString(idb)
	bundle, state := t.TempDir(), t.TempDir()
	rootfs := filepath.Join(bundle, "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(t.TempDir(), "main.go")
	if err := os.WriteFile(src, []byte("package main\n\nimport \"time\"\n\nfunc main() { time.Sleep(time.Hour) }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-o", filepath.Join(rootfs, "sleeper"), src)
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build sleeper: %v: %s", err, out)
	}
	cgroupsPath := "/" + id
	testbed.RemoveRuncCgroups(t, cgroupsPath)
	spec := map[string]any{
		"ociVersion": "1.0.2-dev",
		"process":    map[string]any{"user": map[string]any{"uid": 65534, "gid": 65534}, "args": []string{"/sleeper"}, "cwd": "/"},
		"root":       map[string]any{"path": "rootfs", "readonly": true},
		"mounts":     []map[string]any{{"destination": "/proc", "type": "proc", "source": "proc"}},
		"linux": map[string]any{"cgroupsPath": cgroupsPath,
			"namespaces": []map[string]string{{"type": "pid"}, {"type": "mount"}, {"type": "network"}}},
	}
	data, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(t.TempDir(), "runc.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command(runc, "--root", state, "run", "--detach", "--bundle", bundle, id)
	cmd.Stdout, cmd.Stderr = log, log
	err = cmd.Run()
	deleted := false
	remove := func() {
		if !deleted {
			deleted = true
			_ = exec.Command(runc, "--root", state, "delete", "--force", id).Run()
		}
	}
	t.Cleanup(remove) // also on failure: container, cgroup and state go
	if err != nil {
		out, _ := os.ReadFile(log.Name())
		t.Fatalf("runc run: %v: %s", err, out)
	}
	out, err := exec.Command(runc, "--root", state, "state", id).Output()
	if err != nil {
		t.Fatalf("runc state: %v", err)
	}
	var st struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal(out, &st); err != nil || st.Pid <= 0 {
		t.Fatalf("runc state %s: %v", out, err)
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(st.Pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	ticks, err := procinfo.StartTicks(stat)
	if err != nil {
		t.Fatal(err)
	}
	ep, err := e.m.Serve(st.Pid, ticks)
	if err != nil {
		t.Fatalf("serving runc's container: %v", err)
	}
	path := "/proc/" + strconv.Itoa(st.Pid) + "/ns/net"
	if code, body, err := get(path, "127.0.0.1:254"); err != nil || code != 200 || body != "i-0123456789" {
		t.Fatalf("GET inside the container: %d %q %v", code, body, err)
	}
	if reqs := e.requests(1); len(reqs) != 1 || reqs[0].Netns != ep.Cookie {
		t.Fatalf("requests %+v, want one in namespace %d", reqs, ep.Cookie)
	}
	remove()
	waitUnpublished(t, e.pub, ep.Cookie)
	e.waitRemoved(t, 1)
}
