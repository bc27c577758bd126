// Command demo is what `sudo make demo` runs: it brings up the test bed, starts the
// agent on it, runs the standard IMDS clients, and prints who touched IMDS according to
// the agent's own events. Everything it creates is removed before it exits.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	fmt.Println("== bringing up the test bed: network namespace with IMDS (amazon-ec2-metadata-mock) and a child cgroup")
	bed, err := testbed.New(testbed.Options{})
	if err != nil {
		return err
	}
	defer func() {
		if err := bed.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "demo: cleanup:", err)
		}
		fmt.Println("== test bed removed")
	}()
	fmt.Printf("   netns %s, cgroup %s\n", bed.Name, bed.Cgroup)
	fmt.Println("== starting imdsguard on the bed's cgroup")
	agent, err := bed.StartAgent("")
	if err != nil {
		return err
	}
	fmt.Println("== running clients")
	runs, err := bed.RunClients(ctx)
	if err != nil {
		return err
	}
	outside := bed.RunCommand(ctx, "outside-cgroup", "curl outside the guarded cgroup (must not appear)",
		testbed.Placement{OutsideCgroup: true}, "curl", "-sf", "-m", "5", "http://169.254.169.254/latest/meta-data/instance-id")
	runs = append(runs, outside)
	var pids []int
	how := map[int]testbed.Run{}
	for _, r := range runs {
		if r.Err != nil {
			return r.Err
		}
		how[r.PID] = r
		if r.Name != "outside-cgroup" {
			pids = append(pids, r.PID)
		}
	}
	if _, err := agent.WaitEvents(pids...); err != nil {
		return err
	}
	if err := agent.Stop(); err != nil {
		return fmt.Errorf("agent did not stop cleanly: %w", err)
	}
	events, err := agent.Events()
	if err != nil {
		return err
	}
	sort.SliceStable(events, func(i, j int) bool { return events[i].Time.Before(events[j].Time) })

	fmt.Printf("\n== who touched IMDS (from the agent's events, %s)\n\n", agent.EventsPath)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tPID\tPPID\tUSER\tEXE\tDST\tVERDICT\tREQUESTS\tHOW")
	versions := map[int][]string{}
	for _, e := range events {
		if e.Event == "imds_request" {
			versions[e.PID] = append(versions[e.PID], e.IMDSVersion)
		}
	}
	for _, e := range events {
		if e.Event != "imds_connect" {
			continue
		}
		r := how[e.PID]
		name, what := r.Name, r.How
		if name == "" {
			name, what = "?", strings.Join(e.Cmdline, " ")
		}
		exe := e.Exe
		if len(e.Missing) > 0 {
			exe += " (gone: no " + strings.Join(e.Missing, ",") + ")"
		}
		reqs := strings.Join(versions[e.PID], ",")
		if reqs == "" {
			reqs = "-"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", name, e.PID, e.PPID, e.User, exe, e.Dst, e.Verdict, reqs, what)
	}
	tw.Flush()
	seenOutside := false
	for _, e := range events {
		if e.PID == outside.PID {
			seenOutside = true
		}
	}
	fmt.Printf("\n%d event lines; the process outside the guarded cgroup (pid %d) %s.\n", len(events), outside.PID,
		map[bool]string{false: "was correctly not seen", true: "WAS SEEN: this is a bug"}[seenOutside])
	fmt.Println("A sample event line:")
	if data, err := os.ReadFile(agent.EventsPath); err == nil {
		fmt.Println("  " + strings.SplitN(string(data), "\n", 2)[0])
	}
	if seenOutside {
		return fmt.Errorf("attribution leaked outside the cgroup")
	}
	return enforce(ctx, bed)
}

// enforce shows the guard: a restarted agent with an allowlist that denies uid 65534
// and requires IMDSv2 from curl.
func enforce(ctx context.Context, bed *testbed.Bed) error {
	curl, _ := filepath.EvalSymlinks("/usr/bin/curl")
	policy := fmt.Sprintf(`mode: enforce
default_action: allow
rules:
  - name: no-nobody
    user: nobody
    action: deny
  - name: curl-needs-v2
    exe: %s
    action: allow
    imdsv2: required
`, curl)
	fmt.Printf("\n== restarting imdsguard in enforce mode with this allowlist:\n%s\n", indent(policy))
	agent, err := bed.StartAgent(policy)
	if err != nil {
		return err
	}
	defer agent.Stop()
	client, err := testbed.ClientBinary()
	if err != nil {
		return err
	}
	base := "http://169.254.169.254"
	tok := bed.RunCommand(ctx, "curl-token", "", testbed.Placement{}, "curl", "-s", "-m", "5", "-X", "PUT",
		"-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", base+"/latest/api/token")
	runs := []testbed.Run{
		bed.RunCommand(ctx, "curl-v1", "IMDSv1 GET", testbed.Placement{}, "curl", "-s", "-m", "5", "-o", "/dev/null",
			"-w", "%{http_code}", base+"/latest/meta-data/instance-id"),
		bed.RunCommand(ctx, "curl-v2", "IMDSv2 GET", testbed.Placement{}, "curl", "-s", "-m", "5", "-o", "/dev/null",
			"-w", "%{http_code}", "-H", "X-aws-ec2-metadata-token: "+strings.TrimSpace(tok.Output), base+"/latest/meta-data/instance-id"),
		bed.RunCommand(ctx, "curl-nobody", "IMDSv1 GET as uid 65534", testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID},
			"curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", base+"/latest/meta-data/instance-id"),
		bed.RunCommand(ctx, "go-sdk", "aws-sdk-go-v2 (IMDSv2)", testbed.Placement{}, client, "sdk"),
	}
	var pids []int
	for _, r := range runs {
		pids = append(pids, r.PID)
	}
	events, err := agent.WaitEvents(pids...)
	if err != nil {
		return err
	}
	fmt.Println("== what each client got, and what the agent recorded")
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tPID\tUSER\tCONNECT\tRULE\tREQUESTS (version status)")
	for _, r := range runs {
		verdict, rule, user := "", "", ""
		var reqs []string
		for _, e := range events {
			if e.PID != r.PID {
				continue
			}
			switch e.Event {
			case "imds_connect":
				verdict, rule, user = e.Verdict, e.Rule, e.User
			case "imds_request":
				reqs = append(reqs, fmt.Sprintf("%s %d", e.IMDSVersion, e.Status))
			}
		}
		if verdict == "deny" {
			reqs = append(reqs, "EPERM at connect(): no packet left")
		}
		if rule == "" {
			rule = "(default)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", r.Name, r.PID, user, verdict, rule, strings.Join(reqs, ", "))
	}
	tw.Flush()
	return nil
}

func indent(s string) string {
	return "   " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n   ")
}
