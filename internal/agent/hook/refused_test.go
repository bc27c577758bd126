package hook

import (
	"context"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedDenyErrno loads both variants of the programs, the one the probe picks
// where the kernel allows bpf_set_retval and the EPERM fallback it loads where it does
// not (the probe's answer forced), and checks what a denied connect() returns.
func TestPrivilegedDenyErrno(t *testing.T) {
	for _, tc := range []struct {
		refused bool
		want    string
	}{{true, "Connection refused"}, {false, "Operation not permitted"}} {
		t.Run(tc.want, func(t *testing.T) {
			bed := testbed.Start(t, testbed.Options{})
			h, err := Open(Target{IPv4: testbed.IMDSv4, IPv6: testbed.IMDSv6, Port: testbed.IMDSPort}, "")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { h.Close() })
			if tc.refused {
				err = h.LoadPrograms(zerolog.Nop())
			} else {
				err = h.loadPrograms(false, false)
			}
			if err != nil {
				t.Fatal(err)
			}
			if h.DenyRefused() != tc.refused {
				t.Skip("the kernel refuses bpf_set_retval in cgroup connect hooks (before Linux 5.18)")
			}
			if err := h.SetPolicy(KernelPolicy{Enforce: true}); err != nil { // default deny
				t.Fatal(err)
			}
			if err := h.Attach(bed.Cgroup); err != nil {
				t.Fatal(err)
			}
			for _, dst := range []string{"169.254.169.254", "[" + testbed.IMDSv6.String() + "]"} {
				r := bed.RunCommand(context.Background(), "bash", "", testbed.Placement{}, "bash", "-c", "exec 3<>/dev/tcp/"+strings.Trim(dst, "[]")+"/80")
				if r.Err == nil || !strings.Contains(r.Err.Error(), tc.want) {
					t.Errorf("denied connect to %s: %v, want %q", dst, r.Err, tc.want)
				}
			}
		})
	}
}
