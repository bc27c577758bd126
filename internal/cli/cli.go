// Package cli is the shape both programs' command lines share: a subcommand per word,
// usage errors answered with the usage text and exit status 2, other errors with status 1,
// and `version` and `help` handled the same way.
package cli

import (
	"errors"
	"fmt"
	"io"

	"github.com/imdsguard/imdsguard/internal/version"
)

// ErrUsage marks errors that are the caller's wording, not the host's state.
var ErrUsage = errors.New("usage")

// Usagef returns an error that Run answers with the usage text.
func Usagef(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrUsage}, args...)...)
}

// Program is one binary's commands.
type Program struct {
	Name    string // e.g. "imdsguard"
	Usage   string
	Version string // as stamped at build time; "" for a plain go build
	// Commands maps a subcommand to what runs it with the remaining arguments.
	Commands map[string]func(args []string) error
}

// Run runs the command args name and returns the process exit code.
func (p Program) Run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, p.Usage)
		return 2
	}
	var err error
	switch args[0] {
	case "version", "--version", "-v":
		fmt.Fprintln(stdout, p.Name, version.String(p.Version))
	case "help", "-h", "--help":
		fmt.Fprint(stdout, p.Usage)
	default:
		cmd, ok := p.Commands[args[0]]
		if !ok {
			err = Usagef("unknown command %q", args[0])
			break
		}
		err = cmd(args[1:])
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrUsage):
		fmt.Fprintf(stderr, "%s: %v\n\n%s", p.Name, err, p.Usage)
		return 2
	default:
		fmt.Fprintf(stderr, "%s: %v\n", p.Name, err)
		return 1
	}
}
