package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// jsProvider is the npm package of the AWS SDK for JavaScript v3 the test runs, pinned so
// that a cached install is reused only while it is the same version.
const jsProvider = "@aws-sdk/credential-providers@3.1175.0"

// realClient is an IMDS client as users run it: Debian's AWS CLI, boto3 and cloud-init,
// the JS SDK v3 from npm, the Go SDKs v1 and v2.
type realClient struct {
	name string
	argv []string
	// resetGivesUp: with IMDS down the broker resets the client's connection where IMDS's
	// address refuses it, and this client does not retry a reset as it retries a refusal:
	// it fails the same way, sooner and after fewer attempts (docs/broker.md).
	resetGivesUp bool
}

// clientRun is what one run of a client did, measured the same way with or without the
// agent: strace counts its connect() calls to IMDS, the clock its duration.
type clientRun struct {
	class    string // "credentials", "connection error", "http error" or the client's own error text
	attempts int    // connect() calls to IMDS
	dur      time.Duration
	pid      int // the client's pid (strace's child), as the agent's events name it
	out      string
}

// TestPrivilegedRealClients runs real IMDS clients through the broker, in the bed's cgroup
// and network namespace only, and checks each behaves as it does against the emulator
// without the agent: with a rule that allows IMDSv1, with one that requires IMDSv2 (they
// all speak it), denied, and with IMDS down. Same outcome, no more connection attempts
// and no longer waits than without the agent; the baseline is measured in the same run.
func TestPrivilegedRealClients(t *testing.T) {
	testbed.RequirePrivileged(t)
	clients := realClients(t)
	bed := testbed.Start(t, testbed.Options{})
	rel := strings.TrimPrefix(bed.Cgroup, bed.CgroupRoot)
	for _, sub := range []string{"optional", "required", "denied"} {
		if _, err := bed.SubCgroup(sub); err != nil {
			t.Fatal(err)
		}
	}
	agent, err := bed.StartAgent(fmt.Sprintf(`mode: enforce
default_action: allow
rules:
  - name: denied
    cgroup: %[1]s/denied
    action: deny
  - name: required
    cgroup: %[1]s/required
    action: allow
    imdsv2: required
  - name: optional
    cgroup: %[1]s/optional
    action: allow
`, rel))
	if err != nil {
		t.Fatal(err)
	}
	env := clientEnv(t, bed)
	direct := testbed.Placement{OutsideCgroup: true, Env: env}

	t.Run("up", func(t *testing.T) {
		for _, c := range clients {
			t.Run(c.name, func(t *testing.T) {
				base := runClient(t, bed, c, direct)
				if base.class != "credentials" {
					t.Fatalf("without the agent: %s, want credentials: %s", base.class, base.out)
				}
				if !strings.Contains(base.out, bed.Creds.AccessKeyID) && c.name != "cloud-init" {
					t.Fatalf("without the agent: no access key %s in %s", bed.Creds.AccessKeyID, base.out)
				}
				for _, rule := range []string{"optional", "required"} {
					got := runClient(t, bed, c, testbed.Placement{SubCgroup: rule, Env: env})
					compareRuns(t, rule, base, got)
					checkEvents(t, agent, got, rule, "")
				}
			})
		}
	})
	if t.Failed() {
		return
	}
	bed.StopEmulator()
	t.Run("down", func(t *testing.T) {
		for _, c := range clients {
			t.Run(c.name, func(t *testing.T) {
				base := runClient(t, bed, c, direct)
				if base.class == "credentials" {
					t.Fatalf("without the agent, IMDS down: got credentials: %s", base.out)
				}
				denied := runClient(t, bed, c, testbed.Placement{SubCgroup: "denied", Env: env})
				compareRuns(t, "denied", base, denied)
				checkEvents(t, agent, denied, "denied", "deny")
				down := runClient(t, bed, c, testbed.Placement{SubCgroup: "optional", Env: env})
				if c.resetGivesUp && down.attempts < base.attempts {
					t.Logf("imds-down: %d attempts where %d without the agent: the client does not retry a reset connection", down.attempts, base.attempts)
					down.attempts = base.attempts
				}
				compareRuns(t, "imds-down", base, down)
			})
		}
	})
}

