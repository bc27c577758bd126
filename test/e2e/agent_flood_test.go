package e2e

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedFloodIsSummarised is issue 11's item 8: an unprivileged process floods
// refused connects to IMDS (UDP, as the review did, and TCP) while an allowed client
// fetches credentials. The allowed client's connect and request events are all there,
// the flood is counted to the last connect in a few summary lines, and the events file
// stays small.
func TestPrivilegedFloodIsSummarised(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	hostile := hostileBin(t)
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: deny\nrules:\n  - name: root\n    user: root\n    action: allow\n")
	if err != nil {
		t.Fatal(err)
	}
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}
	floods := map[string]*background{}
	for _, proto := range []string{"udp", "tcp"} {
		floods[proto] = startBackground(t, bed, nobody, "flooding", hostile, "flood", proto, "169.254.169.254:80", "2s")
	}
	// The allowed client, several times during the flood.
	var clients []int
	for range 5 {
		code, r := curlExit(t, bed, testbed.Placement{}, credsURL)
		if code != 0 || !strings.Contains(r.Output, bed.Creds.AccessKeyID) {
			t.Errorf("allowed client during the flood: curl exit %d, output %q", code, r.Output)
		}
		clients = append(clients, r.PID)
		time.Sleep(300 * time.Millisecond)
	}
	attempts := map[string]int{}
	for proto, f := range floods {
		out := f.wait()
		var n, refused int
		if _, err := fmt.Sscanf(strings.TrimSpace(out), "attempts %d refused %d", &n, &refused); err != nil {
			t.Fatalf("%s flood printed %q: %v", proto, out, err)
		}
		if refused != n || n < 1000 {
			t.Fatalf("%s flood: %d attempts, %d refused: want every one of at least 1000 refused", proto, n, refused)
		}
		attempts[proto] = n
		t.Logf("%s flood: %d refused connects in 2s", proto, n)
	}
	for _, pid := range clients {
		var connect, request bool
		for _, e := range eventsOf(t, agent, pid) {
			connect = connect || (e.Event == "imds_connect" && e.Verdict == "allow" && e.Redirected)
			request = request || (e.Event == "imds_request" && e.Status == 200)
		}
		if !connect || !request {
			t.Errorf("allowed client %d: connect event %v, request event %v: lost to the flood", pid, connect, request)
		}
	}
	// Every refused connect is in an event or a summary; summaries come each second.
	for proto, f := range floods {
		pid := f.cmd.Process.Pid
		var counted uint64
		var lines int
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			events, err := agent.Events()
			if err != nil {
				t.Fatal(err)
			}
			counted, lines = 0, 0
			for _, e := range events {
				if e.PID != pid {
					continue
				}
				lines++
				switch e.Event {
				case "imds_connect":
					counted++
					if proto == "udp" {
						t.Errorf("udp flood wrote an imds_connect event without events.udp: %+v", e)
					}
				case "imds_connect_summary":
					counted += e.Count
					if e.Verdict != "deny" || e.UDP != (proto == "udp") || e.Dst != "169.254.169.254:80" {
						t.Errorf("%s summary %+v, want deny to 169.254.169.254:80, udp %v", proto, e, proto == "udp")
					}
				}
			}
			if counted >= uint64(attempts[proto]) || time.Now().After(deadline) {
				break
			}
		}
		if counted != uint64(attempts[proto]) {
			t.Errorf("%s flood: %d connects counted in events and summaries, want %d", proto, counted, attempts[proto])
		}
		// One event and one summary per second of flood, give or take the edges.
		if lines > 10 {
			t.Errorf("%s flood: %d event lines for one process in 2s, want a few", proto, lines)
		}
		t.Logf("%s flood: %d connects in %d lines", proto, counted, lines)
	}
	st, err := os.Stat(agent.EventsPath)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > 256<<10 {
		t.Errorf("events file %d bytes after the flood, want under 256 KiB", st.Size())
	}
	t.Logf("events file: %d bytes", st.Size())
}
