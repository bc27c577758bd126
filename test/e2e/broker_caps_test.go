package e2e

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// idleConnsProbe is the attack of issue 11 item 7: procs processes of one user each open
// conns keep-alive connections to IMDS, send one request on each and leave them idle.
// It prints "held N" (connections still open after their request) and sleeps.
const idleConnsProbe = `
import os, socket, sys, time
procs, conns = int(sys.argv[1]), int(sys.argv[2])
parent = os.getpid()
r, w = os.pipe()
for p in range(procs):
    if os.fork() == 0:
        os.close(r)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # the test reads stdout until every holder of it is gone
        os.dup2(null, 2)
        socks = []
        for i in range(conns):
            try:
                s = socket.create_connection(("169.254.169.254", 80), timeout=5)
                s.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
                socks.append(s)
            except OSError:
                pass
        held = 0
        for s in socks:
            try:
                if s.recv(1024).startswith(b"HTTP/1.1 200"):
                    held += 1
            except OSError:
                pass
        os.write(w, b"%d\n" % held)
        os.close(w)
        while os.getppid() == parent:  # hold the connections until the parent is killed
            time.sleep(0.2)
        os._exit(0)
os.close(w)
held = sum(int(x) for x in os.fdopen(r).read().split())
print("held", held, flush=True)
time.sleep(3600)
`

func agentRSS(t *testing.T, pid int) int {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmRSS:" {
			kb, _ := strconv.Atoi(f[1])
			return kb
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// TestPrivilegedBrokerConnectionCaps: 4,000 idle keep-alive connections of one user took
// the agent from 23 to 108 MB. Now the user holds at most its cap of them, the rest are
// reset, the agent's memory stays bounded, and another user is still served.
func TestPrivilegedBrokerConnectionCaps(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: allow\nbroker:\n  idle_timeout: 5m\n")
	if err != nil {
		t.Fatal(err)
	}
	// Warm the agent up the way the attacker's first requests would.
	if code, _ := curlExit(t, bed, testbed.Placement{}, imdsURL); code != 0 {
		t.Fatalf("curl before: exit %d", code)
	}
	before := agentRSS(t, agent.Cmd.Process.Pid)
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}
	const procs, conns, perUID = 10, 400, 256 // per process 400 > 64, all together 4,000 > 256
	probe := startBackground(t, bed, nobody, fmt.Sprintf("held %d", perUID),
		"sh", "-c", `ulimit -n 4096 && exec python3 -c "$0" "$@"`, idleConnsProbe, strconv.Itoa(procs), strconv.Itoa(conns))
	held := agentRSS(t, agent.Cmd.Process.Pid)
	t.Logf("agent RSS: %d kB before, %d kB with uid %d holding %d idle connections (of %d attempted)",
		before, held, testbed.NobodyUID, perUID, procs*conns)
	if held-before > 32<<10 {
		t.Errorf("agent grew by %d kB with one user's idle connections capped at %d", held-before, perUID)
	}
	// Root is still served while nobody sits at its cap.
	if code, r := curlExit(t, bed, testbed.Placement{}, imdsURL); code != 0 {
		t.Fatalf("root's curl while nobody holds its cap: exit %d %q", code, r.Output)
	}
	// Refusals are logged once per uid a minute, with the cap that refused them.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		log := agent.Log()
		if strings.Contains(log, `"broker_connection_cap"`) {
			if n := strings.Count(log, `"broker_connection_cap"`); n > 2 {
				t.Errorf("%d broker_connection_cap lines for one uid within a minute, want one per cap", n)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no broker_connection_cap in the agent's log:\n%s", log)
		}
	}
	probe.cmd.Process.Kill()
	probe.wait()
}

// TestPrivilegedBrokerBogusToken: a process whose rule requires IMDSv2 sends a token the
// emulator never issued. The broker forwards it (IMDS is the judge of its tokens), the
// emulator answers 401 and the process gets nothing; the request's event says v2, 401.
// The emulator checks tokens only when it requires them (IMDS checks every token it is
// given): IMDSv2Only.
func TestPrivilegedBrokerBogusToken(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{IMDSv2Only: true})
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: deny\nrules:\n  - name: root-v2\n    user: root\n    action: allow\n    imdsv2: required\n")
	if err != nil {
		t.Fatal(err)
	}
	code, r := curlExit(t, bed, testbed.Placement{}, "-H", "X-aws-ec2-metadata-token: AQAEAbogusbogusbogus==", credsURL)
	if code != 22 || strings.Contains(r.Output, "AccessKeyId") {
		t.Fatalf("bogus token: curl exit %d %q, want 22 (an HTTP error) and nothing", code, r.Output)
	}
	var ev testbed.Event
	for _, e := range eventsOf(t, agent, r.PID) {
		if e.Event == "imds_request" {
			ev = e
		}
	}
	if ev.IMDSVersion != "v2" || ev.Status != 401 || ev.Refused != "" {
		t.Errorf("request event %+v, want v2 forwarded and IMDS's 401", ev)
	}
}
