package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// holdNamespace starts a long-lived shell in the container namespace ns that connects
// to IMDS once (the connect event makes the agent serve the namespace) and waits until
// the agent lists it. It returns the namespace's cookie.
func holdNamespace(t *testing.T, bed *testbed.Bed, agent *testbed.AgentProc, ns string) uint64 {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd, err := bed.Command(ctx, testbed.Placement{Netns: ns}, "sh", "-c", "curl -s -m 5 "+imdsURL+" >/dev/null; exec sleep 600")
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return waitNamespaces(t, agent, 1).Namespaces[0].Cookie
}

// TestPrivilegedContainerBrokered: a process in a container's network namespace whose
// endpoint the agent published is redirected to the broker inside that namespace: the
// rule's IMDSv2 requirement is enforced there (IMDSv1 gets 401, a proxied token PUT
// 403), IMDSv2 works, and getpeername says IMDS. The namespace is served from the
// connect event of a first connect that the v2-required rule refused for want of a
// broker. (Before the kernel redirected containers, every one of these connects was
// refused: curl exit 7.)
func TestPrivilegedContainerBrokered(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	ns, err := bed.AddContainerNetns()
	if err != nil {
		t.Fatal(err)
	}
	curl, _ := filepath.EvalSymlinks("/usr/bin/curl")
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
	cookie := holdNamespace(t, bed, agent, ns)
	in := testbed.Placement{Netns: ns}

	code, v1 := curlExit(t, bed, in, imdsURL)
	if code != 22 {
		t.Errorf("IMDSv1 from the container: curl exit %d, want 22 (the broker's 401)\n%s", code, agent.Log())
	}
	code, tok := curlExit(t, bed, in, "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", "http://169.254.169.254/latest/api/token")
	if code != 0 {
		t.Fatalf("token PUT from the container: exit %d\n%s", code, agent.Log())
	}
	token := "X-aws-ec2-metadata-token: " + strings.TrimSpace(tok.Output)
	code, v2 := curlExit(t, bed, in, "-H", token, imdsURL)
	if code != 0 || !strings.HasPrefix(v2.Output, "i-") {
		t.Errorf("IMDSv2 from the container: exit %d output %q", code, v2.Output)
	}
	code, _ = curlExit(t, bed, in, "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
		"-H", "X-Forwarded-For: 203.0.113.7", "http://169.254.169.254/latest/api/token")
	if code != 22 {
		t.Errorf("token PUT with X-Forwarded-For from the container: exit %d, want 22 (HTTP 403)", code)
	}
	// getpeername: the client sees the address it asked for, not the broker's.
	code, peer := curlExit(t, bed, in, "-o", "/dev/null", "-w", "%{remote_ip} %{remote_port}", "-H", token, imdsURL)
	if code != 0 || peer.Output != "169.254.169.254 80" {
		t.Errorf("peer seen by the client: exit %d %q, want 169.254.169.254 80", code, peer.Output)
	}

	var connect, request testbed.Event
	for _, e := range eventsOf(t, agent, v1.PID) {
		switch e.Event {
		case "imds_connect":
			connect = e
		case "imds_request":
			request = e
		}
	}
	if !connect.Redirected || connect.Netns != cookie || connect.NoBroker {
		t.Errorf("IMDSv1 connect event %+v: want redirected, from namespace %d", connect, cookie)
	}
	if request.Status != 401 || request.IMDSVersion != "v1" || request.Refused != "imdsv2_required" || request.Rule != "curl-v2" {
		t.Errorf("IMDSv1 request event %+v: want 401 imdsv2_required by curl-v2", request)
	}
}

// TestPrivilegedContainerFallback: a namespace the agent does not serve
// (containers.max_namespaces 0) gets containers.fallback: deny refuses the connect
// (ECONNREFUSED, curl exit 7), direct lets it through unbrokered, and a connection whose
// rule requires IMDSv2 is refused even with direct. (Before, every container
// connection went direct, v2-required ones refused.)
func TestPrivilegedContainerFallback(t *testing.T) {
	curl, _ := filepath.EvalSymlinks("/usr/bin/curl")
	v2Rule := fmt.Sprintf("rules:\n  - name: curl-v2\n    exe: %s\n    action: allow\n    imdsv2: required\n", curl)
	for _, tc := range []struct {
		name     string
		fallback string
		rules    string
		want     int    // curl's exit
		verdict  string // of the connect event
	}{
		{"deny", "deny", "", 7, "deny"},
		{"direct", "direct", "", 0, "allow"},
		{"direct, v2 required", "direct", v2Rule, 7, "deny"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bed := testbed.Start(t, testbed.Options{})
			ns, err := bed.AddContainerNetns()
			if err != nil {
				t.Fatal(err)
			}
			agent, err := bed.StartAgent(fmt.Sprintf("mode: enforce\ndefault_action: allow\ncontainers:\n  fallback: %s\n  max_namespaces: 0\n%s", tc.fallback, tc.rules))
			if err != nil {
				t.Fatal(err)
			}
			code, r := curlExit(t, bed, testbed.Placement{Netns: ns}, imdsURL)
			if code != tc.want {
				t.Errorf("curl from the container: exit %d, want %d", code, tc.want)
			}
			var connect testbed.Event
			for _, e := range eventsOf(t, agent, r.PID) {
				if e.Event == "imds_connect" {
					connect = e
				}
			}
			if connect.Verdict != tc.verdict || connect.Redirected || !connect.NoBroker {
				t.Errorf("connect event %+v: want verdict %s, not redirected, no_broker", connect, tc.verdict)
			}
		})
	}
}
