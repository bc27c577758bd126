package e2e

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/status"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// waitNamespaces polls the agent's status socket until it lists n served namespaces.
func waitNamespaces(t *testing.T, agent *testbed.AgentProc, n int) status.Report {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		r, err := status.Fetch(ctx, agent.StatusSocket)
		cancel()
		if err == nil && len(r.Namespaces) == n {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("status lists %d namespaces (%v), want %d; agent log:\n%s", len(r.Namespaces), err, n, agent.Log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPrivilegedContainerNetnsServed: a container's IMDS connect makes the agent serve
// the broker inside the container's network namespace, which answers there on
// 127.0.0.1:254; the endpoint goes with the container's last process. (The kernel does
// not redirect to it yet: the broker refuses the direct connection with 403.)
func TestPrivilegedContainerNetnsServed(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	ns, err := bed.AddContainerNetns()
	if err != nil {
		t.Fatal(err)
	}
	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	waitNamespaces(t, agent, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The container: a shell that fetches once, then stays.
	cmd, err := bed.Command(ctx, testbed.Placement{Netns: ns}, "sh", "-c", "curl -sf -m 5 "+imdsURL+" >/dev/null && exec sleep 600")
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	r := waitNamespaces(t, agent, 1)
	ep := r.Namespaces[0]
	// The process watched is the first one reported in the namespace: the shell, or
	// curl when the kernel reported its fork first; once curl exits, the shell.
	for deadline := time.Now().Add(5 * time.Second); ep.PID != cmd.Process.Pid && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if r = waitNamespaces(t, agent, 1); len(r.Namespaces) == 1 {
			ep = r.Namespaces[0]
		}
	}
	if ep.PID != cmd.Process.Pid || !ep.Families.IPv4 || !ep.Families.IPv6 {
		t.Errorf("endpoint %+v: want the shell (pid %d) watched, both families", ep, cmd.Process.Pid)
	}
	// Written just after the namespace was handed to the manager: within a flush.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		events, err := agent.Events()
		if err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(events, func(e testbed.Event) bool { return e.Event == "imds_connect" && e.Netns == ep.Cookie }) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connect event from namespace %d, the one served", ep.Cookie)
		}
	}
	// The broker answers inside the container: curl -f exits 22 on its 403, 7 if
	// nothing listened.
	if code, _ := curlExit(t, bed, testbed.Placement{Netns: ns}, "http://127.0.0.1:254/latest/meta-data/instance-id"); code != 22 {
		t.Errorf("inside the container, 127.0.0.1:254: curl exit %d, want 22 (the broker's 403)", code)
	}
	if code, _ := curlExit(t, bed, testbed.Placement{Netns: ns}, "-g", "http://[::1]:254/latest/meta-data/instance-id"); code != 22 {
		t.Errorf("inside the container, [::1]:254: curl exit %d, want 22 (the broker's 403)", code)
	}
	cancel()
	<-done
	waitNamespaces(t, agent, 0)
}
