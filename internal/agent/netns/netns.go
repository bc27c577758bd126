// Package netns serves the broker inside other network namespaces (containers'): for a
// process in a namespace it creates the broker's listeners on 127.0.0.1 and [::1] at
// the broker's port inside that namespace (a listening socket belongs to the namespace
// it was created in, so one agent serves them all), hands them to the broker, and
// publishes the namespace's cookie with the families it holds, so that the kernel
// redirects that namespace's IMDS connections only where a listener of the agent's
// waits.
//
// Endpoints are made on demand, from the agent's connect events (Ensure), never by
// rescanning. A listener keeps its namespace alive, so the namespace never goes on its
// own while it is served: the manager holds a pidfd of one process in it, and when that
// process exits adopts another one still there, or else closes the listeners and
// unpublishes the namespace.
//
// A container's root may bind the broker's port in its own namespace first
// (CAP_NET_BIND_SERVICE there): that family is then not published, and the kernel
// applies containers.fallback to it. Nothing is published that the agent does not hold.
package netns

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/imdsguard/imdsguard/internal/agent/procinfo"
)

// Families says which loopback families an endpoint holds the broker's listener for.
type Families struct {
	IPv4 bool `json:"ipv4"`
	IPv6 bool `json:"ipv6"`
}

// Publisher tells the kernel which namespaces have an endpoint: Add once the listeners
// of families accept, Remove before they close. The kernel redirects a namespace's
// connection of a family only while it is published with that family.
type Publisher interface {
	Add(cookie uint64, families Families) error
	Remove(cookie uint64) error
}

// Broker accepts on the listeners the manager creates (internal/agent/broker.Broker).
type Broker interface {
	// ServeNetns accepts on ln, whose connections are made in the namespace netns.
	ServeNetns(ln net.Listener, netns uint64) error
	// CloseListener closes ln and returns once nothing accepts on it any more.
	CloseListener(ln net.Listener) error
}

// Config is the manager's part of the agent configuration.
type Config struct {
	Port          int // the broker's port
	MaxNamespaces int // namespaces served at once; more are refused and counted
	// HostNetns is the cookie of the agent's own namespace, served by the broker's own
	// listeners: Ensure ignores it.
	HostNetns uint64
	// RetryAfter is how long a namespace that could not be served is left alone before
	// a connect event from it tries again (5 s when 0).
	RetryAfter time.Duration
	Proc       string // /proc when ""
	// Cgroups resolves an event's cgroup id to its directory under CgroupRoot
	// (cgroup.Paths); nil when events' pids are always the agent's own.
	Cgroups    CgroupPaths
	CgroupRoot string
}

// CgroupPaths resolves cgroup ids to paths relative to the cgroup2 root (cgroup.Paths).
type CgroupPaths interface {
	Lookup(id uint64) (string, bool)
}

// Endpoint is one namespace served.
type Endpoint struct {
	Cookie   uint64    `json:"netns_cookie"`
	Inode    uint64    `json:"netns_inode"`
	PID      int       `json:"pid"` // the process whose exit the manager watches
	Since    time.Time `json:"since"`
	Families Families  `json:"families"`
}

// Stats are the manager's counters.
type Stats struct {
	Served  int    // namespaces served now
	Added   uint64 // endpoints created
	Removed uint64 // endpoints closed (their namespace's last process exited, or shutdown)
	Failed  uint64 // namespaces that could not be served (port taken, no loopback, …)
	Refused uint64 // namespaces refused over max_namespaces
}

// procNetInitIno is the inode number of the kernel's initial network namespace
// (PROC_NET_INIT_INO, fixed since Linux 3.8).
const procNetInitIno = 0xEFFFFFF9

