package hook

import (
	"context"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedOtherEndpointsGuarded: the ECS and Pod Identity credential endpoints'
// addresses, when configured, are judged like IMDS's (a default-deny policy refuses
// them, and the event names the destination asked for); when not configured, a connect
// to them is not the programs' business (no route there in the bed: unreachable).
func TestPrivilegedOtherEndpointsGuarded(t *testing.T) {
	ecs := netip.MustParseAddrPort("169.254.170.2:80")
	pod4 := netip.MustParseAddrPort("169.254.170.23:80")
	pod6 := netip.MustParseAddrPort("[fd00:ec2::23]:80")
	for _, tc := range []struct {
		name   string
		others []netip.AddrPort
		want   string // bash's error for each connect
	}{
		{"configured", []netip.AddrPort{ecs, pod4, pod6}, "Connection refused"},
		{"not configured", nil, "Network is unreachable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bed := testbed.Start(t, testbed.Options{})
			h, err := Load(Target{IPv4: testbed.IMDSv4, IPv6: testbed.IMDSv6, Port: testbed.IMDSPort, Others: tc.others}, "")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { h.Close() })
			if !h.DenyRefused() {
				t.Skip("the kernel refuses bpf_set_retval in cgroup connect hooks (before Linux 5.18)")
			}
			if err := h.SetPolicy(KernelPolicy{Enforce: true}); err != nil { // default deny
				t.Fatal(err)
			}
			if err := h.Attach(bed.Cgroup); err != nil {
				t.Fatal(err)
			}
			events := make(chan Event, 64)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- h.Run(ctx, events) }()
			t.Cleanup(func() { cancel(); <-done })
			for _, dst := range []netip.AddrPort{ecs, pod4, pod6, netip.MustParseAddrPort("[::ffff:169.254.170.2]:80")} {
				// bash's /dev/tcp connects an AF_INET6 socket for a mapped address: the
				// dual-stack path (connect6, the IPv4 table).
				r := bed.RunCommand(context.Background(), "bash", "", testbed.Placement{}, "bash", "-c",
					"exec 3<>/dev/tcp/"+dst.Addr().String()+"/"+strconv.Itoa(int(dst.Port())))
				if r.Err == nil || !strings.Contains(r.Err.Error(), tc.want) {
					t.Errorf("connect to %s: %v, want %q", dst, r.Err, tc.want)
				}
				if tc.others == nil {
					continue
				}
				ev, _ := waitFor(t, events, r.PID)
				if ev.Dst != dst || ev.Verdict != VerdictDeny {
					t.Errorf("connect to %s: event dst %s verdict %s, want the destination asked for, deny", dst, ev.Dst, ev.Verdict)
				}
			}
			if tc.others == nil {
				select {
				case ev := <-events:
					t.Errorf("event for a destination not guarded: %+v", ev)
				case <-time.After(100 * time.Millisecond):
				}
			}
		})
	}
}
