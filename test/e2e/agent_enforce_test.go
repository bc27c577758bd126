package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

const imdsURL = "http://169.254.169.254/latest/meta-data/instance-id"

// curlExit runs curl in the bed and returns its exit code: 0 answered 2xx, 7 could not
// connect (a denial: ECONNREFUSED, EPERM before Linux 5.18; or nothing listening), 22 HTTP error (-f), 28 timed out.
func curlExit(t *testing.T, bed *testbed.Bed, p testbed.Placement, argv ...string) (int, testbed.Run) {
	t.Helper()
	r := bed.RunCommand(context.Background(), "curl", "", p, append([]string{"curl", "-sf", "-m", "5"}, argv...)...)
	var ee *exec.ExitError
	if errors.As(r.Err, &ee) {
		return ee.ExitCode(), r
	}
	if r.Err != nil {
		t.Fatalf("curl: %v", r.Err)
	}
	return 0, r
}

func eventsOf(t *testing.T, a *testbed.AgentProc, pid int) []testbed.Event {
	t.Helper()
	events, err := a.WaitEvents(pid)
	if err != nil {
		t.Fatal(err)
	}
	of := func(events []testbed.Event) []testbed.Event {
		var out []testbed.Event
		for _, e := range events {
			if e.PID == pid {
				out = append(out, e)
			}
		}
		return out
	}
	// A request line is written after the client has its answer, and can follow the
	// connect line by a flush or two: wait until the pid's lines stop coming.
	out := of(events)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		time.Sleep(150 * time.Millisecond)
		events, err := a.Events()
		if err != nil {
			t.Fatal(err)
		}
		if now := of(events); len(now) > len(out) {
			out = now
			continue
		}
		break
	}
	return out
}

// copyFile copies src to dst with mode 0755: the same program under another inode.
func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, data, 0o755); err != nil {
		t.Fatal(err)
	}
}

func TestPrivilegedAllowlistEnforce(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	curl, _ := filepath.EvalSymlinks("/usr/bin/curl")
	renamed := filepath.Join(bed.Dir, "curl-copy")
	copyFile(t, curl, renamed)
	alias := filepath.Join(bed.Dir, "innocent") // a symlink: comm says "innocent", exe is curl
	if err := os.Symlink(curl, alias); err != nil {
		t.Fatal(err)
	}
	// The unit's cgroup exists before the agent starts, as a running service's does.
	if _, err := bed.SubCgroup("app.service/worker"); err != nil {
		t.Fatal(err)
	}
	agent, err := bed.StartAgent(fmt.Sprintf(`
mode: enforce
default_action: deny
rules:
  - name: no-nobody
    user: nobody
    action: deny
  - name: curl
    exe: %s
    action: allow
  - name: app-unit
    cgroup: /%s/app.service
    action: allow
`, curl, filepath.Base(bed.Cgroup)))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name     string
		p        testbed.Placement
		argv     []string
		code     int
		verdict  string
		rule     string
		redirect bool
	}{
		{"allowed exe", testbed.Placement{}, []string{imdsURL}, 0, "allow", "curl", true},
		{"allowed exe under another comm", testbed.Placement{}, []string{"--next"}, 0, "allow", "curl", true},
		{"denied user", testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}, []string{imdsURL}, 7, "deny", "no-nobody", false},
		{"renamed copy", testbed.Placement{}, []string{imdsURL}, 7, "deny", "", false},
		{"allowed unit", testbed.Placement{SubCgroup: "app.service/worker"}, []string{imdsURL}, 0, "allow", "app-unit", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			argv := c.argv
			bin := "curl"
			switch c.name {
			case "allowed exe under another comm":
				bin, argv = alias, []string{imdsURL}
			case "renamed copy", "allowed unit":
				bin = renamed
			}
			r := bed.RunCommand(context.Background(), c.name, "", c.p, append([]string{bin, "-sf", "-m", "5"}, argv...)...)
			code := 0
			var ee *exec.ExitError
			if errors.As(r.Err, &ee) {
				code = ee.ExitCode()
			} else if r.Err != nil {
				t.Fatal(r.Err)
			}
			if code != c.code {
				t.Errorf("curl exit %d, want %d", code, c.code)
			}
			evs := eventsOf(t, agent, r.PID)
			e := evs[0]
			if e.Event != "imds_connect" || e.Verdict != c.verdict || e.Rule != c.rule || e.Redirected != c.redirect {
				t.Errorf("event %+v, want verdict %s rule %q redirected %v", e, c.verdict, c.rule, c.redirect)
			}
			if c.name == "allowed exe under another comm" && e.Comm != "innocent" {
				t.Errorf("comm %q: the alias did not change comm, the test proves nothing", e.Comm)
			}
		})
	}
}