// Errors of Serve.
var (
	ErrPortTaken     = errors.New("another process holds the broker's port in the namespace")
	ErrNoLoopback    = errors.New("the namespace has no loopback address to listen on")
	ErrHostNetns     = errors.New("the process is in the agent's own network namespace, or pid 1's")
	ErrTooMany       = errors.New("max_namespaces reached")
	ErrNotSame       = errors.New("the pid is not the process the event named (it exited)")
	ErrMoved         = errors.New("the process is no longer in the namespace the event named")
	ErrBusy          = errors.New("the namespace is being served by another call")
	ErrClosed        = errors.New("the namespace manager is closed")
	ErrForeignUserns = errors.New("the namespace belongs to another user namespace (a rootless container, or an unprivileged user's)")
	ErrNotPermitted  = errors.New("entering another network namespace is not permitted (CAP_SYS_ADMIN, and no RestrictNamespaces= on net)")
	errThreadTainted = errors.New("could not return to the agent's own network namespace")
)

// Manager serves network namespaces.
type Manager struct {
	cfg       Config
	broker    Broker
	pub       Publisher
	log       zerolog.Logger
	ownIno    uint64 // the agent's network namespace
	initIno   uint64 // pid 1's, when it is not the agent's (0: unknown)
	ownUserns uint64 // and user namespace

	epfd, wakefd int
	loopDone     chan struct{}
	ensures      sync.WaitGroup
	sem          chan struct{} // bounds concurrent Ensure work

	mu       sync.Mutex
	closed   bool
	disabled bool                 // setns is not permitted: nothing will ever be served
	byCookie map[uint64]*endpoint // served
	byIno    map[uint64]*endpoint
	byPidfd  map[int]*endpoint
	pending  map[uint64]bool      // inodes being served
	inflight map[uint64]bool      // cookies Ensure is serving
	failed   map[uint64]time.Time // cookies that could not be served, and when
	capLog   time.Time            // last max_namespaces refusal logged
	stats    Stats
}

type endpoint struct {
	Endpoint
	pidfd int
	lns   []net.Listener
}

// New returns a manager; Close releases it.
func New(cfg Config, b Broker, pub Publisher, log zerolog.Logger) (*Manager, error) {
	if cfg.Proc == "" {
		cfg.Proc = "/proc"
	}
	if cfg.RetryAfter == 0 {
		cfg.RetryAfter = 5 * time.Second
	}
	ino, err := nsInode(filepath.Join(cfg.Proc, "self/ns/net"))
	if err != nil {
		return nil, fmt.Errorf("own network namespace: %w", err)
	}
	// An agent in a network namespace of its own (the test bed) guards processes that
	// may still be in the host's (pid 1's, or the kernel's initial one): that namespace
	// is never a container's, and the agent must not listen there. Where pid 1 shares
	// the agent's namespace (a host, or systemd-nspawn), this excludes nothing more.
	initIno, err := nsInode(filepath.Join(cfg.Proc, "1/ns/net"))
	if err != nil {
		initIno = procNetInitIno // pid 1 may hold capabilities the agent lacks
	}
	userns, err := nsInode(filepath.Join(cfg.Proc, "self/ns/user"))
	if err != nil {
		return nil, fmt.Errorf("own user namespace: %w", err)
	}
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll for namespace processes: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		_ = unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wakefd)}); err != nil {
		_ = unix.Close(epfd)
		_ = unix.Close(wakefd)
		return nil, fmt.Errorf("epoll add eventfd: %w", err)
	}
	m := &Manager{cfg: cfg, broker: b, pub: pub, log: log, ownIno: ino, initIno: initIno, ownUserns: userns, epfd: epfd, wakefd: wakefd,
		loopDone: make(chan struct{}), sem: make(chan struct{}, 4),
		byCookie: map[uint64]*endpoint{}, byIno: map[uint64]*endpoint{}, byPidfd: map[int]*endpoint{},
		pending: map[uint64]bool{}, inflight: map[uint64]bool{}, failed: map[uint64]time.Time{}}
	go m.watch()
	return m, nil
}

