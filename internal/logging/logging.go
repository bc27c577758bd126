// Package logging builds the one zerolog.Logger each program passes down: JSON lines, one
// event a line, with a timestamp, to stderr, stdout or an append-only file.
package logging

import (
	"fmt"
	"io"
	"os"

	"github.com/rs/zerolog"
)

// New returns a logger writing to output ("stderr", "stdout" or a file path) at level
// ("debug", "info", "warn", "error"), and a function that closes what it opened. stderr
// is the writer "stderr" means (tests pass their own).
func New(output, level string, stderr io.Writer) (zerolog.Logger, func(), error) {
	lvl, err := zerolog.ParseLevel(level)
	if err != nil {
		return zerolog.Logger{}, nil, fmt.Errorf("log.level: %w", err)
	}
	var w io.Writer = stderr
	closeFn := func() {}
	switch output {
	case "stderr", "":
	case "stdout":
		w = os.Stdout
	default:
		f, err := os.OpenFile(output, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return zerolog.Logger{}, nil, fmt.Errorf("open log output: %w", err)
		}
		w, closeFn = f, func() { f.Close() }
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), closeFn, nil
}