// TestPrivilegedPeernameKeepsIMDS: a redirected client still sees IMDS as its peer.
func TestPrivilegedPeernameKeepsIMDS(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	client, err := testbed.ClientBinary()
	if err != nil {
		t.Fatal(err)
	}
	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	r := bed.RunCommand(context.Background(), "peername", "", testbed.Placement{}, client, "peername")
	if r.Err != nil || strings.TrimSpace(r.Output) != "169.254.169.254:80" {
		t.Fatalf("getpeername said %q (%v), want 169.254.169.254:80", r.Output, r.Err)
	}
	if e := eventsOf(t, agent, r.PID); !e[0].Redirected {
		t.Fatalf("not redirected, the test proves nothing: %+v", e[0])
	}
}

func TestPrivilegedAllowlistAudit(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	agent, err := bed.StartAgent("mode: audit\ndefault_action: deny\nrules:\n  - name: nobody-only\n    user: nobody\n    action: allow\n")
	if err != nil {
		t.Fatal(err)
	}
	code, r := curlExit(t, bed, testbed.Placement{}, imdsURL)
	if code != 0 {
		t.Fatalf("audit mode refused a connection: curl exit %d", code)
	}
	e := eventsOf(t, agent, r.PID)[0]
	if e.Verdict != "audit_deny" || e.Rule != "" || !e.Redirected {
		t.Errorf("event %+v", e)
	}
}

