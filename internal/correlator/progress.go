package correlator

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/imdsguard/imdsguard/internal/correlator/trailwatch"
)

// progress shows on stderr how far detect and investigate are through their inputs
// (files and bytes done, records/s, time left) when stderr is a terminal, and writes
// nothing when it is not (a pipe, a file, a log collector). A nil *progress does
// nothing, so the callers need no test.
type progress struct {
	bar     *progressbar.ProgressBar
	files   int
	done    atomic.Int64 // files read
	bytes   atomic.Int64 // bytes read from the files (compressed, as on disk)
	records atomic.Int64
	start   time.Time
	// mu orders log lines and the bar's line on the terminal.
	mu   sync.Mutex
	stop chan struct{}
	exit chan struct{}
}

// progressEvery is how often the line is redrawn.
const progressEvery = 250 * time.Millisecond

// newProgress returns a progress for stderr, nil when stderr is not a terminal.
func newProgress(stderr io.Writer) *progress {
	f, ok := stderr.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return &progress{stop: make(chan struct{}), exit: make(chan struct{})}
}

// logWriter is stderr for the log: a log line first clears the bar's line, and the
// bar is drawn again below it at the next redraw.
func (p *progress) logWriter(stderr io.Writer) io.Writer {
	if p == nil {
		return stderr
	}
	return &clearingWriter{p: p, w: stderr}
}

type clearingWriter struct {
	p *progress
	w io.Writer
}

func (c *clearingWriter) Write(b []byte) (int, error) {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	if c.p.bar != nil {
		_ = c.p.bar.Clear()
	}
	return c.w.Write(b)
}

// begin sizes the inputs (stdin has no size: then the bar shows no time left) and
// starts drawing.
func (p *progress) begin(names []string, stderr io.Writer) {
	if p == nil {
		return
	}
	var total int64
	for _, name := range names {
		if name == "-" {
			total = -1
			p.files++
			continue
		}
		_ = filepath.WalkDir(name, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() || path != name && trailwatch.Skip(path) {
				return nil
			}
			p.files++
			if info, err := d.Info(); err == nil && total >= 0 {
				total += info.Size()
			}
			return nil
		})
	}
	if len(names) == 0 {
		total, p.files = -1, 1
	}
	p.start = time.Now()
	p.bar = progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(stderr),
		progressbar.OptionShowBytes(true),
		progressbar.OptionShowTotalBytes(true),
		progressbar.OptionShowCount(),
		progressbar.OptionSetWidth(20),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionSetElapsedTime(true),
		progressbar.OptionSetRenderBlankState(true),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(stderr) }),
	)
	p.redraw()
	go func() {
		defer close(p.exit)
		t := time.NewTicker(progressEvery)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				p.redraw()
			}
		}
	}()
}

func (p *progress) redraw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	rate := float64(p.records.Load()) / max(time.Since(p.start).Seconds(), 1e-3)
	// The description first: the bytes may reach the total, and then the bar ends its line.
	p.bar.Describe(fmt.Sprintf("files %d/%d, %d records, %.0f records/s", p.done.Load(), p.files, p.records.Load(), rate))
	_ = p.bar.Set64(p.bytes.Load())
}

// reader counts the bytes read from r.
func (p *progress) reader(r io.Reader) io.Reader {
	if p == nil {
		return r
	}
	return &countingReader{r: r, n: &p.bytes}
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n.Add(int64(n))
	return n, err
}

func (p *progress) record() {
	if p != nil {
		p.records.Add(1)
	}
}

func (p *progress) fileDone() {
	if p != nil {
		p.done.Add(1)
	}
}

// finish draws the last state and ends the line (the bar ends it itself when it reaches
// the total).
func (p *progress) finish() {
	if p == nil || p.bar == nil {
		return
	}
	close(p.stop)
	<-p.exit
	p.redraw()
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.bar.IsFinished() {
		_ = p.bar.Exit()
	}
}