// realClients finds or installs every client; in a privileged run a missing one fails
// the test (make test installs the Debian ones, see TEST_DEPS).
func realClients(t *testing.T) []realClient {
	t.Helper()
	for _, f := range []string{"/usr/bin/python3", "/usr/bin/aws", "/usr/bin/node", "/usr/bin/strace",
		"/usr/lib/python3/dist-packages/boto3", "/usr/lib/python3/dist-packages/cloudinit"} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("real clients: %v (sudo make test installs it)", err)
		}
	}
	goClient, err := testbed.ClientBinary()
	if err != nil {
		t.Fatal(err)
	}
	data, err := filepath.Abs("testdata/clients")
	if err != nil {
		t.Fatal(err)
	}
	// Debian's interpreters, by path: python3 on PATH may be another install.
	return []realClient{
		{name: "aws-cli", argv: []string{"/usr/bin/aws", "configure", "export-credentials", "--format", "process"}},
		{name: "boto3", argv: []string{"/usr/bin/python3", filepath.Join(data, "boto3_creds.py")}},
		// max_wait 3 s: long enough for several retries when IMDS is down.
		{name: "cloud-init", argv: []string{"/usr/bin/python3", filepath.Join(data, "cloudinit_crawl.py"), "3"}},
		{name: "js-sdk-v3", argv: []string{"/usr/bin/node", filepath.Join(data, "js_creds.cjs")}},
		{name: "go-sdk-v2", argv: []string{goClient, "creds-v2"}},
		{name: "go-sdk-v1", argv: []string{goClient, "creds-v1"}, resetGivesUp: true},
	}
}

// jsModules installs the JS SDK's credential provider once into .cache/ under the module
// root and returns its node_modules for NODE_PATH; later runs reuse it.
func jsModules(t *testing.T) string {
	t.Helper()
	bin, err := testbed.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	name, version, _ := strings.Cut(jsProvider[1:], "@")
	dir := filepath.Join(filepath.Dir(bin), ".cache", "js-clients")
	pkg := filepath.Join(dir, "node_modules", "@"+name, "package.json")
	var meta struct{ Version string }
	if data, err := os.ReadFile(pkg); err == nil && json.Unmarshal(data, &meta) == nil && meta.Version == version {
		return filepath.Join(dir, "node_modules")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/usr/bin/npm", "install", "--prefix", dir, "--no-audit", "--no-fund", "--loglevel=error", jsProvider)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("npm install %s: %v: %s", jsProvider, err, out)
	}
	return filepath.Join(dir, "node_modules")
}

// clientEnv is the clients' whole environment: nothing from the test's (no credentials,
// profiles or proxies), a home of their own in the bed, Debian's binaries first.
func clientEnv(t *testing.T, bed *testbed.Bed) []string {
	t.Helper()
	home := filepath.Join(bed.Dir, "client-home")
	if err := os.MkdirAll(home, 0o755); err != nil {
		t.Fatal(err)
	}
	none := filepath.Join(bed.Dir, "no-such-file")
	return []string{
		"PATH=/usr/bin:/bin", "HOME=" + home, "LANG=C.UTF-8", "AWS_REGION=us-east-1",
		"AWS_CONFIG_FILE=" + none, "AWS_SHARED_CREDENTIALS_FILE=" + none, "AWS_PAGER=",
		"NODE_PATH=" + jsModules(t),
	}
}

var (
	straceConnect = regexp.MustCompile(`^\d+\s+connect\(.*(169\.254\.169\.254|fd00:ec2::254)`)
	// The first execve is the client's own: its pid is the process id the agent records
	// (a connect() line names the thread that made it).
	straceExec = regexp.MustCompile(`^(\d+)\s+execve\(`)
	httpError  = regexp.MustCompile(`(?i)status ?code|\b(4\d\d|5\d\d)\b`)
	connError  = regexp.MustCompile(`(?i)connection refused|connection reset|operation not permitted|ECONNREFUSED|ECONNRESET|EPERM|unable to connect|\bEOF\b`)
)