func TestPrivilegedIMDSv2PerProcess(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	curl, _ := filepath.EvalSymlinks("/usr/bin/curl")
	client, err := testbed.ClientBinary()
	if err != nil {
		t.Fatal(err)
	}
	agent, err := bed.StartAgent(fmt.Sprintf(`
mode: enforce
default_action: allow
rules:
  - name: curl-v2
    exe: %s
    action: allow
    imdsv2: required
`, curl))
	if err != nil {
		t.Fatal(err)
	}
	// IMDSv1 from curl: 401, as IMDS answers with HttpTokens=required.
	code, v1 := curlExit(t, bed, testbed.Placement{}, imdsURL)
	if code != 22 {
		t.Errorf("IMDSv1 curl: exit %d, want 22 (HTTP 401)", code)
	}
	// IMDSv2 from curl works.
	code, tok := curlExit(t, bed, testbed.Placement{}, "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
		"http://169.254.169.254/latest/api/token")
	if code != 0 {
		// Seen once (curl 56, the broker reset the connection: its upstream failed);
		// the agent's log says why.
		t.Fatalf("token PUT: exit %d\n%s", code, agent.Log())
	}
	code, v2 := curlExit(t, bed, testbed.Placement{}, "-H", "X-aws-ec2-metadata-token: "+strings.TrimSpace(tok.Output), imdsURL)
	if code != 0 || !strings.HasPrefix(v2.Output, "i-") {
		t.Errorf("IMDSv2 curl: exit %d output %q", code, v2.Output)
	}
	// A token PUT that went through a proxy is refused, as IMDS does.
	code, _ = curlExit(t, bed, testbed.Placement{}, "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
		"-H", "X-Forwarded-For: 203.0.113.7", "http://169.254.169.254/latest/api/token")
	if code != 22 {
		t.Errorf("token PUT with X-Forwarded-For: exit %d, want 22 (HTTP 403)", code)
	}
	// The SDK client (another exe, no v2 rule) works, and so does IMDSv1 from it.
	sdk := bed.RunCommand(context.Background(), "sdk", "", testbed.Placement{}, client, "sdk")
	if sdk.Err != nil || !strings.Contains(sdk.Output, bed.Creds.AccessKeyID) {
		t.Errorf("sdk client: %v %q", sdk.Err, sdk.Output)
	}
	var refused testbed.Event
	for _, e := range eventsOf(t, agent, v1.PID) {
		if e.Event == "imds_request" {
			refused = e
		}
	}
	if refused.Status != 401 || refused.IMDSVersion != "v1" || refused.Refused != "imdsv2_required" || refused.Rule != "curl-v2" {
		t.Errorf("v1 request event %+v", refused)
	}
	// Reload to audit: the same IMDSv1 request is now forwarded.
	bin, _ := testbed.Agent()
	os.WriteFile(agent.ConfigPath, []byte(strings.Replace(mustRead(t, agent.ConfigPath), "mode: enforce", "mode: audit", 1)), 0o600)
	if out, err := exec.Command(bin, "reload", "--config", agent.ConfigPath).CombinedOutput(); err != nil {
		t.Fatalf("reload: %v: %s", err, out)
	}
	if code, _ := curlExit(t, bed, testbed.Placement{}, imdsURL); code != 0 {
		t.Errorf("IMDSv1 in audit after reload: exit %d, want 0", code)
	}
	// The report, from the state the agent left on disk, names curl as the IMDSv1 user
	// holding the instance back.
	if err := agent.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	out, err := exec.Command(bin, "report", "--config", agent.ConfigPath, "--format", "json").CombinedOutput()
	if err != nil {
		t.Fatalf("report: %v: %s", err, out)
	}
	var rep struct {
		Ready bool `json:"ready_for_imdsv2"`
		Rows  []struct {
			Exe        string
			V1         int `json:"v1"`
			V1Rejected int `json:"v1_rejected"`
			V2         int `json:"v2"`
		}
	}
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("report: %v: %s", err, out)
	}
	found := false
	for _, row := range rep.Rows {
		if row.Exe == curl && row.V1Rejected == 1 && row.V1 == 1 && row.V2 == 1 {
			found = true
		}
	}
	if rep.Ready || !found {
		t.Errorf("report %s", out)
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestPrivilegedOtherNetnsNotRedirected(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	ns, err := bed.AddContainerNetns()
	if err != nil {
		t.Fatal(err)
	}
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: allow\nrules:\n  - name: no-nobody\n    user: nobody\n    action: deny\n")
	if err != nil {
		t.Fatal(err)
	}
	code, r := curlExit(t, bed, testbed.Placement{Netns: ns}, imdsURL)
	if code != 0 {
		t.Fatalf("container client: curl exit %d", code)
	}
	e := eventsOf(t, agent, r.PID)
	if len(e) != 1 || e[0].Redirected || e[0].Verdict != "allow" {
		t.Errorf("container client events %+v: want one direct connect", e)
	}
	code, r = curlExit(t, bed, testbed.Placement{Netns: ns, UID: testbed.NobodyUID, GID: testbed.NobodyUID}, imdsURL)
	if code != 7 {
		t.Errorf("denied container client: curl exit %d, want 7 (refused: ECONNREFUSED, EPERM before Linux 5.18)", code)
	}
	if e := eventsOf(t, agent, r.PID); e[0].Verdict != "deny" {
		t.Errorf("denied container client event %+v", e[0])
	}
}

// TestPrivilegedFailureModes kills the agent with SIGKILL while clients run: no client
// hangs, and once the heartbeat is stale the configured failure mode applies.
func TestPrivilegedFailureModes(t *testing.T) {
	for _, mode := range []string{"open", "closed"} {
		t.Run(mode, func(t *testing.T) {
			bed := testbed.Start(t, testbed.Options{})
			agent, err := bed.StartAgent("mode: enforce\ndefault_action: allow\nfailure_mode: " + mode + "\n")
			if err != nil {
				t.Fatal(err)
			}
			stop := make(chan struct{})
			codes := make(chan int, 1000)
			go func() {
				defer close(codes)
				for {
					select {
					case <-stop:
						return
					default:
					}
					start := time.Now()
					code, _ := curlExit(t, bed, testbed.Placement{}, "-m", "3", imdsURL)
					if time.Since(start) > 2500*time.Millisecond {
						code = 28
					}
					codes <- code
				}
			}()
			// Let some succeed through the broker, then crash the agent mid-load.
			for i := 0; i < 5; i++ {
				if c := <-codes; c != 0 {
					t.Fatalf("before the kill: curl exit %d", c)
				}
			}
			agent.Kill()
			killed := time.Now()
			// After the heartbeat timeout (1s), the failure mode must hold.
			var after []int
			for c := range codes {
				if c == 28 {
					t.Fatal("a client hung on the dead broker")
				}
				if time.Since(killed) > 1500*time.Millisecond {
					after = append(after, c)
					if len(after) == 5 {
						close(stop)
					}
				}
			}
			want := 0
			if mode == "closed" {
				want = 7
			}
			for _, c := range after {
				if c != want {
					t.Errorf("failure_mode %s: curl exit %d, want %d", mode, c, want)
				}
			}
		})
	}
}

// TestPrivilegedRestartNoGap restarts the agent while a denied client keeps trying: the
// pinned programs keep refusing it throughout, and the new agent adopts them.
func TestPrivilegedRestartNoGap(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	policy := "mode: enforce\ndefault_action: allow\nrules:\n  - name: no-nobody\n    user: nobody\n    action: deny\n"
	agent, err := bed.StartAgent(policy)
	if err != nil {
		t.Fatal(err)
	}
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}
	stop := make(chan struct{})
	results := make(chan int, 1000)
	go func() {
		defer close(results)
		for {
			select {
			case <-stop:
				return
			default:
			}
			code, _ := curlExit(t, bed, nobody, "-m", "3", imdsURL)
			results <- code
		}
	}()
	<-results
	if err := agent.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	agent2, err := bed.StartAgent(policy)
	if err != nil {
		t.Fatal(err)
	}
	// Allowed clients work through the new agent's broker.
	if code, r := curlExit(t, bed, testbed.Placement{}, imdsURL); code != 0 {
		t.Errorf("after restart: curl exit %d", code)
	} else if e := eventsOf(t, agent2, r.PID); !e[0].Redirected {
		t.Errorf("after restart: not through the broker: %+v", e[0])
	}
	close(stop)
	n := 0
	for c := range results {
		n++
		if c != 7 {
			t.Errorf("denied client got through during the restart: curl exit %d", c)
		}
	}
	if n < 2 {
		t.Errorf("only %d attempts during the restart", n)
	}
}

// TestPrivilegedPreexistingConnections: a connection opened before the agent started
// bypassed every hook; the agent finds it at start-up and names its process.
func TestPrivilegedPreexistingConnections(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	client, err := testbed.ClientBinary()
	if err != nil {
		t.Fatal(err)
	}
	cmd, err := bed.Command(context.Background(), testbed.Placement{}, client, "hold")
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	buf := make([]byte, 16)
	if n, err := out.Read(buf); err != nil || !strings.HasPrefix(string(buf[:n]), "connected") {
		t.Fatalf("hold client: %q %v", buf[:n], err)
	}
	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	e := eventsOf(t, agent, cmd.Process.Pid)
	if e[0].Event != "imds_preexisting" || e[0].Exe != client || e[0].Dst != "169.254.169.254:80" || e[0].Verdict != "unguarded" {
		t.Errorf("preexisting event %+v", e[0])
	}
}
