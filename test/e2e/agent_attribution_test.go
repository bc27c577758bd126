package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedAgentAttributesEveryClient runs the agent binary the way an operator
// would (inside the bed's network namespace, guarding the bed's cgroup) and checks the
// event of every standard client against what the test knows about it.
func TestPrivilegedAgentAttributesEveryClient(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	runs, err := bed.RunClients(ctx)
	if err != nil {
		t.Fatalf("clients: %v", err)
	}
	// A process in a container's pid namespace: the agent must report host pids.
	container := bed.RunCommand(ctx, "pidns", "curl in its own pid namespace", testbed.Placement{},
		"unshare", "--pid", "--fork", "sh", "-c",
		`read -r pid rest < /proc/self/stat; echo "$pid $$"; exec curl -sf -m 5 http://169.254.169.254/latest/meta-data/instance-id`)
	if container.Err != nil {
		t.Fatal(container.Err)
	}
	var hostPID, nsPID int
	if f := strings.Fields(container.Output); len(f) >= 2 {
		hostPID, _ = strconv.Atoi(f[0])
		nsPID, _ = strconv.Atoi(f[1])
	}
	if hostPID == 0 || nsPID != 1 {
		t.Fatalf("pid namespace client printed %q", container.Output)
	}
	outside := bed.RunCommand(ctx, "outside", "", testbed.Placement{OutsideCgroup: true},
		"curl", "-sf", "-m", "5", "http://169.254.169.254/latest/meta-data/instance-id")
	if outside.Err != nil {
		t.Fatal(outside.Err)
	}

	pids := []int{hostPID}
	for _, r := range runs {
		pids = append(pids, r.PID)
	}
	if _, err := agent.WaitEvents(pids...); err != nil {
		t.Fatal(err)
	}
	// Stop first: SIGTERM must flush every event and exit 0.
	if err := agent.Stop(); err != nil {
		t.Fatalf("agent exit: %v\n%s", err, agent.Log())
	}
	events, err := agent.Events()
	if err != nil {
		t.Fatal(err)
	}
	byPID := map[int][]testbed.Event{}
	requests := map[int][]testbed.Event{}
	for _, e := range events {
		switch e.Event {
		case "imds_connect":
			byPID[e.PID] = append(byPID[e.PID], e)
		case "imds_request":
			requests[e.PID] = append(requests[e.PID], e)
		default:
			t.Errorf("unknown event %q", e.Event)
		}
	}
	if len(byPID[outside.PID]) != 0 {
		t.Errorf("process outside the cgroup produced events: %+v", byPID[outside.PID])
	}
	rel := "/" + filepath.Base(bed.Cgroup)
	for _, r := range runs {
		evs := byPID[r.PID]
		if len(evs) == 0 {
			t.Errorf("%s (pid %d): no event", r.Name, r.PID)
			continue
		}
		e := evs[0]
		if e.Event != "imds_connect" || e.Verdict != "allow" || !e.Redirected || e.UID != r.UID || e.Exe != r.Exe ||
			e.PPID != os.Getpid() || e.Cgroup != rel || e.TID == 0 || e.Netns == 0 {
			t.Errorf("%s (pid %d uid %d exe %s): event %+v", r.Name, r.PID, r.UID, r.Exe, e)
		}
		wantUser := "root"
		if r.UID == testbed.NobodyUID {
			wantUser = "nobody"
		}
		if e.User != wantUser {
			t.Errorf("%s: user %q, want %q", r.Name, e.User, wantUser)
		}
		wantDst := "169.254.169.254:80"
		if r.Name == "curl-ipv6" {
			wantDst = "[fd00:ec2::254]:80"
		}
		if e.Dst != wantDst {
			t.Errorf("%s: dst %q, want %q", r.Name, e.Dst, wantDst)
		}
		// The short-lived client may be gone before /proc is read: then cmdline is
		// listed as missing, and everything the kernel recorded is still right.
		if len(e.Cmdline) == 0 && !slices.Contains(e.Missing, "cmdline") {
			t.Errorf("%s: empty cmdline not reported missing: %+v", r.Name, e)
		}
		if len(e.Cmdline) > 0 && filepath.Base(e.Cmdline[0]) != filepath.Base(r.Exe) {
			t.Errorf("%s: cmdline %q", r.Name, e.Cmdline)
		}
	}
	// The go-sdk client fetches a token and two paths over one keep-alive connection
	// or several: at least one event, all from the same process.
	if c := byPID[hostPID]; len(c) != 1 || c[0].Comm != "curl" {
		t.Errorf("pid namespace client (host pid %d): events %+v", hostPID, c)
	}
	// Every client's requests went through the broker, classified.
	wantVersions := map[string][]string{
		"curl-v1": {"v1"}, "curl-token": {"token"}, "curl-v2": {"v2"}, "go-sdk": {"token", "v2", "v2", "v2"},
		"curl-nobody": {"v1"}, "curl-ipv6": {"v1"},
	}
	for _, r := range runs {
		want, ok := wantVersions[r.Name]
		if !ok {
			continue
		}
		var got []string
		for _, q := range requests[r.PID] {
			got = append(got, q.IMDSVersion)
			if q.Status != 200 || q.Exe != r.Exe || q.UID != r.UID || q.Path == "" {
				t.Errorf("%s: request %+v", r.Name, q)
			}
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: request versions %v, want %v", r.Name, got, want)
		}
	}
	// The programs outlive the agent (pinned) until uninstalled.
	if !attached(t, bed.Cgroup) {
		t.Error("pinned programs detached when the agent stopped")
	}
	bin, _ := testbed.Agent()
	if out, err := exec.Command(bin, "uninstall", "--config", agent.ConfigPath).CombinedOutput(); err != nil {
		t.Fatalf("uninstall: %v: %s", err, out)
	}
	// The last reference to a link may be dropped a moment after the pins are gone (the
	// kernel releases links from a work queue): wait a little, never long.
	for deadline := time.Now().Add(2 * time.Second); attached(t, bed.Cgroup); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("programs still attached 2s after uninstall")
		}
	}
}

// attached reports whether imdsguard's programs are attached to cgroup.
func attached(t *testing.T, cgroup string) bool {
	t.Helper()
	out, err := exec.Command("bpftool", "cgroup", "show", cgroup).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool cgroup show: %v: %s", err, out)
	}
	return strings.Contains(string(out), "imds_connect4")
}
