package preflight

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedRealHost runs every check against this machine's kernel, and the IMDS
// check against the test bed's emulator (IMDSv2 only), reached from inside the bed's
// network namespace: never the real 169.254.169.254.
func TestPrivilegedRealHost(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{IMDSv2Only: true})
	cfg := config.Default()
	h := Real(cfg)
	h.HTTP = &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{DialContext: bed.DialContext, DisableKeepAlives: true},
	}
	results := Run(context.Background(), h, cfg)
	var out strings.Builder
	if n := Write(&out, results); n != 0 {
		t.Fatalf("%d checks failed on the build machine:\n%s", n, out.String())
	}
	got := byCheck(results)
	if r := got["bpf permission"]; r.Status != OK {
		t.Errorf("bpf permission: %v %s", r.Status, r.Detail)
	}
	if r := got["imds"]; r.Status != OK || !strings.Contains(r.Detail, bed.InstanceID) {
		t.Errorf("imds against the bed's emulator: %v %s", r.Status, r.Detail)
	}
	t.Logf("preflight on this machine:\n%s", out.String())
}
