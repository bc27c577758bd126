package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/tally"
)

func cmdReport(args []string, stdout io.Writer) error {
	var since time.Duration
	var format string
	p, err := parseFlags("report", args, func(fs *flag.FlagSet) {
		fs.DurationVar(&since, "since", 24*time.Hour, "window to report on")
		fs.StringVar(&format, "format", "text", "text or json")
	})
	if err != nil {
		return err
	}
	if since <= 0 || (format != "text" && format != "json") {
		return fmt.Errorf("%w: --since must be positive and --format text or json", errUsage)
	}
	cfg, _, err := loadConfig(p)
	if err != nil {
		return err
	}
	l, err := tally.Open(filepath.Join(cfg.StateDir, "usage.json"))
	if err != nil {
		return err
	}
	r := l.Report(since, time.Now().UTC())
	if format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	fmt.Fprintf(stdout, "IMDS use from %s to %s\n\n", r.From.Format(time.RFC3339), r.To.Format(time.RFC3339))
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "EXE\tUNIT\tUSER\tV1\tV1 ENFORCE WOULD REFUSE\tV1 REFUSED\tV2\tTOKEN\tDENIED\tCREDENTIALS\tLAST SEEN")
	for _, row := range r.Rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n", row.Exe, dash(row.Unit), row.User, row.V1, row.V1WouldReject, row.V1Rejected,
			row.V2, row.Token, row.Denied, row.Credential, row.LastSeen.Format(time.RFC3339))
	}
	tw.Flush()
	fmt.Fprintln(stdout)
	switch {
	case len(r.Rows) == 0:
		fmt.Fprintln(stdout, "No IMDS use recorded in this window.")
	case r.ReadyForV2:
		fmt.Fprintf(stdout, "Ready for HttpTokens=required: no IMDSv1 request in the window. To switch:\n  %s\n", r.Command)
	default:
		fmt.Fprintln(stdout, "Not ready for HttpTokens=required: the processes with V1 or V1 REFUSED above still use IMDSv1.")
	}
	if !r.Covered {
		fmt.Fprintln(stdout, "Note: the agent's record starts after the beginning of this window.")
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
