package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// The attacks of issue 11's review, each as the local attacker ran it, in the bed.

const (
	credsURL          = "http://169.254.169.254/latest/meta-data/iam/security-credentials/" + testbed.Role
	defaultBrokerPort = config.DefaultBrokerPort
)

func hostileBin(t *testing.T) string {
	t.Helper()
	bin, err := testbed.HostileBinary()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

func exitCode(t *testing.T, r testbed.Run) int {
	t.Helper()
	var ee *exec.ExitError
	if errors.As(r.Err, &ee) {
		return ee.ExitCode()
	}
	if r.Err != nil {
		t.Fatalf("%s: %v", r.Name, r.Err)
	}
	return 0
}

// background is a process of the bed's that printed its first line and goes on.
type background struct {
	cmd  *exec.Cmd
	rest chan string // what it printed after the first line, once it exited
	err  error
}

// startBackground starts argv in the bed and returns once it printed want as its first
// line; the test fails otherwise.
func startBackground(t *testing.T, bed *testbed.Bed, p testbed.Placement, want string, argv ...string) *background {
	t.Helper()
	cmd, err := bed.Command(context.Background(), p, argv...)
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	b := &background{cmd: cmd, rest: make(chan string, 1)}
	out := bufio.NewReader(stdout)
	line, lineErr := out.ReadString('\n')
	go func() {
		rest, _ := io.ReadAll(out)
		b.err = cmd.Wait()
		b.rest <- string(rest)
	}()
	t.Cleanup(func() { cmd.Process.Kill(); b.wait() })
	if strings.TrimSpace(line) != want {
		cmd.Process.Kill()
		b.wait()
		t.Fatalf("%v: first line %q (%v), want %q; stderr: %s", argv, line, lineErr, want, stderr.String())
	}
	return b
}

// wait returns what the process printed after its first line, once it exited.
func (b *background) wait() string {
	s, ok := <-b.rest
	if ok {
		close(b.rest)
	}
	return s
}

func TestPrivilegedMarkIsNoKey(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	hostile := hostileBin(t)
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: deny\n")
	if err != nil {
		t.Fatal(err)
	}
	// Root (CAP_NET_RAW) marks its socket with the broker's mark: judged like anyone.
	for _, addr := range []string{"169.254.169.254:80", "[fd00:ec2::254]:80"} {
		r := bed.RunCommand(context.Background(), "mark "+addr, "", testbed.Placement{}, hostile, "mark", "0x1d5", addr)
		if code := exitCode(t, r); code != 7 || strings.Contains(r.Output, "AccessKeyId") {
			t.Errorf("%s: marked socket: exit %d, output %q: want 7 (refused: ECONNREFUSED, EPERM before Linux 5.18)", addr, code, r.Output)
		}
		e := eventsOf(t, agent, r.PID)
		if e[0].Verdict != "deny" || e[0].Agent {
			t.Errorf("%s: event %+v, want a deny", addr, e[0])
		}
	}
}

// TestPrivilegedBrokerPortCannotBeTaken: a process that binds the broker's port first
// never receives a redirected connection, and the agent guards anyway.
func TestPrivilegedBrokerPortCannotBeTaken(t *testing.T) {
	hostile := hostileBin(t)
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID, OutsideCgroup: true}
	curl6 := []string{"curl", "-sf", "-m", "5", "-g", "http://[fd00:ec2::254]/latest/meta-data/iam/security-credentials/" + testbed.Role}
	curl4 := []string{"curl", "-sf", "-m", "5", credsURL}
	fetch := func(t *testing.T, bed *testbed.Bed, agent *testbed.AgentProc, argv []string, redirected bool) {
		t.Helper()
		r := bed.RunCommand(context.Background(), "curl", "", testbed.Placement{}, argv...)
		if code := exitCode(t, r); code != 0 || strings.Contains(r.Output, "FORGED") || !strings.Contains(r.Output, bed.Creds.AccessKeyID) {
			t.Errorf("%v: exit %d, output %q: want IMDS's own credentials", argv, code, r.Output)
		}
		if e := eventsOf(t, agent, r.PID); e[0].Redirected != redirected {
			t.Errorf("%v: event %+v, want redirected %v", argv, e[0], redirected)
		}
	}

	t.Run("default port is privileged", func(t *testing.T) {
		bed := testbed.Start(t, testbed.Options{})
		// Refused at once when the port is privileged; a squatter that got it is killed.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r := bed.RunCommand(ctx, "squat", "", nobody, hostile, "squat", fmt.Sprintf("[::1]:%d", defaultBrokerPort))
		if code := exitCode(t, r); code != 3 {
			t.Fatalf("uid 65534 bound the broker's default port %d first (exit %d): it must be privileged", defaultBrokerPort, code)
		}
		agent, err := bed.StartAgent("mode: enforce\ndefault_action: allow\n")
		if err != nil {
			t.Fatal(err)
		}
		fetch(t, bed, agent, curl6, true)
	})
	t.Run("ipv6 taken by nobody", func(t *testing.T) {
		bed := testbed.Start(t, testbed.Options{})
		// An operator chose an unprivileged port: uid 65534 takes [::1] first.
		startBackground(t, bed, nobody, "listening", hostile, "squat", "[::1]:4258")
		agent, err := bed.StartAgent("mode: enforce\ndefault_action: allow\nbroker:\n  port: 4258\n")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(agent.Log(), `"event":"broker_port_taken"`) {
			t.Errorf("agent log does not report the taken port:\n%s", agent.Log())
		}
		fetch(t, bed, agent, curl6, false) // not to the squatter: straight to IMDS, judged
		fetch(t, bed, agent, curl4, true)
	})
	t.Run("ipv4 taken", func(t *testing.T) {
		bed := testbed.Start(t, testbed.Options{})
		startBackground(t, bed, testbed.Placement{OutsideCgroup: true}, "listening", hostile, "squat", fmt.Sprintf("127.0.0.1:%d", defaultBrokerPort))
		agent, err := bed.StartAgent("mode: enforce\ndefault_action: allow\nrules:\n  - name: no-nobody\n    user: nobody\n    action: deny\n")
		if err != nil {
			t.Fatalf("the agent must guard with its IPv4 port taken: %v", err)
		}
		fetch(t, bed, agent, curl4, false)
		fetch(t, bed, agent, curl6, true)
		// Still guarding: the denied user is refused.
		r := bed.RunCommand(context.Background(), "nobody", "", testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}, curl4...)
		if code := exitCode(t, r); code != 7 {
			t.Errorf("denied user: curl exit %d, want 7", code)
		}
	})
}

