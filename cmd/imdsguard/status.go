package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/status"
	"github.com/imdsguard/imdsguard/internal/cli"
)

// cmdStatus prints the running agent's per-process table. The socket is --socket, or
// status.socket from --config (or the default config file when it exists), or the
// built-in default.
func cmdStatus(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	path := fs.String("config", "", "config file (default "+DefaultConfig+" when it exists)")
	socket := fs.String("socket", "", "status socket (default: status.socket of the config)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", cli.ErrUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", cli.ErrUsage, fs.Arg(0))
	}
	if *socket == "" {
		cfg := config.Default()
		var err error
		switch {
		case *path != "":
			cfg, err = config.Load(*path)
		case fileExists(DefaultConfig):
			cfg, err = config.Load(DefaultConfig)
		}
		if err != nil {
			return err
		}
		if cfg.Status.Socket == "" {
			return fmt.Errorf("status.socket is off in the configuration")
		}
		*socket = cfg.Status.Socket
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := status.Fetch(ctx, *socket)
	if err != nil {
		return err
	}
	return status.WriteTable(stdout, r)
}
