package testbed

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// PrivilegedEnv gates tests that need root, BPF and namespaces. `make test` sets it;
// a plain `go test ./...` on a laptop skips those tests and says why. With it set, a
// test that cannot get what it needs fails instead of skipping, so CI never passes on
// tests that did not run.
const PrivilegedEnv = "IMDSGUARD_PRIVILEGED"

// RequirePrivileged skips tb unless privileged tests were asked for.
func RequirePrivileged(tb testing.TB) {
	tb.Helper()
	if os.Getenv(PrivilegedEnv) == "" {
		tb.Skipf("privileged test: run as root with %s=1 (sudo make test does)", PrivilegedEnv)
	}
	if os.Geteuid() != 0 {
		tb.Fatalf("%s is set but this is not root", PrivilegedEnv)
	}
}

// Start builds a bed for tb and removes it when tb ends, pass or fail.
func Start(tb testing.TB, opts Options) *Bed {
	tb.Helper()
	RequirePrivileged(tb)
	b, err := New(opts)
	if err != nil {
		tb.Fatalf("build test bed: %v", err)
	}
	tb.Cleanup(func() {
		if err := b.Close(); err != nil {
			tb.Errorf("tear down test bed: %v", err)
		}
	})
	return b
}

// RemoveRuncCgroups removes, when the test ends, the directories of path (a cgroup path
// as an OCI config's cgroupsPath names it) and of its ancestors that runc is about to
// create, in every cgroup hierarchy (on a hybrid host runc makes them in the v1 ones
// too), deepest first, and only those. Call it before starting the container: its
// cleanup, registered first, runs after the container's is done.
func RemoveRuncCgroups(tb testing.TB, path string) {
	tb.Helper()
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		tb.Fatal(err)
	}
	var created []string
	for line := range strings.Lines(string(mounts)) {
		f := strings.Fields(line)
		if len(f) < 3 || (f[2] != "cgroup" && f[2] != "cgroup2") {
			continue
		}
		for d := filepath.Join(f[1], path); d != f[1]; d = filepath.Dir(d) {
			if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
				created = append(created, d) // child before parent
			}
		}
	}
	tb.Cleanup(func() {
		for _, d := range created {
			// A cgroup whose last process just exited is busy for a moment.
			for i := 0; i < 50 && os.Remove(d) != nil; i++ {
				if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	})
}
