package e2e

import (
	"context"
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedDeniedIsRefused: a denied connect() fails the way a connection to a port
// nobody listens on does, ECONNREFUSED (bpf_set_retval, Linux 5.18+), not with EPERM's
// "Operation not permitted" that tells the client a guard is there. curl exits 7, and a
// shell's /dev/tcp says "Connection refused".
func TestPrivilegedDeniedIsRefused(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: allow\nrules:\n  - name: no-nobody\n    user: nobody\n    action: deny\n")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(agent.Log(), `"deny_refused":true`) {
		t.Skipf("the kernel refuses bpf_set_retval in cgroup connect hooks: denials fail with EPERM\n%s", agent.Log())
	}
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}
	if code, _ := curlExit(t, bed, nobody, imdsURL); code != 7 {
		t.Errorf("denied curl: exit %d, want 7 (connection refused)", code)
	}
	r := bed.RunCommand(context.Background(), "bash", "", nobody, "bash", "-c", "exec 3<>/dev/tcp/169.254.169.254/80")
	if r.Err == nil || !strings.Contains(r.Err.Error(), "Connection refused") {
		t.Errorf("denied connect from bash: %v, want Connection refused", r.Err)
	}
	if e := eventsOf(t, agent, r.PID); len(e) == 0 || e[0].Verdict != "deny" {
		t.Errorf("denied connect: events %+v, want a deny", e)
	}
}
