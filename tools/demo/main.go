// Command demo is what `sudo make demo` runs: it brings up the test bed, starts the
// agent on it, runs the standard IMDS clients, and prints who touched IMDS according to
// the agent's own events; then a pod's and an ECS task's containers, their IMDSv1
// refused and their credential fetches attributed to the pod and the task. Everything it creates is removed before it exits.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
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
	bed, err := testbed.New(testbed.Options{ContainerView: true, CredentialEndpoints: true})
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
	fmt.Println("== starting imdsguard on the bed's cgroup, running clients")
	who, err := whoTouched(ctx, bed)
	if err != nil {
		return err
	}
	fmt.Printf("\n== who touched IMDS (from the agent's events, %s)\n\n", who.eventsPath)
	printTable(who.header, who.rows)
	fmt.Printf("\n%d event lines; the process outside the guarded cgroup (pid %d) %s.\n", who.events, who.outsidePID,
		map[bool]string{false: "was correctly not seen", true: "WAS SEEN: this is a bug"}[who.outsideSeen])
	fmt.Println("A sample event line:")
	fmt.Println("  " + who.sample)
	if who.outsideSeen {
		return fmt.Errorf("attribution leaked outside the cgroup")
	}
	policy := enforcePolicy()
	fmt.Printf("\n== restarting imdsguard in enforce mode with this allowlist:\n%s\n", indent(policy))
	header, rows, err := enforceTable(ctx, bed, policy)
	if err != nil {
		return err
	}
	fmt.Println("== what each client got, and what the agent recorded")
	fmt.Println()
	printTable(header, rows)
	fmt.Printf("\n== containers (runc, each in its own network namespace): a Kubernetes pod and an ECS task, with this policy:\n%s\n", indent(containersPolicy))
	header, rows, err = containersTable(ctx, bed)
	if err != nil {
		return err
	}
	fmt.Println("== what each container got, brokered inside its own namespace, and whom the agent attributed it to")
	fmt.Println()
	printTable(header, rows)
	return nil
}

func printTable(header []string, rows [][]string) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

// whoTable is the first table: who touched IMDS, and how.
type whoTable struct {
	header      []string
	rows        [][]string
	eventsPath  string
	events      int
	outsidePID  int
	outsideSeen bool
	sample      string
}

// whoTouched runs the standard clients under an agent and builds the table from the
// agent's events, read once the agent has stopped: every line it recorded is written
// by then, so no row misses its requests.
func whoTouched(ctx context.Context, bed *testbed.Bed) (whoTable, error) {
	var t whoTable
	agent, err := bed.StartAgent("")
	if err != nil {
		return t, err
	}
	defer agent.Stop()
	t.eventsPath = agent.EventsPath
	runs, err := bed.RunClients(ctx)
	if err != nil {
		return t, err
	}
	outside := bed.RunCommand(ctx, "outside-cgroup", "curl outside the guarded cgroup (must not appear)",
		testbed.Placement{OutsideCgroup: true}, "curl", "-sf", "-m", "5", "http://169.254.169.254/latest/meta-data/instance-id")
	runs = append(runs, outside)
	t.outsidePID = outside.PID
	var pids []int
	how := map[int]testbed.Run{}
	for _, r := range runs {
		if r.Err != nil {
			return t, r.Err
		}
		how[r.PID] = r
		if r.Name != "outside-cgroup" {
			pids = append(pids, r.PID)
		}
	}
	if _, err := agent.WaitEvents(pids...); err != nil {
		return t, err
	}
	if err := agent.Stop(); err != nil {
		return t, fmt.Errorf("agent did not stop cleanly: %w", err)
	}
	events, err := agent.Events()
	if err != nil {
		return t, err
	}
	t.events = len(events)
	sort.SliceStable(events, func(i, j int) bool { return events[i].Time.Before(events[j].Time) })
	t.header = []string{"CLIENT", "PID", "PPID", "USER", "EXE", "DST", "VERDICT", "REQUESTS", "HOW"}
	versions := map[int][]string{}
	for _, e := range events {
		if e.Event == "imds_request" {
			versions[e.PID] = append(versions[e.PID], e.IMDSVersion)
		}
		if e.PID == outside.PID {
			t.outsideSeen = true
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
		t.rows = append(t.rows, []string{name, strconv.Itoa(e.PID), strconv.Itoa(e.PPID), e.User, exe, e.Dst, e.Verdict, reqs, what})
	}
	if data, err := os.ReadFile(agent.EventsPath); err == nil {
		t.sample = strings.SplitN(string(data), "\n", 2)[0]
	}
	return t, nil
}

// enforcePolicy denies uid 65534 and requires IMDSv2 from curl.
func enforcePolicy() string {
	curl, _ := filepath.EvalSymlinks("/usr/bin/curl")
	return fmt.Sprintf(`mode: enforce
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
}

// enforceTable shows the guard: an agent with policy, the clients, and what each got
// according to the agent, read once the agent has stopped and written everything.
func enforceTable(ctx context.Context, bed *testbed.Bed, policy string) ([]string, [][]string, error) {
	agent, err := bed.StartAgent(policy)
	if err != nil {
		return nil, nil, err
	}
	defer agent.Stop()
	client, err := testbed.ClientBinary()
	if err != nil {
		return nil, nil, err
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
	if _, err := agent.WaitEvents(pids...); err != nil {
		return nil, nil, err
	}
	if err := agent.Stop(); err != nil {
		return nil, nil, fmt.Errorf("agent did not stop cleanly: %w", err)
	}
	events, err := agent.Events()
	if err != nil {
		return nil, nil, err
	}
	header := []string{"CLIENT", "PID", "USER", "CONNECT", "RULE", "REQUESTS (version status)"}
	var rows [][]string
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
		rows = append(rows, []string{r.Name, strconv.Itoa(r.PID), user, verdict, rule, strings.Join(reqs, ", ")})
	}
	return header, rows, nil
}

func indent(s string) string {
	return "   " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n   ")
}
