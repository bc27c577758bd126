package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// firstConnect is the container's whole program: one IMDS request the moment it runs.
const firstConnect = `package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

func main() {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://169.254.169.254/latest/meta-data/instance-id")
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Printf("%d %s\n", resp.StatusCode, body)
}
`

// TestPrivilegedContainerDiscoveredBeforeFirstConnect: a real runc container (its own
// network namespace with only lo, in a cgroup below the guarded one) whose process
// requests IMDS the moment it starts gets its answer through the broker: the kernel
// reported the namespace at its first socket (runc init's, as it brings lo up), and the
// agent served it before the container's process ran. Without discovery the first
// connect got containers.fallback (direct), and with no route out of the namespace it
// failed ("network is unreachable").
func TestPrivilegedContainerDiscoveredBeforeFirstConnect(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	runc, err := exec.LookPath("runc")
	if err != nil {
		t.Fatalf("runc is not installed (Debian package runc): %v", err)
	}
	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	bundle := t.TempDir()
	rootfs := filepath.Join(bundle, "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(t.TempDir(), "main.go")
	if err := os.WriteFile(src, []byte(firstConnect), 0o644); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-o", filepath.Join(rootfs, "client"), src)
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build client: %v: %s", err, out)
	}
	rel, err := filepath.Rel(bed.CgroupRoot, bed.Cgroup)
	if err != nil {
		t.Fatal(err)
	}
	// Four containers, each a namespace of its own. The agent wins the race by the
	// milliseconds runc init spends between forking the container's init and exec'ing
	// its program; on a loaded machine it can lose one (the connect then gets the
	// fallback, and fails here, with no route out). With the first socket as the only
	// report, it lost every time.
	const containers, atLeast = 4, 2
	won := 0
	for i := 0; i < containers; i++ {
		idb := make([]byte, 8)
		_, _ = rand.Read(idb)
		id := "imdsguard-disc-" + hex.EncodeToString(idb)
		cgroupsPath := "/" + rel + "/" + id
		testbed.RemoveRuncCgroups(t, cgroupsPath)
		spec := map[string]any{
			"ociVersion": "1.0.2-dev",
			"process":    map[string]any{"user": map[string]any{"uid": 65534, "gid": 65534}, "args": []string{"/client"}, "cwd": "/"},
			"root":       map[string]any{"path": "rootfs", "readonly": true},
			"mounts":     []map[string]any{{"destination": "/proc", "type": "proc", "source": "proc"}},
			"linux": map[string]any{"cgroupsPath": cgroupsPath,
				"namespaces": []map[string]string{{"type": "pid"}, {"type": "mount"}, {"type": "network"}}},
		}
		data, _ := json.Marshal(spec)
		if err := os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o600); err != nil {
			t.Fatal(err)
		}
		state := t.TempDir()
		var out bytes.Buffer
		cmd := exec.Command(runc, "--root", state, "run", "--bundle", bundle, id)
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		_ = exec.Command(runc, "--root", state, "delete", "--force", id).Run()
		if err != nil || strings.TrimSpace(out.String()) != "200 "+bed.InstanceID {
			t.Logf("container %d's first request: %v %q, want 200 %s", i, err, out.String(), bed.InstanceID)
			continue
		}
		won++
	}
	if won < atLeast {
		t.Errorf("%d of %d containers that connect as they start were brokered from their first connection, want at least %d\n%s",
			won, containers, atLeast, agent.Log())
	}
}
