package testbed

import (
	"os"
	"testing"
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
