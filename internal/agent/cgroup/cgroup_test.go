package cgroup

import (
	"os"
	"strings"
	"testing"
)

func TestFindMount(t *testing.T) {
	const hybrid = `25 31 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 35 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 35 0:39 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
`
	got, err := FindMount(strings.NewReader(hybrid))
	if err != nil || got != "/sys/fs/cgroup/unified" {
		t.Fatalf("hybrid: got %q, %v", got, err)
	}
	const v1only = "42 35 0:39 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory\n"
	if got, err := FindMount(strings.NewReader(v1only)); err != nil || got != "" {
		t.Fatalf("v1 only: got %q, %v", got, err)
	}
	// Optional fields vary in number; the file system type follows the "-".
	const unified = `30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate
`
	if got, _ := FindMount(strings.NewReader(unified)); got != "/sys/fs/cgroup" {
		t.Fatalf("unified: got %q", got)
	}
	const escaped = "30 23 0:26 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n"
	if got, _ := FindMount(strings.NewReader(escaped)); got != "/mnt/my cgroup" {
		t.Fatalf("escaped: got %q", got)
	}
}

func TestPathsOnThisHost(t *testing.T) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Skipf("no mountinfo: %v", err)
	}
	defer f.Close()
	root, err := FindMount(f)
	if err != nil || root == "" {
		t.Skipf("no cgroup2 hierarchy here: %v", err)
	}
	id, err := ID(root)
	if err != nil {
		t.Fatal(err)
	}
	p := NewPaths(root)
	if got, ok := p.Lookup(id); !ok || got != "/" {
		t.Fatalf("root id %d -> %q, %v", id, got, ok)
	}
	if _, ok := p.Lookup(^uint64(0)); ok {
		t.Fatal("found a cgroup for an impossible id")
	}
	if err := Check(root); err != nil {
		t.Fatal(err)
	}
	if err := Check(os.TempDir()); err == nil {
		t.Fatal("Check accepted a directory that is not cgroup2")
	}
}
