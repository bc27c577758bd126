package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedBrokerIMDSDown: with IMDS down, a client through the broker fails the way
// it does without the agent, with a failed connection and no HTTP answer (a 502 made
// cloud-init give up and SDKs back off and retry).
func TestPrivilegedBrokerIMDSDown(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	client, err := testbed.ClientBinary()
	if err != nil {
		t.Fatal(err)
	}
	bed.StopEmulator()
	// curl: 7 could not connect, 56 connection reset; 22 would be an HTTP error.
	direct, _ := curlExit(t, bed, testbed.Placement{OutsideCgroup: true}, imdsURL)
	brokered, r := curlExit(t, bed, testbed.Placement{}, imdsURL)
	t.Logf("curl exit codes: direct %d, through the broker %d", direct, brokered)
	if direct != 7 {
		t.Fatalf("curl straight to a stopped IMDS: exit %d, want 7", direct)
	}
	if brokered != 7 && brokered != 56 {
		t.Errorf("curl through the broker to a stopped IMDS: exit %d, want a connection failure (7 or 56)", brokered)
	}
	var ev testbed.Event
	for _, e := range eventsOf(t, agent, r.PID) {
		if e.Event == "imds_request" {
			ev = e
		}
	}
	if ev.Refused != "upstream_error" || ev.Status != 0 {
		t.Errorf("request event %+v, want refused upstream_error with no status", ev)
	}
	// The SDK gets a connection error both ways, never an HTTP status.
	for _, p := range []testbed.Placement{{OutsideCgroup: true}, {}} {
		began := time.Now()
		sdk := bed.RunCommand(context.Background(), "sdk", "", p, client, "sdk")
		t.Logf("sdk (outside cgroup %v) failed after %s: %v", p.OutsideCgroup, time.Since(began).Round(time.Millisecond), sdk.Err)
		if sdk.Err == nil {
			t.Fatalf("sdk (outside cgroup %v) got an answer from a stopped IMDS", p.OutsideCgroup)
		}
		if strings.Contains(sdk.Output, "StatusCode") || strings.Contains(sdk.Output, "502") {
			t.Errorf("sdk (outside cgroup %v) saw an HTTP error: %s", p.OutsideCgroup, sdk.Output)
		}
	}
}

// TestPrivilegedBrokerCredentialPathForms: a credential fetched under another spelling of
// its path that IMDS serves is counted and fingerprinted like /latest/….
func TestPrivilegedBrokerCredentialPathForms(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	url := "http://169.254.169.254/latest/meta-data/iam/security-credentials/" + testbed.Role + "/"
	code, r := curlExit(t, bed, testbed.Placement{}, url)
	if code != 0 || !strings.Contains(r.Output, bed.Creds.AccessKeyID) {
		t.Fatalf("curl %s: exit %d %q", url, code, r.Output)
	}
	waitFingerprint(t, agent.FingerprintsPath, r.PID)
}

// TestPrivilegedAuditWouldRefuse: in audit mode an IMDSv1 request that enforce would
// refuse is forwarded, marked would_refuse in its event and counted in the report.
func TestPrivilegedAuditWouldRefuse(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	curl, _ := filepath.EvalSymlinks("/usr/bin/curl")
	agent, err := bed.StartAgent(fmt.Sprintf("mode: audit\ndefault_action: allow\nrules:\n  - name: curl-v2\n    exe: %s\n    action: allow\n    imdsv2: required\n", curl))
	if err != nil {
		t.Fatal(err)
	}
	code, r := curlExit(t, bed, testbed.Placement{}, imdsURL)
	if code != 0 {
		t.Fatalf("IMDSv1 in audit mode: curl exit %d, want 0", code)
	}
	var ev testbed.Event
	for _, e := range eventsOf(t, agent, r.PID) {
		if e.Event == "imds_request" {
			ev = e
		}
	}
	if ev.Status != 200 || ev.Refused != "" || ev.WouldRefuse != "imdsv2_required" || ev.IMDSVersion != "v1" {
		t.Errorf("request event %+v, want forwarded and would_refuse imdsv2_required", ev)
	}
	// The report asks the running agent: the request is there at once, long before the
	// agent saves its ledger; once the agent stopped, the saved ledger says the same.
	bin, _ := testbed.Agent()
	for _, source := range []string{"agent", "ledger"} {
		if source == "ledger" {
			if err := agent.Stop(); err != nil {
				t.Fatalf("stop: %v", err)
			}
		}
		out, err := exec.Command(bin, "report", "--config", agent.ConfigPath, "--format", "json").CombinedOutput()
		if err != nil {
			t.Fatalf("report: %v: %s", err, out)
		}
		if !strings.Contains(string(out), `"v1_would_reject": 1`) || !strings.Contains(string(out), `"source": "`+source+`"`) {
			t.Errorf("report (%s) does not count the request enforce would refuse: %s", source, out)
		}
	}
}