// runClient runs c under strace in the given placement and classifies what it printed.
func runClient(t *testing.T, bed *testbed.Bed, c realClient, p testbed.Placement) clientRun {
	t.Helper()
	trace, err := os.CreateTemp(bed.Dir, "strace-")
	if err != nil {
		t.Fatal(err)
	}
	trace.Close()
	argv := append([]string{"/usr/bin/strace", "-f", "-qq", "-e", "trace=connect,execve", "-o", trace.Name(), "--"}, c.argv...)
	began := time.Now()
	r := bed.RunCommand(t.Context(), c.name, "", p, argv...)
	run := clientRun{dur: time.Since(began), out: strings.TrimSpace(r.Output)}
	if r.Err != nil {
		run.out = strings.TrimSpace(run.out + "\n" + r.Err.Error())
	}
	f, err := os.Open(trace.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if m := straceExec.FindStringSubmatch(sc.Text()); m != nil && run.pid == 0 {
			run.pid, _ = strconv.Atoi(m[1])
		}
		if straceConnect.MatchString(sc.Text()) {
			run.attempts++
		}
	}
	switch {
	case r.Err == nil && (strings.Contains(run.out, `"AccessKeyId"`) || strings.Contains(run.out, `"access_key_id"`)):
		run.class = "credentials"
	case httpError.MatchString(run.out):
		run.class = "http error"
	case connError.MatchString(run.out):
		run.class = "connection error"
	default:
		// The client's own words (boto3 and the CLI say only that no credentials were
		// found): the same words either way.
		run.class = clientError(r)
	}
	return run
}

// clientError is the error a client printed: the "error" of its JSON line (the drivers
// in testdata/clients), else the last line of what it wrote to stderr.
func clientError(r testbed.Run) string {
	for _, line := range strings.Split(r.Output, "\n") {
		var out struct{ Error string }
		if json.Unmarshal([]byte(line), &out) == nil && out.Error != "" {
			return out.Error
		}
	}
	if r.Err == nil {
		return "no error and no credentials"
	}
	lines := strings.Split(strings.TrimSpace(r.Err.Error()), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// compareRuns checks got (through the agent) against base (without it): the same class of
// outcome, no more connection attempts (nor many fewer: a client that gives up at once
// where it would retry is not transparent either) and no longer wait. Durations are
// compared as a ratio; the small allowance absorbs a shared machine's scheduling.
func compareRuns(t *testing.T, what string, base, got clientRun) {
	t.Helper()
	t.Logf("%s: without the agent %s, %d attempts, %s; through it %s, %d attempts, %s (%.2fx)",
		what, base.class, base.attempts, base.dur.Round(time.Millisecond),
		got.class, got.attempts, got.dur.Round(time.Millisecond), float64(got.dur)/float64(base.dur))
	if got.class != base.class {
		t.Errorf("%s: %q, want %q as without the agent\nwith the agent: %s\nwithout: %s", what, got.class, base.class, got.out, base.out)
	}
	if got.attempts > base.attempts || got.attempts < base.attempts/2 {
		t.Errorf("%s: %d connection attempts, %d without the agent", what, got.attempts, base.attempts)
	}
	// Only an added wait (a retry's backoff, a timeout: seconds) is what this catches; a
	// loaded 2-core machine slows Python's start-up by a second on its own.
	if got.dur > 3*base.dur+time.Second {
		t.Errorf("%s: took %s, %s without the agent", what, got.dur, base.dur)
	}
}

// checkEvents checks the agent attributed the run to the rule: its connections carry the
// rule's name and verdict, and none of its requests was refused.
func checkEvents(t *testing.T, agent *testbed.AgentProc, run clientRun, rule, verdict string) {
	t.Helper()
	if run.pid == 0 || run.attempts == 0 {
		t.Errorf("%s: the client made no connection to IMDS", rule)
		return
	}
	// Connect events come through the ring buffer and request events from the broker:
	// wait for both kinds (the deadline only bounds a failure).
	var connects, requests int
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		events, err := agent.Events()
		if err != nil {
			t.Fatal(err)
		}
		connects, requests = 0, 0
		for _, e := range events {
			if e.PID != run.pid {
				continue
			}
			switch e.Event {
			case "imds_connect":
				connects++
				if e.Rule != rule || (verdict != "" && e.Verdict != verdict) {
					t.Errorf("%s: connect event rule %q verdict %q, want %q %q", rule, e.Rule, e.Verdict, rule, verdict)
				}
			case "imds_request":
				requests++
				if e.Refused != "" {
					t.Errorf("%s: request %s %s refused %q", rule, e.Method, e.Path, e.Refused)
				}
			}
		}
		if t.Failed() || (connects > 0 && (verdict != "" || requests > 0)) || time.Now().After(deadline) {
			break
		}
	}
	if connects == 0 || (verdict == "" && requests == 0) {
		t.Errorf("%s: %d connect and %d request events for pid %d", rule, connects, requests, run.pid)
	}
}
