package e2e

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedExeCannotBeBorrowed is issue 11's item 4: an unprivileged process in a
// user namespace points its mm->exe_file at curl's file (prctl PR_SET_MM_MAP), so that
// /proc/PID/exe says curl, and asks IMDS for credentials under `exe: curl`. The kernel
// judges it by the file it exec'd (recorded by the sched_process_exec tracing program),
// refuses it, and its event says the exe was borrowed.
func TestPrivilegedExeCannotBeBorrowed(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	borrow, err := testbed.BorrowBinary()
	if err != nil {
		t.Fatal(err)
	}
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal(err)
	}
	if curl, err = filepath.EvalSymlinks(curl); err != nil {
		t.Fatal(err)
	}
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: deny\nrules:\n  - name: curl\n    exe: " + curl + "\n    action: allow\n")
	if err != nil {
		t.Fatal(err)
	}
	// Where the kernel cannot run the exec programs the agent falls back to today's
	// check and says so (exec_identity_unavailable); the attack then succeeds, the
	// documented weakness, and there is nothing to prove. Asked of the kernel directly,
	// the way the agent loads its programs.
	if err := execIdentityError(); err != nil {
		t.Skipf("this kernel cannot record executables at exec (tp_btf, task storage): %v", err)
	}
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}
	// The rule lets curl through, whoever runs it.
	if code, r := curlExit(t, bed, nobody, credsURL); code != 0 || !strings.Contains(r.Output, bed.Creds.AccessKeyID) {
		t.Fatalf("curl as nobody: exit %d, output %q: the rule must allow it for the test to mean anything", code, r.Output)
	}
	r := bed.RunCommand(context.Background(), "borrow", "", nobody, borrow, curl, testbed.IMDSv4.String(), "80")
	code := exitCode(t, r)
	if !strings.Contains(r.Output, "borrowed "+curl) {
		t.Fatalf("the probe did not borrow curl's identity (exit %d), the test proves nothing: %s", code, r.Output)
	}
	if code != 7 || strings.Contains(r.Output, "AccessKeyId") {
		t.Errorf("borrowed curl identity: exit %d, output %q: want 7 (refused)", code, r.Output)
	}
	// The event names what /proc says (curl) and says it is borrowed.
	if e := eventsOf(t, agent, r.PID); e[0].Verdict != "deny" || e[0].Rule != "" || !e[0].ExeBorrowed {
		t.Errorf("event %+v, want a deny by the default, exe_borrowed", e[0])
	}
}

// execIdentityError loads the programs as the agent does and says why they cannot
// record executables at exec, nil when they can (attaching is the agent's to prove).
func execIdentityError() error {
	h, err := hook.Open(hook.Target{IPv4: testbed.IMDSv4, IPv6: testbed.IMDSv6, Port: testbed.IMDSPort}, "")
	if err != nil {
		return err
	}
	defer h.Close()
	if err := h.LoadPrograms(zerolog.Nop()); err != nil {
		return err
	}
	return h.ExecIdentityError()
}
