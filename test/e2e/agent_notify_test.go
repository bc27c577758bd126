package e2e

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// notification is one datagram the agent sent to NOTIFY_SOCKET, and whether the
// programs were attached to the bed's cgroup when it arrived.
type notification struct {
	state    string
	attached bool
}

// TestPrivilegedAgentNotifiesSystemd plays systemd's side of Type=notify: a datagram
// socket in NOTIFY_SOCKET and a watchdog in WATCHDOG_USEC. READY=1 must come only once
// the programs are attached (boot waits for it), WATCHDOG=1 must keep coming while the
// agent beats the kernel's heartbeat, and STOPPING=1 must come on a clean stop.
func TestPrivilegedAgentNotifiesSystemd(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	sock := filepath.Join(bed.Dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	got := make(chan notification, 256)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				close(got)
				return
			}
			state := string(buf[:n])
			got <- notification{state: state, attached: strings.Contains(state, "READY=1") && attached(t, bed.Cgroup)}
		}
	}()
	t.Setenv("NOTIFY_SOCKET", sock)
	t.Setenv("WATCHDOG_USEC", "400000")

	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	var states []string
	ready, watchdogs := false, 0
	for deadline := time.After(10 * time.Second); !ready || watchdogs < 3; {
		select {
		case n := <-got:
			states = append(states, n.state)
			switch {
			case strings.Contains(n.state, "READY=1"):
				if !n.attached {
					t.Fatalf("READY=1 before the programs were attached; states so far %q", states)
				}
				ready = true
			case n.state == "WATCHDOG=1":
				if !ready {
					t.Fatalf("watchdog before ready: %q", states)
				}
				watchdogs++
			}
		case <-deadline:
			t.Fatalf("ready=%v, %d watchdog pings in 10s; states %q\n%s", ready, watchdogs, states, agent.Log())
		}
	}
	if !strings.HasPrefix(states[0], "STATUS=") {
		t.Errorf("first notification %q: want a STATUS line while loading", states[0])
	}
	if err := agent.Stop(); err != nil {
		t.Fatalf("stop: %v\n%s", err, agent.Log())
	}
	for deadline := time.After(5 * time.Second); ; {
		select {
		case n := <-got:
			if strings.Contains(n.state, "STOPPING=1") {
				return
			}
		case <-deadline:
			t.Fatalf("no STOPPING=1 after a clean stop")
		}
	}
}
