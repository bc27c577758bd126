package correlator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/creack/pty"

	"github.com/imdsguard/imdsguard/internal/correlator/trailwatch"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

// corpusFiles counts the files detect reads in dir.
func corpusFiles(t *testing.T, dir string) int {
	n := 0
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && !trailwatch.Skip(p) {
			n++
		}
		return nil
	})
	if n < 2 {
		t.Fatalf("corpus has %d files", n)
	}
	return n
}

// TestProgressOnATerminal runs detect and investigate with stderr on a pseudo-terminal:
// the progress line shows files, bytes and records/s, and ends at 100%; the log lines
// are still there.
func TestProgressOnATerminal(t *testing.T) {
	dir := sharedCorpus(t)
	files := corpusFiles(t, filepath.Join(dir, "cloudtrail"))
	for _, args := range [][]string{
		{"detect", "--config", filepath.Join(dir, "config.yaml"), filepath.Join(dir, "cloudtrail")},
		{"investigate", "--config", filepath.Join(dir, "config.yaml"), "--access-key", ctcorpus.KeyA1, filepath.Join(dir, "cloudtrail")},
	} {
		t.Run(args[0], func(t *testing.T) {
			ptmx, tty, err := pty.Open()
			if err != nil {
				t.Skipf("no pseudo-terminal here: %v", err)
			}
			defer ptmx.Close()
			var term bytes.Buffer
			copied := make(chan struct{})
			go func() {
				io.Copy(&term, ptmx) // ends with EIO once tty is closed
				close(copied)
			}()
			var out bytes.Buffer
			code := Run(context.Background(), "", args, strings.NewReader(""), &out, tty)
			tty.Close()
			<-copied
			screen := term.String()
			if code != 0 {
				t.Fatalf("exit %d: %s", code, screen)
			}
			for _, want := range []string{fmt.Sprintf("files %d/%d", files, files), "records/s", "100%", `"event":"record_skipped"`} {
				if !strings.Contains(screen, want) {
					t.Errorf("terminal lacks %q:\n%s", want, screen)
				}
			}
			// bytes done of the total, and the time spent and left
			for _, want := range []*regexp.Regexp{regexp.MustCompile(`\(\d+/\d+ kB, [0-9.]+ [kM]B/s\)`), regexp.MustCompile(`\[\d+s:\d+s\]`)} {
				if !want.MatchString(screen) {
					t.Errorf("terminal lacks %s:\n%s", want, screen)
				}
			}
		})
	}
}

// TestNoProgressWhenNotATerminal runs detect with stderr on a file: only log lines.
func TestNoProgressWhenNotATerminal(t *testing.T) {
	dir := sharedCorpus(t)
	f, err := os.CreateTemp(t.TempDir(), "stderr")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out bytes.Buffer
	code := Run(context.Background(), "", []string{"detect", "--config", filepath.Join(dir, "config.yaml"), filepath.Join(dir, "cloudtrail")}, strings.NewReader(""), &out, f)
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	data, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if bytes.ContainsAny(data, "\r") || bytes.Contains(data, []byte("records/s")) {
		t.Fatalf("progress written to a file:\n%s", data)
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	for _, l := range lines {
		if !json.Valid([]byte(l)) {
			t.Fatalf("not a log line: %q", l)
		}
	}
	if !strings.Contains(string(data), `"event":"detect_done"`) {
		t.Fatalf("no log:\n%s", data)
	}
}
