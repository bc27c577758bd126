// Package status lets the person at the console ask the running agent which processes
// use IMDS and how: the agent serves its per-process table on a local unix socket (root
// only), and `imdsguard status` fetches it and prints a table.
package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	"github.com/imdsguard/imdsguard/internal/agent/netns"
)

// Report is what the agent answers: one JSON document per connection.
type Report struct {
	Time      time.Time              `json:"time"`
	Identity  *hostid.Identity       `json:"identity,omitempty"`
	Processes []metrics.ProcessStats `json:"processes"`
	// Usage is the agent's live usage tally (internal/agent/tally's Snapshot form), for
	// `imdsguard report`: what the saved ledger will say at the next save.
	Usage json.RawMessage `json:"usage,omitempty"`
	// Namespaces are the network namespaces (containers) served a broker endpoint.
	Namespaces []netns.Endpoint `json:"namespaces,omitempty"`
}

// Source produces the report's contents.
type Source struct {
	Processes func() []metrics.ProcessStats
	Identity  func() (hostid.Identity, bool) // may be nil
	Usage     func() ([]byte, error)         // may be nil
	// Namespaces lists the network namespaces served; nil when containers are not.
	Namespaces func() []netns.Endpoint
}

// Server answers status requests on a unix socket.
type Server struct {
	ln   net.Listener
	path string
	src  Source
	log  zerolog.Logger
	wg   sync.WaitGroup
}

// Listen serves src on the socket at path. The socket is mode 0600 and, because a
// chmod after bind leaves a moment where it is not, each connection's peer is also
// checked to be root. A stale socket from a crashed agent is replaced; a live one (an
// agent already running) is an error.
func Listen(path string, src Source, log zerolog.Logger) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create status socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("status socket %s: exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("status socket %s: another agent is serving it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale status socket: %w", err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on status socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod status socket: %w", err)
	}
	s := &Server{ln: ln, path: path, src: src, log: log}
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

func (s *Server) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Error().Err(err).Str("event", "status_accept_failed").Msg("status socket stopped")
			}
			return
		}
		s.answer(c.(*net.UnixConn))
	}
}

// answer runs inline: the report is small and built under one short lock, and serving
// one client at a time bounds what a busy console can cost the agent.
func (s *Server) answer(c *net.UnixConn) {
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	uid, err := peerUID(c)
	if err != nil || uid != 0 {
		s.log.Warn().Err(err).Str("event", "status_refused").Int("uid", uid).Msg("status asked by a non-root peer")
		return
	}
	r := Report{Time: time.Now().UTC(), Processes: s.src.Processes()}
	if s.src.Usage != nil {
		if u, err := s.src.Usage(); err == nil {
			r.Usage = u
		} else {
			s.log.Warn().Err(err).Str("event", "status_usage_failed").Msg("usage tally left out of status")
		}
	}
	if s.src.Namespaces != nil {
		r.Namespaces = s.src.Namespaces()
		slices.SortFunc(r.Namespaces, func(a, b netns.Endpoint) int { return a.Since.Compare(b.Since) })
	}
	if s.src.Identity != nil {
		if id, ok := s.src.Identity(); ok {
			r.Identity = &id
		}
	}
	if err := json.NewEncoder(c).Encode(r); err != nil {
		s.log.Debug().Err(err).Str("event", "status_write_failed").Msg("writing status")
	}
}

func peerUID(c *net.UnixConn) (int, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return -1, fmt.Errorf("peer credentials: %w", err)
	}
	if cerr != nil {
		return -1, fmt.Errorf("peer credentials: %w", cerr)
	}
	return int(cred.Uid), nil
}

// Close stops serving and removes the socket.
func (s *Server) Close() error {
	err := s.ln.Close()
	s.wg.Wait()
	// net's unix listener unlinks its socket on Close; this covers the case it did not.
	if rerr := os.Remove(s.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("close status socket: %w", err)
	}
	return nil
}

// Fetch asks the agent listening on path.
func Fetch(ctx context.Context, path string) (Report, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return Report{}, fmt.Errorf("connect to the agent's status socket (is `imdsguard run` running, and are you root?): %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	var r Report
	if err := json.NewDecoder(io.LimitReader(c, 64<<20)).Decode(&r); err != nil {
		return Report{}, fmt.Errorf("read status from the agent: %w", err)
	}
	return r, nil
}

// WriteTable prints the report for people: one row per executable, user and container
// (the workload, as the Container metric dimension names it), most recently seen first. V1 is IMDSv1 answered, V1-REJECTED refused by policy, V2 answered
// with a token, DENIED refused at connect() by the allowlist.
func WriteTable(w io.Writer, r Report) error {
	if r.Identity != nil {
		fmt.Fprintf(w, "instance %s (%s, account %s)\n\n", r.Identity.InstanceID, r.Identity.Region, r.Identity.AccountID)
	}
	if len(r.Processes) == 0 {
		if _, err := fmt.Fprintln(w, "no IMDS use seen since the agent started"); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "EXE\tUSER\tCONTAINER\tREQUESTS\tV1\tV1-REJECTED\tV2\tTOKENS\tDENIED\tCREDS\tLAST SEEN")
		for _, p := range r.Processes {
			ctr := p.Container
			if ctr == "" {
				ctr = "-" // an older agent's report
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n", p.Exe, p.User, ctr, p.Requests, p.V1, p.V1Refused,
				p.V2, p.Tokens, p.Denied, p.Creds, ago(r.Time, p.LastSeen))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(r.Namespaces) == 0 {
		return nil
	}
	// The broker's endpoints in containers' network namespaces.
	fmt.Fprintf(w, "\n%d network namespaces served\n", len(r.Namespaces))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NETNS COOKIE\tINODE\tPID\tFAMILIES\tSINCE")
	for _, n := range r.Namespaces {
		fams := ""
		if n.Families.IPv4 {
			fams = "ipv4"
		}
		if n.Families.IPv6 {
			fams = strings.TrimPrefix(fams+",ipv6", ",")
		}
		fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%s\n", n.Cookie, n.Inode, n.PID, fams, ago(r.Time, n.Since))
	}
	return tw.Flush()
}

func ago(now, t time.Time) string {
	d := now.Sub(t)
	switch {
	case t.IsZero():
		return "-"
	case d < time.Second:
		return "just now"
	case d < time.Minute:
		return strconv.Itoa(int(d.Seconds())) + "s ago"
	case d < time.Hour:
		return strconv.Itoa(int(d.Minutes())) + "m ago"
	case d < 48*time.Hour:
		return strconv.Itoa(int(d.Hours())) + "h ago"
	}
	return t.UTC().Format(time.RFC3339)
}
