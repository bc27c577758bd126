package netns_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/imdsguard/imdsguard/internal/agent/broker"
	"github.com/imdsguard/imdsguard/internal/agent/cgroup"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/netns"
	"github.com/imdsguard/imdsguard/internal/agent/procinfo"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// port is the broker's port in the tests' namespaces: privileged, as in production.
const port = 254

// redirects vouches for every connection of another namespace and remembers which
// namespace each look-up named.
type redirects struct {
	mu    sync.Mutex
	asked []uint64
}

func (r *redirects) LookupRedirect(netip.AddrPort, netip.AddrPort) (hook.Redirect, error) {
	return hook.Redirect{}, hook.ErrNotRedirected
}

func (r *redirects) LookupRedirectIn(ns uint64, _, _ netip.AddrPort) (hook.Redirect, error) {
	r.mu.Lock()
	r.asked = append(r.asked, ns)
	r.mu.Unlock()
	return hook.Redirect{PID: 42, UID: 1000, V2Required: true, Dst: netip.MustParseAddrPort("169.254.169.254:80")}, nil
}

type env struct {
	m     *netns.Manager
	pub   *netns.Memory
	b     *broker.Broker
	red   *redirects
	mu    sync.Mutex
	reqs  []broker.Request
	close sync.Once
}

// requests waits for want requests to be recorded (the broker records each after its
// answer), up to 5 s, and returns those recorded.
func (e *env) requests(want int) []broker.Request {
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		e.mu.Lock()
		reqs := append([]broker.Request(nil), e.reqs...)
		e.mu.Unlock()
		if len(reqs) >= want || time.Now().After(deadline) {
			return reqs
		}
	}
}

// waitRemoved waits until the manager has removed n endpoints in all (unpublished,
// listeners closed), up to 10 s.
func (e *env) waitRemoved(t *testing.T, n uint64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); e.m.Stats().Removed < n; time.Sleep(2 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v: endpoint not removed 10 s after its namespace's last process exited", e.m.Stats())
		}
	}
}

// start is a manager over a real broker that forwards to a stand-in IMDS in the
// test's own namespace.
func start(t testing.TB, maxNamespaces int) *env {
	t.Helper()
	return startWith(t, maxNamespaces, func(*netns.Config) {})
}

// startWith is start with the manager's configuration changed by set.
func startWith(t testing.TB, maxNamespaces int, set func(*netns.Config)) *env {
	t.Helper()
	testbed.RequirePrivileged(t)
	imds := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "i-0123456789")
	}))
	t.Cleanup(imds.Close)
	up := netip.MustParseAddrPort(imds.Listener.Addr().String())
	e := &env{pub: netns.NewMemory(), red: &redirects{}}
	e.b = broker.New(broker.Config{IMDS4: up.Addr(), IMDS6: netip.MustParseAddr("::1"), IMDSPort: int(up.Port()),
		Enforce: true, MaxHeaderBytes: 4096, MaxBodyBytes: 1024, ReadTimeout: 2 * time.Second,
		IdleTimeout: 10 * time.Second, UpstreamTimeout: 2 * time.Second}, e.red, func(r broker.Request) {
		e.mu.Lock()
		e.reqs = append(e.reqs, r)
		e.mu.Unlock()
	}, zerolog.Nop())
	host, err := hook.OwnNetnsCookie()
	if err != nil {
		t.Fatal(err)
	}
	cfg := netns.Config{Port: port, MaxNamespaces: maxNamespaces, HostNetns: host, RetryAfter: time.Hour}
	set(&cfg)
	e.m, err = netns.New(cfg, e.b, e.pub, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.shutdown(t) })
	return e
}

// testLog logs to a test's output; benchmarks log nothing.
func testLog(t testing.TB) zerolog.Logger {
	if _, ok := t.(*testing.B); ok {
		return zerolog.Nop()
	}
	return zerolog.New(zerolog.NewTestWriter(t))
}