// Origin is what a connect event says of where a connection came from.
type Origin struct {
	Cookie        uint64 // the connection's network namespace
	PID           uint32 // the process (thread-group id)
	StartBoottime uint64 // its start, ns since boot, as the kernel records it; 0: unchecked
	// PPID is its parent at connect time, tried when the process is gone (a curl ends
	// within milliseconds, its shell lives on): whichever process is entered, only a
	// namespace whose cookie is Cookie is served.
	PPID uint32
	// CgroupID is the process's cgroup. The kernel names processes by their pid in the
	// initial pid namespace; an agent in a pid namespace of its own (systemd-nspawn, a
	// container) finds the process among its cgroup's, by its start time.
	CgroupID uint64
}

// Ensure serves the namespace o.Cookie, unless it is served, being served, or failed
// within RetryAfter. It returns at once; the work runs on a goroutine of its own, one
// at a time per namespace. The agent calls it for every connect event from another
// namespace.
func (m *Manager) Ensure(o Origin) {
	if o.Cookie == 0 || o.Cookie == m.cfg.HostNetns || o.PID == 0 {
		return
	}
	cookie := o.Cookie
	now := time.Now()
	m.mu.Lock()
	if m.closed || m.disabled || m.byCookie[cookie] != nil || m.inflight[cookie] {
		m.mu.Unlock()
		return
	}
	if at, ok := m.failed[cookie]; ok && now.Sub(at) < m.cfg.RetryAfter {
		m.mu.Unlock()
		return
	}
	if len(m.byCookie)+len(m.inflight) >= m.cfg.MaxNamespaces {
		m.stats.Refused++
		logIt := now.Sub(m.capLog) >= time.Minute
		if logIt {
			m.capLog = now
		}
		m.markFailed(cookie, now)
		refused := m.stats.Refused
		m.mu.Unlock()
		if logIt {
			m.log.Warn().Str("event", "netns_cap").Uint64("netns", cookie).Int("max_namespaces", m.cfg.MaxNamespaces).
				Uint64("refused_total", refused).Msg("not serving another network namespace: max_namespaces reached; containers.fallback applies to it (logged once a minute)")
		}
		return
	}
	m.inflight[cookie] = true
	m.ensures.Add(1)
	m.mu.Unlock()
	cands := []candidate{{pid: int(o.PID), startTicks: o.StartBoottime / procinfo.NsPerTick}}
	if o.CgroupID != 0 && o.StartBoottime != 0 && m.cfg.Cgroups != nil {
		cands = append(cands, candidate{cgroupID: o.CgroupID, startTicks: o.StartBoottime / procinfo.NsPerTick})
	}
	if o.PPID != 0 && o.PPID != o.PID {
		cands = append(cands, candidate{pid: int(o.PPID)})
	}
	if o.CgroupID != 0 && m.cfg.Cgroups != nil {
		// Last: any process of the cgroup. The first sockets of a container's new
		// namespace come from the runtime's stages (runc's nsexec), which exit at once;
		// the container's init, already in the same cgroup and namespace, stays.
		cands = append(cands, candidate{cgroupID: o.CgroupID, anyInCgroup: true})
	}
	go func() {
		defer m.ensures.Done()
		m.sem <- struct{}{}
		// A namespace reported as a process forks into it is still being set up (lo
		// down): the listeners are bound with FREEBIND, ready when lo comes up.
		_, err := m.serve(cands, cookie)
		<-m.sem
		m.mu.Lock()
		delete(m.inflight, cookie)
		// Busy: another call is serving the same namespace (under another cookie
		// the events named); the next event from this one tries again.
		// Gone: the processes named exited (a runtime's short-lived stage that made
		// the namespace's first socket); the next event, from a live one, tries again.
		if err != nil && !errors.Is(err, ErrClosed) && !errors.Is(err, ErrBusy) && !gone(err) {
			m.markFailed(cookie, time.Now())
		}
		m.mu.Unlock()
	}()
}

