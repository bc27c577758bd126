package hook

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

func startHook(t *testing.T, bed *testbed.Bed) (*Hook, <-chan Event) {
	t.Helper()
	h, err := Load(Target{IPv4: testbed.IMDSv4, IPv6: testbed.IMDSv6, Port: testbed.IMDSPort}, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	if err := h.Attach(bed.Cgroup); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	events := make(chan Event, 1024)
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx, events) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("reader: %v", err)
		}
	})
	return h, events
}

// waitFor returns the first event from pid, failing after a generous deadline. Events
// from other pids seen on the way are returned too, in order.
func waitFor(t *testing.T, events <-chan Event, pid int) (Event, []Event) {
	t.Helper()
	var seen []Event
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev := <-events:
			if int(ev.PID) == pid {
				return ev, seen
			}
			seen = append(seen, ev)
		case <-timeout:
			t.Fatalf("no event from pid %d; saw %+v", pid, seen)
		}
	}
}

func TestPrivilegedHookAttributesClients(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	_, events := startHook(t, bed)
	ctx := context.Background()

	runs, err := bed.RunClients(ctx)
	if err != nil {
		t.Fatalf("clients: %v", err)
	}
	for _, r := range runs {
		ev, _ := waitFor(t, events, r.PID)
		if int(ev.PPID) != os.Getpid() {
			t.Errorf("%s: ppid %d, want this test (%d)", r.Name, ev.PPID, os.Getpid())
		}
		if int(ev.UID) != r.UID {
			t.Errorf("%s: uid %d, want %d", r.Name, ev.UID, r.UID)
		}
		if ev.ExePath != r.Exe || ev.ExeTruncated {
			t.Errorf("%s: kernel exe %q (truncated %v), want %q", r.Name, ev.ExePath, ev.ExeTruncated, r.Exe)
		}
		if ev.TID == 0 || ev.CgroupID == 0 || ev.NetnsCookie == 0 || ev.SocketCookie == 0 || ev.StartBoottime == 0 {
			t.Errorf("%s: kernel fields missing: %+v", r.Name, ev)
		}
		if ev.Dst.Port() != testbed.IMDSPort {
			t.Errorf("%s: dst %s", r.Name, ev.Dst)
		}
		if d := time.Since(ev.Time); d < 0 || d > time.Minute {
			t.Errorf("%s: event time %s is %s from now", r.Name, ev.Time, d)
		}
		want := testbed.IMDSv4
		if r.Name == "curl-ipv6" {
			want = testbed.IMDSv6
		}
		if ev.Dst.Addr().Unmap() != want {
			t.Errorf("%s: dst %s, want %s", r.Name, ev.Dst, want)
		}
	}
}

func TestPrivilegedHookIgnoresOthers(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	h, events := startHook(t, bed)
	ctx := context.Background()
	url := "http://" + testbed.IMDSv4.String() + "/latest/meta-data/instance-id"

	// A process outside the guarded cgroup.
	outside := bed.RunCommand(ctx, "outside", "", testbed.Placement{OutsideCgroup: true}, "curl", "-sf", "-m", "5", url)
	// A process inside it, connecting somewhere that is not IMDS: IMDS's port on
	// another address, and another port on IMDS's address.
	other := bed.RunCommand(ctx, "other", "", testbed.Placement{}, "sh", "-c",
		"curl -s -m 2 http://127.0.0.1:80/ ; curl -s -m 2 http://169.254.169.254:81/ ; true")
	// A dual-stack socket reaching IMDS over an IPv4-mapped address is IMDS.
	mapped := bed.RunCommand(ctx, "mapped", "", testbed.Placement{}, "curl", "-sf", "-m", "5", "-g",
		"http://[::ffff:169.254.169.254]/latest/meta-data/instance-id")
	for _, r := range []testbed.Run{outside, other, mapped} {
		if r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	ev, before := waitFor(t, events, mapped.PID)
	// The ring buffer is ordered: anything the earlier processes caused came first.
	for _, e := range before {
		t.Errorf("unexpected event from pid %d (%s) to %s", e.PID, e.Comm, e.Dst)
	}
	if !ev.Dst.Addr().Is4In6() || ev.Dst.Addr().Unmap() != testbed.IMDSv4 {
		t.Errorf("mapped: dst %s", ev.Dst)
	}
	st, err := h.Stats()
	if err != nil || st.RingFull != 0 || st.QueueDrops != 0 {
		t.Errorf("stats %+v, %v", st, err)
	}
}

func TestPrivilegedHookDetach(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	h, events := startHook(t, bed)
	if err := h.Detach(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	url := "http://" + testbed.IMDSv4.String() + "/latest/meta-data/instance-id"
	r := bed.RunCommand(ctx, "after-detach", "", testbed.Placement{}, "curl", "-sf", "-m", "5", url)
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	// Attach again and use a second client as the end marker: the ring buffer is
	// ordered, so an event from the first client would come before the marker's.
	if err := h.Attach(bed.Cgroup); err != nil {
		t.Fatal(err)
	}
	marker := bed.RunCommand(ctx, "marker", "", testbed.Placement{}, "curl", "-sf", "-m", "5", url)
	if marker.Err != nil {
		t.Fatal(marker.Err)
	}
	if _, before := waitFor(t, events, marker.PID); len(before) > 0 {
		t.Errorf("events while detached: %+v", before)
	}
}

func TestLoadRejectsIncompleteTarget(t *testing.T) {
	_, err := Load(Target{}, "")
	if err == nil {
		t.Fatal("loaded with no target")
	}
	if errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
}
