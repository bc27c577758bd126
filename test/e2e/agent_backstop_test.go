package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// Issue 11's last packets: packets to IMDS that no connect hook judged. The egress
// backstop (cgroup_skb/egress) drops those of sockets connect4/6 did not let through.

// TestPrivilegedRawSocketCannotReachIMDS: root in the guarded cgroup, under a policy that
// denies it, sends a hand-built TCP SYN to IMDS from an IPPROTO_RAW socket. Without the
// backstop IMDS answers; with it nothing leaves, the summary names the process, and an
// allowed client still gets its credentials through the broker.
func TestPrivilegedRawSocketCannotReachIMDS(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	hostile := hostileBin(t)
	imds := testbed.IMDSv4.String() + ":80"
	// Before the agent: the probe's SYN is answered, so the test can tell.
	if r := bed.RunCommand(context.Background(), "rawsyn", "", testbed.Placement{}, hostile, "rawsyn", imds); exitCode(t, r) != 0 {
		t.Fatalf("unguarded raw SYN got no answer, the test proves nothing: %s", r.Output)
	}
	curl := curlPath(t)
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: deny\nrules:\n  - name: curl\n    exe: " + curl + "\n    action: allow\n")
	if err != nil {
		t.Fatal(err)
	}
	r := bed.RunCommand(context.Background(), "rawsyn", "", testbed.Placement{}, hostile, "rawsyn", imds)
	if code := exitCode(t, r); code != 7 || !strings.Contains(r.Output, "no answer") {
		t.Errorf("raw SYN under a deny policy: exit %d, %q; want no answer", code, r.Output)
	}
	if e := backstopSummary(t, agent, r.PID); e.Verdict != "deny" || e.Count < 1 || e.UDP {
		t.Errorf("summary %+v, want a backstop deny counting the SYN", e)
	}
	// The broker path: curl's connection goes to loopback, the agent's own to IMDS.
	if code, r := curlExit(t, bed, testbed.Placement{}, credsURL); code != 0 || !strings.Contains(r.Output, bed.Creds.AccessKeyID) {
		t.Errorf("allowed curl through the broker: exit %d, %q", code, r.Output)
	}
}

// TestPrivilegedDNATToIMDSIsDropped: netfilter (in the bed's namespace) rewrites
// connections to 10.254.254.254:80 to IMDS. connect4 judges the address asked for, which
// is not IMDS; the backstop sees the packet's destination after the rewrite and drops it.
// A connection the policy allows straight to IMDS (no broker) still works.
func TestPrivilegedDNATToIMDSIsDropped(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	const alias = "10.254.254.254"
	if out, err := exec.Command("ip", "-n", bed.Name, "addr", "add", alias+"/32", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("add %s: %v: %s", alias, err, out)
	}
	rules := filepath.Join(bed.Dir, "dnat.nft")
	nft := "table ip imdsguard_test {\n  chain out {\n    type nat hook output priority -100;\n" +
		"    ip daddr " + alias + " tcp dport 80 dnat to " + testbed.IMDSv4.String() + ":80\n  }\n}\n"
	if err := os.WriteFile(rules, []byte(nft), 0o600); err != nil {
		t.Fatal(err)
	}
	// Only inside the bed's namespace, which goes with the bed.
	if out, err := exec.Command("nsenter", "--net="+bed.NetnsPath, "nft", "-f", rules).CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}
	viaAlias := strings.Replace(credsURL, testbed.IMDSv4.String(), alias, 1)
	if code, r := curlExit(t, bed, nobody, viaAlias); code != 0 || !strings.Contains(r.Output, bed.Creds.AccessKeyID) {
		t.Fatalf("unguarded curl through the DNAT: exit %d, %q: the rewrite must work for the test to mean anything", code, r.Output)
	}
	curl := curlPath(t)
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: deny\nbroker:\n  enabled: false\nrules:\n  - name: curl\n    exe: " + curl + "\n    action: allow\n")
	if err != nil {
		t.Fatal(err)
	}
	code, r := curlExit(t, bed, nobody, "--connect-timeout", "2", viaAlias)
	if code == 0 || strings.Contains(r.Output, "AccessKeyId") {
		t.Errorf("curl through the DNAT under the guard: exit %d, %q; want no connection", code, r.Output)
	}
	if e := backstopSummary(t, agent, r.PID); e.Verdict != "deny" || e.Count < 1 {
		t.Errorf("summary %+v, want a backstop deny", e)
	}
	// Allowed and not brokered: straight to IMDS, approved at connect.
	code, r = curlExit(t, bed, nobody, credsURL)
	if code != 0 || !strings.Contains(r.Output, bed.Creds.AccessKeyID) {
		t.Errorf("allowed direct curl: exit %d, %q", code, r.Output)
	}
	if e := eventsOf(t, agent, r.PID); len(e) == 0 || e[0].Verdict != "allow" || e[0].Redirected {
		t.Errorf("allowed direct curl: events %+v, want an unredirected allow", e)
	}
}

func curlPath(t *testing.T) string {
	t.Helper()
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal(err)
	}
	if curl, err = filepath.EvalSymlinks(curl); err != nil {
		t.Fatal(err)
	}
	return curl
}

// backstopSummary waits for the backstop's summary of pid (written at the next flush).
func backstopSummary(t *testing.T, a *testbed.AgentProc, pid int) testbed.Event {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		events, err := a.Events()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range events {
			if e.PID == pid && e.Backstop {
				return e
			}
		}
	}
	t.Fatalf("no backstop summary for pid %d", pid)
	return testbed.Event{}
}