// markFailed remembers a namespace not to try again too soon; bounded. Called locked.
func (m *Manager) markFailed(cookie uint64, now time.Time) {
	if len(m.failed) >= 4096 {
		for c, at := range m.failed {
			if now.Sub(at) >= m.cfg.RetryAfter {
				delete(m.failed, c)
			}
		}
	}
	if len(m.failed) < 8192 {
		m.failed[cookie] = now
	}
}

// Serve serves the network namespace of process pid now, and returns its endpoint
// (the one already served when it is). startTicks, when not 0, is the process's start
// time in clock ticks since boot (/proc/PID/stat's field 22): another process that
// reuses the pid is refused.
func (m *Manager) Serve(pid int, startTicks uint64) (Endpoint, error) {
	return m.serve([]candidate{{pid: pid, startTicks: startTicks}}, 0)
}

// candidate is a process whose namespace may be the one to serve.
type candidate struct {
	pid        int
	startTicks uint64 // 0: unchecked
	// cgroupID, when not 0: the process is the one of this cgroup that started at
	// startTicks, whatever its pid (pid is 0).
	cgroupID uint64
	// anyInCgroup: every process of cgroupID is a candidate (the namespace's cookie,
	// checked on its listener, says which is in it).
	anyInCgroup bool
}

// gone reports whether err says a candidate process was not there (any more) or not in
// the namespace wanted: the next candidate may still be.
func gone(err error) bool {
	return errors.Is(err, ErrNotSame) || errors.Is(err, ErrMoved) || errors.Is(err, fs.ErrNotExist) ||
		errors.Is(err, unix.ESRCH)
}

// serve serves the namespace of the first candidate still there (and in the namespace
// want, when not 0); it logs and counts the outcome once.
func (m *Manager) serve(cands []candidate, want uint64) (Endpoint, error) {
	var err error
	var pid int
	for _, c := range cands {
		if c.anyInCgroup {
			if want == 0 {
				continue // only a namespace's cookie can tell which process is in it
			}
			var pids []int
			if pids, err = m.cgroupProcs(c.cgroupID); err != nil {
				continue
			}
			if len(pids) == 0 {
				err = fmt.Errorf("%w: cgroup %d has no process", ErrNotSame, c.cgroupID)
				continue
			}
			for _, p := range pids {
				pid = p
				var ep Endpoint
				if ep, err = m.open(p, 0, want); err == nil {
					return ep, nil
				}
				if !gone(err) {
					break
				}
			}
			if err != nil && !gone(err) {
				break
			}
			continue
		}
		if c.cgroupID != 0 {
			if c.pid, err = m.inCgroup(c.cgroupID, c.startTicks); err != nil {
				continue
			}
		}
		pid = c.pid
		var ep Endpoint
		if ep, err = m.open(c.pid, c.startTicks, want); err == nil {
			return ep, nil
		}
		if !gone(err) {
			break
		}
	}
	m.mu.Lock()
	if !errors.Is(err, ErrClosed) && !errors.Is(err, ErrBusy) && !errors.Is(err, ErrTooMany) {
		m.stats.Failed++
	}
	m.mu.Unlock()
	ev := m.log.Warn().Err(err).Str("event", "netns_endpoint_failed").Int("pid", pid).Uint64("netns", want)
	switch {
	case errors.Is(err, ErrPortTaken):
		ev = m.log.Error().Err(err).Str("event", "netns_port_taken").Int("pid", pid).Uint64("netns", want)
	case errors.Is(err, ErrNotPermitted):
		ev = m.log.Error().Err(err).Str("event", "netns_unavailable")
	case errors.Is(err, ErrClosed), errors.Is(err, ErrBusy), errors.Is(err, ErrHostNetns), errors.Is(err, ErrTooMany):
		return Endpoint{}, err
	case errors.Is(err, ErrForeignUserns):
		ev = m.log.Debug().Err(err).Str("event", "netns_foreign_userns").Int("pid", pid).Uint64("netns", want) // any user can make many
	}
	ev.Msg("network namespace not served: containers.fallback applies to its connections")
	return Endpoint{}, err
}

