// Command imdsguard-correlator reads CloudTrail and flags the use of instance and Lambda
// credentials from anywhere but where they were issued, naming the host process that
// fetched them when a fingerprint exists. Its commands live in internal/correlator.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/imdsguard/imdsguard/internal/correlator"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = ""

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := correlator.Run(ctx, version, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
