// Package events writes the agent's record of IMDS connections: one JSON object per
// line, one line per connection, with field names that are a contract with the tools
// that read them (docs/events.md, checked against this package by a test).
package events

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/containers"
)

// Event kinds.
const (
	KindConnect = "imds_connect" // one per connect() to IMDS, from the kernel
	KindRequest = "imds_request" // one per HTTP request the broker handled
	// KindPreexisting is one per IMDS connection already open when the agent started.
	KindPreexisting = "imds_preexisting"
	// KindConnectSummary is one per process and outcome per second: the refused (and
	// UDP) connects the kernel counted instead of writing an event for each.
	KindConnectSummary = "imds_connect_summary"
)

// Record is one IMDS connection or request: the kernel's facts and their enrichment.
type Record struct {
	Kind         string // KindConnect when empty
	Time         time.Time
	PID, TID     uint32
	PPID         uint32
	UID, GID     uint32
	User         string
	Comm         string
	Exe          string
	ExeTruncated bool
	Cmdline      []string
	Cgroup       string
	CgroupID     uint64
	Unit         string
	ContainerID  string
	Container    containers.Info // runtime, pod and task; written when known
	Netns        uint64
	SocketCookie uint64
	Dst          string
	Verdict      string
	Rule         string // name of the matching allowlist rule, "" for the default action
	Redirected   bool   // sent through the broker
	Agent        bool   // one of the agent's own sockets, passed unjudged
	NoBroker     bool   // could not be brokered (with a v2-required rule: refused for that)
	// ExeBorrowed: the process's mm->exe_file (which Exe names) is not the file it
	// exec'd; it repointed it (prctl PR_SET_MM_MAP). Rules judged the exec'd file.
	ExeBorrowed bool
	// Backstop (summaries): packets the egress program stopped, from a socket no
	// connect() hook let through to IMDS (raw sockets, DNAT); Count counts packets.
	Backstop bool
	Missing  []string

	// Summary fields (KindConnectSummary).
	Count uint64    // connects counted, none with an event of its own
	First time.Time // the first of them; Time is the last
	UDP   bool      // they were UDP connects

	// Request fields (KindRequest).
	Endpoint    string // imds, ecs, pod_identity
	ForeignTask string // ECS: the task another task's credentials id was handed to
	Method      string
	Path        string
	IMDSVersion string // token, v1, v2
	Status      int    // HTTP status the client got
	Refused     string // why the broker answered itself, e.g. imdsv2_required
	WouldRefuse string // audit mode: why enforce mode would have refused it
	DurationMS  float64
}

// Writer appends records to stdout or a file. It is safe for concurrent use. Lines
// are buffered: call Flush when no more records are waiting, so that a burst costs one
// write and a lone event still reaches the file at once.
type Writer struct {
	mu   sync.Mutex
	path string // "" for stdout
	f    *os.File
	buf  *bufio.Writer
	log  zerolog.Logger
}

// Open returns a writer for output: "stdout" or a file path, created 0600 with its
// directory when missing, appended to otherwise.
func Open(output string) (*Writer, error) {
	w := &Writer{}
	if output == "stdout" {
		w.setOut(os.Stdout)
		return w, nil
	}
	w.path = output
	if err := w.Reopen(); err != nil {
		return nil, err
	}
	return w, nil
}

func (w *Writer) setOut(out io.Writer) {
	w.buf = bufio.NewWriterSize(out, 64*1024)
	w.log = zerolog.New(w.buf)
}

// Flush writes buffered lines out.
func (w *Writer) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.buf.Flush(); err != nil {
		return fmt.Errorf("write events: %w", err)
	}
	return nil
}

// Reopen reopens the file, for log rotation (SIGHUP). A no-op on stdout.
func (w *Writer) Reopen() error {
	if w.path == "" {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(w.path), 0o750); err != nil {
		return fmt.Errorf("create events directory: %w", err)
	}
	f, err := os.OpenFile(w.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open events file: %w", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f != nil {
		_ = w.buf.Flush()
		w.f.Close()
	}
	w.f = f
	w.setOut(f)
	return nil
}

// Write appends one record as one line.
func (w *Writer) Write(r Record) {
	w.mu.Lock()
	defer w.mu.Unlock()
	kind := r.Kind
	if kind == "" {
		kind = KindConnect
	}
	e := w.log.Log().
		Str("time", r.Time.UTC().Format(time.RFC3339Nano)).
		Str("event", kind).
		Uint32("pid", r.PID).
		Uint32("tid", r.TID).
		Uint32("ppid", r.PPID).
		Uint32("uid", r.UID).
		Uint32("gid", r.GID).
		Str("user", r.User).
		Str("comm", r.Comm).
		Str("exe", r.Exe)
	if r.ExeTruncated {
		e = e.Bool("exe_truncated", true)
	}
	if r.ExeBorrowed {
		e = e.Bool("exe_borrowed", true)
	}
	e = e.Strs("cmdline", nonNil(r.Cmdline)).
		Str("cgroup", r.Cgroup).
		Uint64("cgroup_id", r.CgroupID).
		Str("unit", r.Unit).
		Str("container_id", r.ContainerID)
	e = containerFields(e, r.Container)
	e = e.Uint64("netns", r.Netns).
		Uint64("socket_cookie", r.SocketCookie).
		Str("dst", r.Dst).
		Str("verdict", r.Verdict).
		Str("rule", r.Rule).
		Bool("redirected", r.Redirected)
	if r.Agent {
		e = e.Bool("agent", true)
	}
	if r.NoBroker {
		e = e.Bool("no_broker", true)
	}
	if kind == KindConnectSummary {
		e = e.Uint64("count", r.Count).Str("first", r.First.UTC().Format(time.RFC3339Nano))
		if r.UDP {
			e = e.Bool("udp", true)
		}
		if r.Backstop {
			e = e.Bool("backstop", true)
		}
	}
	if kind == KindRequest {
		e = e.Str("endpoint", r.Endpoint).Str("method", r.Method).Str("path", r.Path).Str("imds_version", r.IMDSVersion).
			Int("status", r.Status).Float64("duration_ms", r.DurationMS)
		if r.ForeignTask != "" {
			e = e.Str("foreign_task_arn", r.ForeignTask)
		}
		if r.Refused != "" {
			e = e.Str("refused", r.Refused)
		}
		if r.WouldRefuse != "" {
			e = e.Str("would_refuse", r.WouldRefuse)
		}
	}
	if len(r.Missing) > 0 {
		e = e.Strs("missing", r.Missing)
	}
	e.Send()
}

// containerFields adds what the container's runtime knows, each field only when known:
// most hosts' events come from no container.
func containerFields(e *zerolog.Event, c containers.Info) *zerolog.Event {
	for _, f := range []struct{ key, value string }{
		{"container_runtime", c.Runtime},
		{"container_name", c.Name},
		{"pod_namespace", c.Pod.Namespace},
		{"pod", c.Pod.Name},
		{"pod_uid", c.Pod.UID},
		{"pod_container", c.Pod.Container},
		{"service_account", c.Pod.ServiceAccount},
		{"ecs_task_arn", c.ECS.ARN},
		{"ecs_task_family", c.ECS.Family},
		{"ecs_container", c.ECS.Container},
	} {
		if f.value != "" {
			e = e.Str(f.key, f.value)
		}
	}
	return e
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// Close flushes and closes the file.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	ferr := w.buf.Flush()
	if w.f == nil {
		return ferr
	}
	err := w.f.Sync()
	if ferr != nil {
		err = ferr
	}
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	w.f = nil
	w.log = zerolog.Nop()
	return err
}