// open does Serve's work: the pidfd, the namespace, the listeners, the broker, the
// publisher, in that order, undoing what it did on any failure.
func (m *Manager) open(pid int, startTicks, want uint64) (Endpoint, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return Endpoint{}, fmt.Errorf("%w: pidfd of %d: %v", ErrNotSame, pid, err)
	}
	if errors.Is(err, unix.EPERM) { // a system call filter
		m.mu.Lock()
		m.disabled = true
		m.mu.Unlock()
		return Endpoint{}, fmt.Errorf("%w: pidfd_open: %v", ErrNotPermitted, err)
	}
	if err != nil {
		return Endpoint{}, fmt.Errorf("pidfd of %d: %w", pid, err)
	}
	keep := false
	defer func() {
		if !keep {
			_ = unix.Close(pidfd)
		}
	}()
	nsPath := filepath.Join(m.cfg.Proc, strconv.Itoa(pid), "ns/net")
	nsfd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return Endpoint{}, fmt.Errorf("open %s: %w", nsPath, err)
	}
	defer closeFD(nsfd)
	var st unix.Stat_t
	if err := unix.Fstat(nsfd, &st); err != nil {
		return Endpoint{}, fmt.Errorf("stat %s: %w", nsPath, err)
	}
	if startTicks != 0 {
		stat, err := os.ReadFile(filepath.Join(m.cfg.Proc, strconv.Itoa(pid), "stat"))
		if err != nil {
			return Endpoint{}, fmt.Errorf("%w: %v", ErrNotSame, err)
		}
		if got, err := procinfo.StartTicks(stat); err != nil || got != startTicks {
			return Endpoint{}, ErrNotSame
		}
	}
	// Still alive: the pid was not reused between pidfd_open and the reads above, so
	// the namespace and the start time are the pidfd's process's.
	if !alive(pidfd) {
		return Endpoint{}, fmt.Errorf("%w: it exited", ErrNotSame)
	}
	if st.Ino == m.ownIno || st.Ino == m.initIno || st.Ino == procNetInitIno {
		return Endpoint{}, ErrHostNetns
	}
	// Only namespaces of root's runtimes: any user may create network namespaces of
	// their own (unprivileged user namespaces), and would otherwise use up
	// max_namespaces, leaving the containers it exists for unserved.
	if owner, err := ownerUserns(nsfd); err != nil {
		return Endpoint{}, err
	} else if owner != m.ownUserns {
		return Endpoint{}, ErrForeignUserns
	}
	m.mu.Lock()
	switch {
	case m.closed:
		m.mu.Unlock()
		return Endpoint{}, ErrClosed
	case m.byIno[st.Ino] != nil:
		ep := m.byIno[st.Ino].Endpoint
		m.mu.Unlock()
		if want != 0 && ep.Cookie != want {
			return Endpoint{}, ErrMoved
		}
		return ep, nil
	case m.pending[st.Ino]:
		m.mu.Unlock()
		return Endpoint{}, ErrBusy
	case len(m.byCookie)+len(m.pending) >= m.cfg.MaxNamespaces:
		m.stats.Refused++
		m.mu.Unlock()
		return Endpoint{}, ErrTooMany
	}
	m.pending[st.Ino] = true
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.pending, st.Ino)
		m.mu.Unlock()
	}()

	ls, err := listenIn(nsfd, m.cfg.Port)
	if errors.Is(err, ErrNotPermitted) {
		// The same for every namespace: said once, and no namespace is tried again.
		m.mu.Lock()
		m.disabled = true
		m.mu.Unlock()
		return Endpoint{}, err
	}
	if err != nil {
		return Endpoint{}, err
	}
	for _, addr := range ls.taken {
		m.log.Error().Str("event", "netns_port_taken").Int("pid", pid).Uint64("netns", ls.cookie).Str("addr", addr).
			Msg("a process in the namespace holds the broker's port: this family is not redirected there; containers.fallback applies")
	}
	lns := ls.listeners()
	closeAll := func() {
		for _, ln := range lns {
			ln.Close()
		}
	}
	if len(lns) == 0 {
		if len(ls.taken) > 0 {
			return Endpoint{}, ErrPortTaken
		}
		return Endpoint{}, ErrNoLoopback
	}
	if want != 0 && ls.cookie != want {
		closeAll()
		return Endpoint{}, ErrMoved
	}
	ep := &endpoint{Endpoint: Endpoint{Cookie: ls.cookie, Inode: st.Ino, PID: pid, Since: time.Now().UTC(),
		Families: Families{IPv4: ls.ln4 != nil, IPv6: ls.ln6 != nil}}, pidfd: pidfd}
	for i, ln := range lns {
		if err := m.broker.ServeNetns(ln, ls.cookie); err != nil {
			for _, served := range lns[:i] {
				_ = m.broker.CloseListener(served)
			}
			for _, rest := range lns[i:] {
				rest.Close()
			}
			return Endpoint{}, fmt.Errorf("broker: %w", err)
		}
		ep.lns = append(ep.lns, ln)
	}
	// Watched before published: an exit from now on is seen.
	if err := unix.EpollCtl(m.epfd, unix.EPOLL_CTL_ADD, pidfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(pidfd)}); err != nil {
		m.closeListeners(ep)
		return Endpoint{}, fmt.Errorf("watch process %d: %w", pid, err)
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		_ = unix.EpollCtl(m.epfd, unix.EPOLL_CTL_DEL, pidfd, nil)
		m.closeListeners(ep)
		return Endpoint{}, ErrClosed
	}
	m.byCookie[ep.Cookie], m.byIno[ep.Inode], m.byPidfd[pidfd] = ep, ep, ep
	m.mu.Unlock()
	keep = true
	if err := m.pub.Add(ep.Cookie, ep.Families); err != nil {
		m.remove(ep, "publish_failed")
		return Endpoint{}, fmt.Errorf("publish namespace %d: %w", ep.Cookie, err)
	}
	m.mu.Lock()
	m.stats.Added++
	m.mu.Unlock()
	m.log.Info().Str("event", "netns_endpoint_added").Uint64("netns", ep.Cookie).Uint64("netns_inode", ep.Inode).
		Int("pid", pid).Bool("ipv4", ep.Families.IPv4).Bool("ipv6", ep.Families.IPv6).Msg("serving the broker in a network namespace")
	return ep.Endpoint, nil
}