// TestPrivilegedBrokerMatchesWholeConnection: a denied process connects straight to the
// broker from 127.0.0.2:P while an allowed process connects to IMDS from 127.0.0.1:P;
// the broker is kept from accepting (the agent stopped) until both are queued, the
// attacker's first. The attacker gets nothing; the allowed process its credentials.
func TestPrivilegedBrokerMatchesWholeConnection(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	hostile := hostileBin(t)
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: deny\nrules:\n  - name: root\n    user: root\n    action: allow\n")
	if err != nil {
		t.Fatal(err)
	}
	port := 40000 + time.Now().Nanosecond()%20000
	if err := agent.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			agent.Cmd.Process.Signal(syscall.SIGCONT)
		}
	}
	defer resume()
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}
	attacker := startBackground(t, bed, nobody, "connected", hostile, "from", fmt.Sprintf("127.0.0.2:%d", port),
		fmt.Sprintf("127.0.0.1:%d", defaultBrokerPort))
	allowed := startBackground(t, bed, testbed.Placement{}, "connected", hostile, "from", fmt.Sprintf("127.0.0.1:%d", port),
		"169.254.169.254:80")
	resume()
	stolen, got := attacker.wait(), allowed.wait()
	if strings.Contains(stolen, "AccessKeyId") {
		t.Errorf("the attacker got the allowed process's credentials:\n%s", stolen)
	}
	if !strings.Contains(got, bed.Creds.AccessKeyID) {
		t.Errorf("the allowed process got no credentials:\n%s", got)
	}
	if e := eventsOf(t, agent, allowed.cmd.Process.Pid); !e[0].Redirected {
		t.Errorf("allowed process not redirected, the test proves nothing: %+v", e[0])
	}
}

// TestPrivilegedV2RequiredNotBrokeredIsDenied: a container (another network namespace)
// cannot be brokered, so a rule that requires IMDSv2 refuses its connection instead of
// letting IMDSv1 through unseen.
func TestPrivilegedV2RequiredNotBrokeredIsDenied(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	ns, err := bed.AddContainerNetns()
	if err != nil {
		t.Fatal(err)
	}
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: allow\nrules:\n  - name: root-v2\n    user: root\n    action: allow\n    imdsv2: required\n")
	if err != nil {
		t.Fatal(err)
	}
	code, r := curlExit(t, bed, testbed.Placement{Netns: ns}, credsURL)
	if code != 7 {
		t.Errorf("container IMDSv1 under a v2-required rule: curl exit %d, want 7 (refused: ECONNREFUSED, EPERM before Linux 5.18)", code)
	}
	if e := eventsOf(t, agent, r.PID); e[0].Verdict != "deny" || e[0].Rule != "root-v2" || !e[0].NoBroker {
		t.Errorf("event %+v, want deny by root-v2 with no_broker", e[0])
	}
	// The same rule on the host is brokered (and so kept): allowed.
	if code, r := curlExit(t, bed, testbed.Placement{}, "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
		"http://169.254.169.254/latest/api/token"); code != 0 {
		t.Errorf("host token request: curl exit %d", code)
	} else if e := eventsOf(t, agent, r.PID); !e[0].Redirected {
		t.Errorf("host event %+v, want redirected", e[0])
	}
}
