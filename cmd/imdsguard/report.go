package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/status"
	"github.com/imdsguard/imdsguard/internal/agent/tally"
	"github.com/imdsguard/imdsguard/internal/cli"
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
		return fmt.Errorf("%w: --since must be positive and --format text or json", cli.ErrUsage)
	}
	cfg, _, err := loadConfig(p)
	if err != nil {
		return err
	}
	l, source, err := usageLedger(cfg)
	if err != nil {
		return err
	}
	r := l.Report(since, time.Now().UTC())
	r.Source = source
	if format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	fmt.Fprintf(stdout, "IMDS use from %s to %s (%s)\n\n", r.From.Format(time.RFC3339), r.To.Format(time.RFC3339), sourceNote[source])
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "EXE\tUNIT\tUSER\tV1\tV1 ENFORCE WOULD REFUSE\tV1 REFUSED\tV2\tTOKEN\tDENIED\tCREDENTIALS\tLAST SEEN")
	for _, row := range r.Rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n", row.Exe, dash(row.Unit), row.User, row.V1, row.V1WouldReject, row.V1Rejected,
			row.V2, row.Token, row.Denied, row.Credential, row.LastSeen.Format(time.RFC3339))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
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

var sourceNote = map[string]string{
	"agent":  "live, from the running agent",
	"ledger": "from the ledger the agent saves every stats interval; no agent answered on the status socket",
}

// usageLedger asks the running agent for its live tally over the status socket, so
// that what a client did a moment ago is in the report, and falls back to the ledger
// saved under the state directory when no agent answers.
func usageLedger(cfg config.Config) (*tally.Ledger, string, error) {
	if cfg.Status.Socket != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		r, err := status.Fetch(ctx, cfg.Status.Socket)
		cancel()
		if err == nil && len(r.Usage) > 0 {
			l, err := tally.Decode(r.Usage)
			return l, "agent", err
		}
	}
	l, err := tally.Open(filepath.Join(cfg.StateDir, "usage.json"))
	return l, "ledger", err
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