// remove unpublishes an endpoint, then closes its listeners and its pidfd.
func (m *Manager) remove(ep *endpoint, why string) {
	m.mu.Lock()
	if m.byCookie[ep.Cookie] != ep {
		m.mu.Unlock()
		return
	}
	delete(m.byCookie, ep.Cookie)
	delete(m.byIno, ep.Inode)
	delete(m.byPidfd, ep.pidfd)
	m.mu.Unlock()
	if err := m.pub.Remove(ep.Cookie); err != nil {
		m.log.Error().Err(err).Str("event", "netns_unpublish_failed").Uint64("netns", ep.Cookie).Msg("unpublishing a network namespace")
	}
	m.closeListeners(ep)
	_ = unix.EpollCtl(m.epfd, unix.EPOLL_CTL_DEL, ep.pidfd, nil)
	_ = unix.Close(ep.pidfd)
	m.mu.Lock()
	m.stats.Removed++
	m.mu.Unlock()
	m.log.Info().Str("event", "netns_endpoint_removed").Uint64("netns", ep.Cookie).Uint64("netns_inode", ep.Inode).
		Str("reason", why).Dur("served", time.Since(ep.Since)).Msg("stopped serving the broker in a network namespace")
}

func (m *Manager) closeListeners(ep *endpoint) {
	for _, ln := range ep.lns {
		if err := m.broker.CloseListener(ln); err != nil {
			ln.Close()
		}
	}
}

