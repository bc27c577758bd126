// Command demo is what `sudo make demo` runs: it brings up the test bed, starts the
// agent on it, runs the standard IMDS clients, and prints who touched IMDS according to
// the agent's own events. Everything it creates is removed before it exits.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/imdsguard/imdsguard/internal/testbed"
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
	fmt.Fprintln(tw, "CLIENT\tPID\tPPID\tUSER\tEXE\tDST\tVERDICT\tHOW")
	for _, e := range events {
		r := how[e.PID]
		name, what := r.Name, r.How
		if name == "" {
			name, what = "?", strings.Join(e.Cmdline, " ")
		}
		exe := e.Exe
		if len(e.Missing) > 0 {
			exe += " (gone: no " + strings.Join(e.Missing, ",") + ")"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", name, e.PID, e.PPID, e.User, exe, e.Dst, e.Verdict, what)
	}
	tw.Flush()
	seenOutside := false
	for _, e := range events {
		if e.PID == outside.PID {
			seenOutside = true
		}
	}
	fmt.Printf("\n%d events; the process outside the guarded cgroup (pid %d) %s.\n", len(events), outside.PID,
		map[bool]string{false: "was correctly not seen", true: "WAS SEEN: this is a bug"}[seenOutside])
	fmt.Println("A sample event line:")
	if data, err := os.ReadFile(agent.EventsPath); err == nil {
		fmt.Println("  " + strings.SplitN(string(data), "\n", 2)[0])
	}
	if seenOutside {
		return fmt.Errorf("attribution leaked outside the cgroup")
	}
	return nil
}