func (e *env) shutdown(t testing.TB) {
	e.close.Do(func() {
		if err := e.m.Close(); err != nil {
			t.Errorf("close manager: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_ = e.b.Shutdown(ctx)
	})
}

// proc is a process in a network namespace of its own.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// kill ends the process and reaps it.
func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// newNetnsProc starts a process in a new network namespace, with lo up unless loDown.
func newNetnsProc(t testing.TB, loDown bool) *proc {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start a process in a new network namespace: %v", err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(p.kill) // also on failure: the namespace goes with its last process
	if !loDown {
		if out, err := exec.Command("nsenter", "-t", strconv.Itoa(p.pid()), "-n", "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			t.Fatalf("lo up: %v: %s", err, out)
		}
	}
	return p
}

// joinProc starts another process in p's namespace.
func joinProc(t *testing.T, p *proc) *proc {
	t.Helper()
	cmd := exec.Command("nsenter", "-t", strconv.Itoa(p.pid()), "-n", "sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	q := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(q.done) }()
	t.Cleanup(q.kill)
	// nsenter execs sleep once it has entered: wait until the process is in p's namespace.
	want, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", p.pid()))
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		got, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", q.pid()))
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", q.pid()))
		if got == want && exe != "" && exe != "/usr/bin/nsenter" {
			return q
		}
		if time.Now().After(deadline) {
			t.Fatalf("second process never joined the namespace (%s, %s)", got, exe)
		}
	}
}

// holdNetns keeps p's namespace open past its processes, for looking into it after.
func holdNetns(t *testing.T, p *proc) string {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", p.pid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), f.Fd())
}

// cookieOf reads the cookie of the namespace at path.
func cookieOf(t *testing.T, path string) uint64 {
	t.Helper()
	var cookie uint64
	err := testbed.InNetns(path, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return cookie
}

// get asks addr (inside the namespace at path) for the instance id over IMDSv2.
func get(path, addr string) (int, string, error) {
	var c net.Conn
	if err := testbed.InNetns(path, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, 2*time.Second)
		return err
	}); err != nil {
		return 0, "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: T\r\nConnection: close\r\n\r\n"); err != nil {
		return 0, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// waitUnpublished waits for cookie to leave the publisher.
func waitUnpublished(t *testing.T, pub *netns.Memory, cookie uint64) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		m, changed := pub.Published()
		if _, ok := m[cookie]; !ok {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("namespace %d still published 10 s after its last process exited", cookie)
		}
	}
}

func TestPrivilegedServeNetns(t *testing.T) {
	e := start(t, 8)
	p := newNetnsProc(t, false)
	path := holdNetns(t, p)
	want := cookieOf(t, path)
	ep, err := e.m.Serve(p.pid(), 0)
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if ep.Cookie != want || ep.Inode != st.Ino || ep.PID != p.pid() || !ep.Families.IPv4 || !ep.Families.IPv6 {
		t.Fatalf("endpoint %+v, want cookie %d inode %d pid %d, both families", ep, want, st.Ino, p.pid())
	}
	if pub, _ := e.pub.Published(); len(pub) != 1 || pub[want] != ep.Families {
		t.Fatalf("published %v, want only %d with %+v", pub, want, ep.Families)
	}
	if again, err := e.m.Serve(p.pid(), 0); err != nil || again != ep {
		t.Fatalf("serving again: %+v, %v; want the same endpoint", again, err)
	}
	for _, addr := range []string{"127.0.0.1:254", "[::1]:254"} {
		st, body, err := get(path, addr)
		if err != nil || st != 200 || body != "i-0123456789" {
			t.Fatalf("GET through %s inside the namespace: %d %q %v", addr, st, body, err)
		}
	}
	reqs := e.requests(2)
	if len(reqs) != 2 {
		t.Fatalf("broker recorded %d requests, want 2", len(reqs))
	}
	for _, r := range reqs {
		if r.Netns != want || r.Conn.PID != 42 || r.Status != 200 {
			t.Errorf("request recorded %+v, want netns %d, the kernel record's pid, 200", r, want)
		}
	}
	e.red.mu.Lock()
	for _, n := range e.red.asked {
		if n != want {
			t.Errorf("broker looked a connection up in netns %d, want %d", n, want)
		}
	}
	e.red.mu.Unlock()
	if eps := e.m.Endpoints(); len(eps) != 1 || eps[0] != ep {
		t.Fatalf("endpoints %+v", eps)
	}
	if s := e.m.Stats(); s.Served != 1 || s.Added != 1 || s.Failed != 0 {
		t.Fatalf("stats %+v", s)
	}
}

// The agent's own namespace is the host broker's, never an endpoint's.
func TestPrivilegedServeRefusesOwnNetns(t *testing.T) {
	e := start(t, 8)
	if _, err := e.m.Serve(os.Getpid(), 0); !errors.Is(err, netns.ErrHostNetns) {
		t.Fatalf("serving the agent's own namespace: %v, want ErrHostNetns", err)
	}
	if pub, _ := e.pub.Published(); len(pub) != 0 {
		t.Fatalf("published %v", pub)
	}
}

// A container's root binds the broker's port in its namespace before the agent: that
// family is not published (the kernel applies the fallback), and with both families
// taken the namespace is not served at all.
func TestPrivilegedHostilePortTaken(t *testing.T) {
	e := start(t, 8)
	for _, tc := range []struct {
		name  string
		addrs []string
	}{{"ipv4", []string{"127.0.0.1:254"}}, {"both", []string{"127.0.0.1:254", "[::1]:254"}}} {
		t.Run(tc.name, func(t *testing.T) {
			p := newNetnsProc(t, false)
			path := holdNetns(t, p)
			cookie := cookieOf(t, path)
			// The hostile listeners, made in the container's namespace (by the test: a
			// socket is the namespace's whoever holds it).
			err := testbed.InNetns(path, func() error {
				for _, a := range tc.addrs {
					ln, err := net.Listen("tcp", a)
					if err != nil {
						return err
					}
					t.Cleanup(func() { ln.Close() })
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			ep, err := e.m.Serve(p.pid(), 0)
			pub, _ := e.pub.Published()
			if len(tc.addrs) == 2 {
				if !errors.Is(err, netns.ErrPortTaken) {
					t.Fatalf("both ports taken: %+v, %v; want ErrPortTaken", ep, err)
				}
				if _, ok := pub[cookie]; ok || e.m.Served(cookie) {
					t.Fatalf("a namespace whose ports another process holds was published: %v", pub)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if f := pub[cookie]; f.IPv4 || !f.IPv6 || ep.Families != f {
				t.Fatalf("published %+v for the namespace, want IPv6 only (its IPv4 port is another's)", f)
			}
			if st, _, err := get(path, "[::1]:254"); err != nil || st != 200 {
				t.Fatalf("IPv6 endpoint: %d %v", st, err)
			}
		})
	}
	if s := e.m.Stats(); s.Failed != 1 {
		t.Fatalf("stats %+v, want 1 failure", s)
	}
}

// A namespace whose last process exits loses its endpoint: unpublished, listeners
// closed. Its other processes keep it served as long as one lives.
func TestPrivilegedRemovedWithLastProcess(t *testing.T) {
	e := start(t, 8)
	p := newNetnsProc(t, false)
	q := joinProc(t, p)
	path := holdNetns(t, p)
	ep, err := e.m.Serve(p.pid(), 0)
	if err != nil {
		t.Fatal(err)
	}
	p.kill()
	// The watched process went; q keeps the namespace served.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		eps := e.m.Endpoints()
		if len(eps) == 1 && eps[0].PID == q.pid() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("endpoints %+v: the second process was not adopted", eps)
		}
	}
	if st, _, err := get(path, "127.0.0.1:254"); err != nil || st != 200 {
		t.Fatalf("served namespace after its first process exited: %d %v", st, err)
	}
	q.kill()
	waitUnpublished(t, e.pub, ep.Cookie)
	e.waitRemoved(t, 1)
	if e.m.Served(ep.Cookie) {
		t.Fatal("still served after unpublishing")
	}
	// The listeners are closed: nothing answers in the namespace (kept open by the test).
	err = testbed.InNetns(path, func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:254", time.Second)
		if err == nil {
			c.Close()
			return errors.New("a listener of a removed endpoint still accepts")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if s := e.m.Stats(); s.Served != 0 || s.Removed != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// Ensure serves a namespace from a connect event's cookie, pid and start time; a pid
// that is another process, or a namespace that is not the event's, is not served.
func TestPrivilegedEnsure(t *testing.T) {
	e := start(t, 8)
	p := newNetnsProc(t, false)
	path := holdNetns(t, p)
	cookie := cookieOf(t, path)
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.pid()))
	if err != nil {
		t.Fatal(err)
	}
	ticks, err := procinfo.StartTicks(stat)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Serve(p.pid(), ticks+1); !errors.Is(err, netns.ErrNotSame) {
		t.Fatalf("serve with another start time: %v, want ErrNotSame", err)
	}
	e.m.Ensure(netns.Origin{Cookie: cookie, PID: uint32(p.pid()), StartBoottime: ticks * procinfo.NsPerTick})
	timeout := time.After(10 * time.Second)
	for {
		pub, changed := e.pub.Published()
		if _, ok := pub[cookie]; ok {
			break
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatal("Ensure did not serve the namespace within 10 s")
		}
	}
	e.m.Ensure(netns.Origin{Cookie: cookie + 1, PID: uint32(p.pid()), StartBoottime: ticks * procinfo.NsPerTick}) // not the process's namespace
	for deadline := time.Now().Add(5 * time.Second); e.m.Stats().Failed < 2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v, want the start-time and the wrong-cookie failures", e.m.Stats())
		}
	}
	if pub, _ := e.pub.Published(); len(pub) != 1 {
		t.Fatalf("published %v, want only the event's namespace", pub)
	}
	e.m.Ensure(netns.Origin{Cookie: cookie + 2}) // no pid: nothing to enter
	if len(e.m.Endpoints()) != 1 {
		t.Fatal("Ensure without a pid served something")
	}
}

// max_namespaces bounds what is served; refusals are counted.
func TestPrivilegedMaxNamespaces(t *testing.T) {
	e := start(t, 1)
	a, b := newNetnsProc(t, false), newNetnsProc(t, false)
	if _, err := e.m.Serve(a.pid(), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Serve(b.pid(), 0); !errors.Is(err, netns.ErrTooMany) {
		t.Fatalf("second namespace over max_namespaces 1: %v", err)
	}
	if s := e.m.Stats(); s.Served != 1 || s.Refused != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// A namespace whose lo is still down (a runtime setting it up) is served at once: the
// listeners are bound with IP_FREEBIND, and answer from the moment lo comes up.
func TestPrivilegedLoopbackDown(t *testing.T) {
	e := start(t, 8)
	p := newNetnsProc(t, true)
	ep, err := e.m.Serve(p.pid(), 0)
	if err != nil {
		t.Fatalf("lo down: %v", err)
	}
	if !ep.Families.IPv4 || !ep.Families.IPv6 {
		t.Fatalf("lo down: endpoint %+v, want both families", ep)
	}
	if out, err := exec.Command("nsenter", "-t", strconv.Itoa(p.pid()), "-n", "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v: %s", err, out)
	}
	path := fmt.Sprintf("/proc/%d/ns/net", p.pid())
	for _, addr := range []string{"127.0.0.1:254", "[::1]:254"} {
		if st, _, err := get(path, addr); err != nil || st != 200 {
			t.Fatalf("%s once lo is up: %d %v", addr, st, err)
		}
	}
}

// Closing the manager (agent shutdown) unpublishes and closes every endpoint.
func TestPrivilegedCloseLeavesNoListener(t *testing.T) {
	e := start(t, 8)
	var paths []string
	for range 3 {
		p := newNetnsProc(t, false)
		paths = append(paths, holdNetns(t, p))
		if _, err := e.m.Serve(p.pid(), 0); err != nil {
			t.Fatal(err)
		}
	}
	e.shutdown(t)
	if pub, _ := e.pub.Published(); len(pub) != 0 {
		t.Fatalf("still published after close: %v", pub)
	}
	for _, path := range paths {
		err := testbed.InNetns(path, func() error {
			for _, a := range []string{"127.0.0.1:254", "[::1]:254"} {
				if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
					c.Close()
					return fmt.Errorf("%s still accepts after the manager closed", a)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.m.Serve(os.Getpid(), 0); err == nil {
		t.Fatal("a closed manager served")
	}
}

// A namespace of another user namespace (what any user can make with `unshare -Urn`)
// is not served: it would use up max_namespaces for the containers it exists for.
func TestPrivilegedForeignUsernsNotServed(t *testing.T) {
	e := start(t, 8)
	cmd := exec.Command("sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER | syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 65534, Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 65534, Size: 1}}}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start a process in a new user and network namespace: %v", err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(p.kill)
	if out, err := exec.Command("nsenter", "-t", strconv.Itoa(p.pid()), "-n", "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v: %s", err, out)
	}
	if _, err := e.m.Serve(p.pid(), 0); !errors.Is(err, netns.ErrForeignUserns) {
		t.Fatalf("a user's own namespace: %v, want ErrForeignUserns", err)
	}
	if pub, _ := e.pub.Published(); len(pub) != 0 {
		t.Fatalf("published %v", pub)
	}
}

// A client that is gone by the time its event is read (a curl ends in milliseconds)
// has its namespace served through its parent, still there.
func TestPrivilegedEnsureThroughParent(t *testing.T) {
	e := start(t, 8)
	parent := newNetnsProc(t, false)
	cookie := cookieOf(t, holdNetns(t, parent))
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	e.m.Ensure(netns.Origin{Cookie: cookie, PID: uint32(gone.Process.Pid), StartBoottime: 1, PPID: uint32(parent.pid())})
	timeout := time.After(10 * time.Second)
	for {
		pub, changed := e.pub.Published()
		if _, ok := pub[cookie]; ok {
			break
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("namespace not served through the parent; stats %+v", e.m.Stats())
		}
	}
	if eps := e.m.Endpoints(); len(eps) != 1 || eps[0].PID != parent.pid() {
		t.Fatalf("endpoints %+v, want the parent watched", eps)
	}
}

// cgroupPaths is a cgroup.Paths stand-in that knows one cgroup.
type cgroupPaths map[uint64]string

func (c cgroupPaths) Lookup(id uint64) (string, bool) { p, ok := c[id]; return p, ok }

// An agent in a pid namespace of its own (systemd-nspawn) gets events naming processes
// by their pid in the initial pid namespace, which means nothing in its /proc: the
// process is found in the event's cgroup by its start time.
func TestPrivilegedEnsureByCgroup(t *testing.T) {
	root, err := cgroup.Root()
	if err != nil {
		t.Fatal(err)
	}
	p := newNetnsProc(t, false)
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p.pid()))
	if err != nil {
		t.Fatal(err)
	}
	var rel string
	for _, l := range strings.Split(string(data), "\n") {
		if r, ok := strings.CutPrefix(l, "0::"); ok {
			rel = r
		}
	}
	id, err := cgroup.ID(filepath.Join(root, rel))
	if err != nil {
		t.Fatal(err)
	}
	e := startWith(t, 8, func(c *netns.Config) { c.Cgroups, c.CgroupRoot = cgroupPaths{id: rel}, root })
	cookie := cookieOf(t, holdNetns(t, p))
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.pid()))
	if err != nil {
		t.Fatal(err)
	}
	ticks, err := procinfo.StartTicks(stat)
	if err != nil {
		t.Fatal(err)
	}
	// A pid that names no process here, as the kernel's pid of a process does in a
	// pid namespace of the agent's own.
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	e.m.Ensure(netns.Origin{Cookie: cookie, PID: uint32(gone.Process.Pid), StartBoottime: ticks * procinfo.NsPerTick, CgroupID: id})
	timeout := time.After(10 * time.Second)
	for {
		pub, changed := e.pub.Published()
		if _, ok := pub[cookie]; ok {
			break
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("namespace not served through the event's cgroup; stats %+v", e.m.Stats())
		}
	}
	if eps := e.m.Endpoints(); len(eps) != 1 || eps[0].PID != p.pid() {
		t.Fatalf("endpoints %+v, want pid %d watched", eps, p.pid())
	}
}
