// Command imdsguard is the host agent: it ties every connection to the Instance
// Metadata Service to the process that made it.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent"
	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/preflight"
	"github.com/imdsguard/imdsguard/internal/cli"
	"github.com/imdsguard/imdsguard/internal/logging"
	buildversion "github.com/imdsguard/imdsguard/internal/version"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = ""

// DefaultConfig is read by `run` when --config is not given and the file exists.
const DefaultConfig = "/etc/imdsguard/config.yaml"

const usage = `imdsguard guards the EC2 Instance Metadata Service on this host.

Usage:
  imdsguard run [--config FILE] [--unpin-on-exit]
                                    guard IMDS: attach the hooks, enforce the allowlist,
                                    serve the broker, record every connection
  imdsguard reload [--config FILE]  make the running agent re-read its configuration
  imdsguard report [--config FILE] [--since 24h] [--format text|json]
                                    who still uses IMDSv1, what was denied, and whether
                                    this instance is ready for HttpTokens=required
  imdsguard uninstall [--config FILE]
                                    detach and remove the pinned programs and maps
  imdsguard status [--config FILE | --socket PATH]
                                    per-process IMDS use, from the running agent
  imdsguard check-config FILE       validate a config file and print the effective config
  imdsguard preflight [--config FILE] [--no-imds]  check that this host can run the agent
  imdsguard version                 print the version

Every configuration key, at its default: /etc/imdsguard/config.yaml as installed,
and docs/agent-configuration.md.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	return cli.Program{Name: "imdsguard", Usage: usage, Version: version, Commands: map[string]func([]string) error{
		"run":          func(a []string) error { return cmdRun(a, stderr) },
		"status":       func(a []string) error { return cmdStatus(a, stdout) },
		"check-config": func(a []string) error { return cmdCheckConfig(a, stdout) },
		"reload":       func(a []string) error { return cmdReload(a, stdout) },
		"report":       func(a []string) error { return cmdReport(a, stdout) },
		"uninstall":    func(a []string) error { return cmdUninstall(a, stdout) },
		"preflight":    func(a []string) error { return cmdPreflight(a, stdout) },
	}}.Run(args, stdout, stderr)
}

func versionString() string { return buildversion.String(version) }

func cmdCheckConfig(args []string, stdout io.Writer) error {
	if len(args) != 1 {
		return fmt.Errorf("%w: check-config takes exactly one file", cli.ErrUsage)
	}
	cfg, err := config.Check(args[0])
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: ok\n", args[0])
	for _, n := range configNotes(cfg) {
		fmt.Fprintf(stdout, "note: %s\n", n)
	}
	fmt.Fprintf(stdout, "---\n%s", cfg)
	return nil
}

// configNotes says what a valid configuration does that its reader might not expect.
func configNotes(cfg config.Config) []string {
	var notes []string
	for i, r := range cfg.Rules {
		if !r.IMDSv2.Required() || !r.Action.Allows() {
			continue
		}
		why := "from another network namespace (a container) or not over TCP"
		if !cfg.Broker.Enabled {
			why = "(broker.enabled is false: every one)"
		}
		notes = append(notes, fmt.Sprintf("rules[%d] (%s): imdsv2: required is kept by the broker, so connections this rule allows that cannot be brokered are refused (EPERM): those %s", i, r.Name, why))
	}
	return notes
}

// loadConfig reads --config, or the default file when it exists, or the defaults.
func loadConfig(path string) (config.Config, string, error) {
	switch {
	case path != "":
		cfg, err := config.Load(path)
		return cfg, path, err
	case fileExists(DefaultConfig):
		cfg, err := config.Load(DefaultConfig)
		return cfg, DefaultConfig, err
	default:
		cfg, err := config.Parse(nil)
		return cfg, "", err
	}
}

func parseFlags(name string, args []string, extra func(*flag.FlagSet)) (string, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	path := fs.String("config", "", "config file (default "+DefaultConfig+" when it exists)")
	if extra != nil {
		extra(fs)
	}
	if err := fs.Parse(args); err != nil {
		return "", fmt.Errorf("%w: %v", cli.ErrUsage, err)
	}
	if fs.NArg() > 0 {
		return "", fmt.Errorf("%w: unexpected argument %q", cli.ErrUsage, fs.Arg(0))
	}
	return *path, nil
}

func cmdReload(args []string, stdout io.Writer) error {
	p, err := parseFlags("reload", args, nil)
	if err != nil {
		return err
	}
	cfg, _, err := loadConfig(p)
	if err != nil {
		return err // refuse before the agent does: same checks, clearer place
	}
	if err := agent.Reload(cfg.ControlSocket); err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	fmt.Fprintln(stdout, "reloaded")
	return nil
}

func cmdUninstall(args []string, stdout io.Writer) error {
	p, err := parseFlags("uninstall", args, nil)
	if err != nil {
		return err
	}
	cfg, _, err := loadConfig(p)
	if err != nil {
		return err
	}
	if cfg.PinPath == "" {
		fmt.Fprintln(stdout, "nothing pinned (pin_path is empty)")
		return nil
	}
	if err := hook.Unpin(cfg.PinPath); err != nil {
		return fmt.Errorf("uninstall: %w", err)
	}
	fmt.Fprintf(stdout, "removed pinned programs and maps under %s\n", cfg.PinPath)
	return nil
}

func cmdRun(args []string, stderr io.Writer) error {
	var unpin bool
	p, err := parseFlags("run", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&unpin, "unpin-on-exit", false, "detach and remove pinned programs on exit")
	})
	if err != nil {
		return err
	}
	cfg, path, err := loadConfig(p)
	if err != nil {
		return err
	}
	log, closeLog, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return err
	}
	defer closeLog()
	log.Info().Str("event", "agent_starting").Str("version", versionString()).Str("config", path).Msg("starting")

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	hup := make(chan struct{}, 1)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGHUP)
	defer signal.Stop(sig)
	go func() {
		for range sig {
			select {
			case hup <- struct{}{}:
			default:
			}
		}
	}()
	opts := agent.Options{Config: cfg, UnpinOnExit: unpin}
	if path != "" {
		opts.Reload = func() (config.Config, error) { return config.Load(path) }
	}
	if err := agent.Run(ctx, opts, log, hup); err != nil {
		log.Error().Err(err).Str("event", "agent_failed").Msg("agent stopped with an error")
		return err
	}
	return nil
}

func newLogger(c config.Log, stderr io.Writer) (zerolog.Logger, func(), error) {
	return logging.New(c.Output, c.Level, stderr)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func cmdPreflight(args []string, stdout io.Writer) error {
	var noIMDS bool
	p, err := parseFlags("preflight", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&noIMDS, "no-imds", false, "skip the IMDS check (the unit starts before the network)")
	})
	if err != nil {
		return err
	}
	cfg, _, err := loadConfig(p)
	if err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	return preflight.Check(context.Background(), cfg, noIMDS, stdout)
}