// Served reports whether the namespace cookie has an endpoint.
func (m *Manager) Served(cookie uint64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.byCookie[cookie] != nil
}

// Endpoints lists the namespaces served, for `imdsguard status`.
func (m *Manager) Endpoints() []Endpoint {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Endpoint, 0, len(m.byCookie))
	for _, ep := range m.byCookie {
		out = append(out, ep.Endpoint)
	}
	return out
}

// Stats returns the manager's counters.
func (m *Manager) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.stats
	s.Served = len(m.byCookie)
	return s
}

// Close stops watching, waits for Ensure's work, and removes every endpoint.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	var one [8]byte
	one[0] = 1 // host byte order on little-endian; any non-zero value wakes
	if _, err := unix.Write(m.wakefd, one[:]); err != nil {
		return fmt.Errorf("wake namespace watcher: %w", err)
	}
	<-m.loopDone
	m.ensures.Wait()
	m.mu.Lock()
	eps := make([]*endpoint, 0, len(m.byCookie))
	for _, ep := range m.byCookie {
		eps = append(eps, ep)
	}
	m.mu.Unlock()
	for _, ep := range eps {
		m.remove(ep, "shutdown")
	}
	_ = unix.Close(m.wakefd)
	return unix.Close(m.epfd)
}

// maxCgroupProcs bounds the processes of one cgroup looked at for an event's process.
const maxCgroupProcs = 4096

// inCgroup returns the pid, in the agent's pid namespace, of the process of the cgroup
// id that started at startTicks (ErrNotSame: none).
func (m *Manager) inCgroup(id, startTicks uint64) (int, error) {
	pids, err := m.cgroupProcs(id)
	if err != nil {
		return 0, err
	}
	for _, pid := range pids {
		f := strconv.Itoa(pid)
		stat, err := os.ReadFile(filepath.Join(m.cfg.Proc, f, "stat"))
		if err != nil {
			continue
		}
		if got, err := procinfo.StartTicks(stat); err == nil && got == startTicks {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("%w: no process of cgroup %d started then", ErrNotSame, id)
}

// cgroupProcs lists (the first maxCgroupProcs of) the processes of cgroup id, as the
// agent's pid namespace numbers them.
func (m *Manager) cgroupProcs(id uint64) ([]int, error) {
	rel, ok := m.cfg.Cgroups.Lookup(id)
	if !ok {
		return nil, fmt.Errorf("%w: cgroup %d is gone", ErrNotSame, id)
	}
	data, err := os.ReadFile(filepath.Join(m.cfg.CgroupRoot, rel, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotSame, err)
	}
	var pids []int
	for _, f := range strings.Fields(string(data)) {
		if len(pids) >= maxCgroupProcs {
			break
		}
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// alive reports whether the process of pidfd has not exited: a pidfd polls readable
// once it has. Unlike a signal 0, this needs no permission over the process
// (CAP_KILL for another user's).
func alive(pidfd int) bool {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return err == nil && n == 0
	}
}

// ownerUserns returns the inode of the user namespace that owns the namespace nsfd.
func ownerUserns(nsfd int) (uint64, error) {
	fd, err := unix.IoctlRetInt(nsfd, unix.NS_GET_USERNS)
	if err != nil {
		return 0, fmt.Errorf("owner of the network namespace: %w", err)
	}
	defer closeFD(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, fmt.Errorf("owner of the network namespace: %w", err)
	}
	return st.Ino, nil
}

func nsInode(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	return st.Ino, nil
}

// closeFD closes a descriptor the manager only read from or polled: there is nothing
// to do about a failed close.
func closeFD(fd int) { _ = unix.Close(fd) }
