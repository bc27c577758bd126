// Package hook loads imdsguard's kernel programs, attaches them to one cgroup v2
// directory, keeps them pinned so that they outlive the agent, and is the agent's only
// door to their maps: events, policy, heartbeat and the broker's connection records.
package hook

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Target is the IMDS endpoint the programs watch for, the other credential endpoints
// they guard the same way, the broker's port (0: no broker) and what becomes of a
// container's connection that cannot be brokered; fixed at load time.
type Target struct {
	IPv4       netip.Addr
	IPv6       netip.Addr
	Port       uint16
	BrokerPort uint16
	// Others are the other guarded endpoints' addresses (ECS, Pod Identity): with IMDS's,
	// at most MaxGuarded IPv4 and MaxGuarded IPv6 ones.
	Others []netip.AddrPort
	// ContainersDeny: an allowed TCP connection from a network namespace without a
	// published broker endpoint (PublishNetns) is refused; otherwise it goes direct.
	ContainersDeny bool
}

// The kernel's enum dst kinds.
const (
	dstIPv4       = 0
	dstIPv6       = 1
	dstIPv4Mapped = 2
)

// MaxGuarded is how many IPv4 (and, apart, IPv6) destinations the programs guard.
const MaxGuarded = 4

// layoutVersion names the pin directory. Bump it when a map's layout changes: pins of
// the old layout are then left to the old agent and the new one starts a fresh set.
const layoutVersion = "v1"

// Hook owns the loaded programs, their links and the ring-buffer reader.
type Hook struct {
	objs   imdsguardObjects
	links  []attached
	reader *ringbuf.Reader
	// refused reads the ring of refused and UDP connects (events_refused): a flood of
	// them never takes the room of the events of connections that went through.
	refused *ringbuf.Reader
	pinDir  string // "" when not pinned
	spec    *ebpf.CollectionSpec
	maps    map[string]*ebpf.Map // the maps Open opened, by name, for LoadPrograms
	// denyRefused: the programs loaded make a denied connect() fail with ECONNREFUSED.
	denyRefused bool
	// execIdentity: the programs loaded judge by the identity recorded at exec (the
	// exec and fork tracing programs loaded, and Attach attached them); execWhy says why
	// not.
	execIdentity bool
	execWhy      error

	// queueDrops counts events read from the kernel but dropped because the consumer
	// was behind (the reader never blocks on it).
	queueDrops atomic.Uint64
	// aggSeen is what TakeAggregates last read of each kernel aggregate entry.
	aggSeen map[imdsguardAggKey]aggSeen
	// netns is the host network namespace cookie of the policy in force: the broker's
	// connections are looked up in it.
	netns atomic.Uint64
}

type attached struct {
	name string
	l    link.Link
}

// Load opens the maps and loads the programs: Open then LoadPrograms, quietly (see
// DenyRefused for which errno a denial gives).
func Load(t Target, pinDir string) (*Hook, error) {
	h, err := Open(t, pinDir)
	if err != nil {
		return nil, err
	}
	if err := h.LoadPrograms(zerolog.Nop()); err != nil {
		_ = h.Close()
		return nil, err
	}
	return h, nil
}

// Open creates the maps, or opens those an earlier agent pinned under pinDir, without
// loading any program: in milliseconds, the agent can beat the heartbeat and serve the
// broker the pinned programs of its predecessor redirect to, while LoadPrograms has the
// new programs verified. pinDir must be on a bpf file system.
func Open(t Target, pinDir string) (*Hook, error) {
	if !t.IPv4.Is4() || !t.IPv6.Is6() || t.Port == 0 {
		return nil, fmt.Errorf("load hooks: incomplete target %+v", t)
	}
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	spec, err := targetSpec(t)
	if err != nil {
		return nil, err
	}
	h := &Hook{spec: spec}
	opts := ebpf.CollectionOptions{}
	if pinDir != "" {
		h.pinDir = filepath.Join(pinDir, layoutVersion)
		if err := os.MkdirAll(h.pinDir, 0o700); err != nil {
			return nil, fmt.Errorf("create pin directory: %w", err)
		}
		// The pins are the policy and the heartbeat: only root may open them, even
		// where the directory existed with a looser mode.
		for _, d := range []string{filepath.Dir(h.pinDir), h.pinDir} {
			if err := os.Chmod(d, 0o700); err != nil {
				return nil, fmt.Errorf("restrict pin directory: %w", err)
			}
		}
		opts.Maps.PinPath = h.pinDir
	} else {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	}
	mapsOnly := spec.Copy()
	mapsOnly.Programs = nil
	coll, err := ebpf.NewCollectionWithOptions(mapsOnly, opts)
	if err != nil {
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("open BPF maps: pinned maps in %s have another layout (remove them with `imdsguard uninstall`): %w", h.pinDir, err)
		}
		return nil, fmt.Errorf("open BPF maps: %w", err)
	}
	// The programs get these maps (the read-only constants they make anew, see
	// LoadPrograms).
	h.maps = make(map[string]*ebpf.Map)
	for name, m := range coll.Maps {
		if !strings.HasPrefix(name, ".") {
			h.maps[name] = m
		}
	}
	if err := coll.Assign(&h.objs.imdsguardMaps); err != nil {
		coll.Close()
		return nil, fmt.Errorf("assign BPF maps: %w", err)
	}
	coll.Close() // what Assign did not take: the constants
	// The namespaces an earlier agent published had its listeners, which died with it:
	// none of them is served until this agent publishes it again.
	if err := clearMap[uint64, uint8](h.objs.NetnsBrokers); err != nil {
		_ = h.objs.Close()
		return nil, fmt.Errorf("clear published network namespaces: %w", err)
	}
	rd, err := ringbuf.NewReader(h.objs.Events)
	if err != nil {
		_ = h.objs.Close()
		return nil, fmt.Errorf("open ring buffer: %w", err)
	}
	h.reader = rd
	if h.refused, err = ringbuf.NewReader(h.objs.EventsRefused); err != nil {
		_ = rd.Close()
		_ = h.objs.Close()
		return nil, fmt.Errorf("open ring buffer: %w", err)
	}
	return h, nil
}

// clearMap deletes every entry of m.
func clearMap[K comparable, V any](m *ebpf.Map) error {
	var keys []K
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

// LoadPrograms loads and verifies the programs against the maps Open opened. Nothing is
// attached: Attach swaps them in. Where the kernel refuses bpf_set_retval in these hooks
// (before Linux 5.18), a denied connect() fails with EPERM instead of ECONNREFUSED, and
// LoadPrograms says so in log.
func (h *Hook) LoadPrograms(log zerolog.Logger) error {
	err := h.loadPrograms(true, true)
	if err != nil {
		// Without BTF tracing programs (tp_btf), task storage in them (Linux 5.11) or in
		// connect programs: the executable is judged by mm->exe_file, which a process
		// can repoint. ExecIdentityError says why, for the agent's log.
		why := err
		err = h.loadPrograms(true, false)
		h.execWhy = why
	}
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		log.Warn().Str("event", "deny_errno_eperm").Str("reason", firstLine(ve)).
			Msg("the kernel refuses bpf_set_retval in cgroup connect hooks (Linux 5.18+): denied connections fail with EPERM instead of ECONNREFUSED")
		why := h.execWhy
		err = h.loadPrograms(false, false)
		h.execWhy = why
	}
	if err == nil {
		return nil
	}
	if errors.As(err, &ve) {
		return fmt.Errorf("load BPF programs: verifier rejected them: %+v", ve)
	}
	return fmt.Errorf("load BPF programs: %w", err)
}

func (h *Hook) loadPrograms(refused, execID bool) error {
	spec := h.spec.Copy()
	if err := spec.Variables[imdsguardVarDenyRefused].Set(boolByte(refused)); err != nil {
		return fmt.Errorf("set %s: %w", imdsguardVarDenyRefused, err)
	}
	if err := spec.Variables[imdsguardVarExecIdentity].Set(boolByte(execID)); err != nil {
		return fmt.Errorf("set %s: %w", imdsguardVarExecIdentity, err)
	}
	// Discovery of new namespaces needs to know which one is the agent's (0: off).
	if err := spec.Variables[imdsguardVarHostNetnsCookie].Set(h.netns.Load()); err != nil {
		return fmt.Errorf("set %s: %w", imdsguardVarHostNetnsCookie, err)
	}
	if !execID {
		// Tracing programs do not load here (the fork program also reports the
		// network namespaces processes fork into; their first socket still does).
		delete(spec.Programs, imdsguardProgImdsExec)
		delete(spec.Programs, imdsguardProgImdsFork)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: h.maps})
	if err != nil {
		return err
	}
	defer coll.Close()
	p := &h.objs.imdsguardPrograms
	for name, dst := range map[string]**ebpf.Program{
		imdsguardProgImdsConnect4: &p.ImdsConnect4, imdsguardProgImdsConnect6: &p.ImdsConnect6,
		imdsguardProgImdsGetpeername4: &p.ImdsGetpeername4, imdsguardProgImdsGetpeername6: &p.ImdsGetpeername6,
		imdsguardProgImdsSockops: &p.ImdsSockops, imdsguardProgImdsEgress: &p.ImdsEgress,
		imdsguardProgImdsExec: &p.ImdsExec, imdsguardProgImdsFork: &p.ImdsFork,
		imdsguardProgImdsSockCreate: &p.ImdsSockCreate,
	} {
		*dst = coll.DetachProgram(name) // nil for a program not loaded
	}
	h.denyRefused = refused
	h.execIdentity = execID
	h.execWhy = nil
	return nil
}

// ExecIdentity reports whether exe rules are judged by the executable recorded at exec
// (the exec and fork tracing programs loaded and attached).
func (h *Hook) ExecIdentity() bool { return h.execIdentity }

// ExecIdentityError says why ExecIdentity is false (nil when it is true).
func (h *Hook) ExecIdentityError() error {
	if h.execIdentity {
		return nil
	}
	if h.execWhy == nil {
		return errors.New("programs not loaded")
	}
	return h.execWhy
}

// DenyRefused reports whether a denied connect() fails with ECONNREFUSED (else EPERM).
func (h *Hook) DenyRefused() bool { return h.denyRefused }

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

func firstLine(err error) string {
	s := err.Error()
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// targetSpec is the programs' spec with t baked in as constants.
func targetSpec(t Target) (*ebpf.CollectionSpec, error) {
	spec, err := loadImdsguard()
	if err != nil {
		return nil, fmt.Errorf("load BPF spec: %w", err)
	}
	// The programs compare raw context words, which hold network byte order; these
	// byte arrays are written as-is, so they land in memory in network order too.
	var ip4 [MaxGuarded][4]byte
	var ip6 [MaxGuarded][16]byte
	var port4, port6 [MaxGuarded][2]byte
	var n4, n6 uint8
	// By enum dst kind (IPv4, IPv6, IPv4-mapped) and index: the address and port as
	// events and redirect records carry them (host byte order for the port).
	var daddr [4][MaxGuarded][16]byte
	var dport [4][MaxGuarded]uint16
	all := append([]netip.AddrPort{netip.AddrPortFrom(t.IPv4, t.Port), netip.AddrPortFrom(t.IPv6, t.Port)}, t.Others...)
	for _, ap := range all {
		a, port := ap.Addr().Unmap(), [2]byte{byte(ap.Port() >> 8), byte(ap.Port())}
		switch {
		case ap.Port() == 0 || !a.IsValid():
			return nil, fmt.Errorf("load hooks: guarded destination %s has no address or port", ap)
		case a.Is4() && n4 == MaxGuarded, a.Is6() && n6 == MaxGuarded:
			return nil, fmt.Errorf("load hooks: more than %d guarded IPv4 or IPv6 destinations (endpoints): %v", MaxGuarded, all)
		case a.Is4():
			ip4[n4], port4[n4] = a.As4(), port
			copy(daddr[dstIPv4][n4][:], ip4[n4][:])
			daddr[dstIPv4Mapped][n4] = netip.AddrFrom4(ip4[n4]).As16()
			dport[dstIPv4][n4], dport[dstIPv4Mapped][n4] = ap.Port(), ap.Port()
			n4++
		default:
			ip6[n6], port6[n6] = a.As16(), port
			daddr[dstIPv6][n6], dport[dstIPv6][n6] = ip6[n6], ap.Port()
			n6++
		}
	}
	bport := [2]byte{byte(t.BrokerPort >> 8), byte(t.BrokerPort)}
	for name, val := range map[string]any{
		imdsguardVarGuardedIp4:     ip4,
		imdsguardVarGuardedPort4:   port4,
		imdsguardVarGuardedIp6:     ip6,
		imdsguardVarGuardedPort6:   port6,
		imdsguardVarGuardedDaddr:   daddr,
		imdsguardVarGuardedDport:   dport,
		imdsguardVarGuardedN4:      n4,
		imdsguardVarGuardedN6:      n6,
		imdsguardVarBrokerPort:     bport,
		imdsguardVarContainersDeny: boolByte(t.ContainersDeny),
	} {
		v, ok := spec.Variables[name]
		if !ok {
			return nil, fmt.Errorf("load BPF spec: variable %s missing", name)
		}
		if err := v.Set(val); err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
	}
	return spec, nil
}

type program struct {
	name string
	prog *ebpf.Program
	typ  ebpf.AttachType
}

func (h *Hook) programs() []program {
	return []program{
		{"connect4", h.objs.ImdsConnect4, ebpf.AttachCGroupInet4Connect},
		{"connect6", h.objs.ImdsConnect6, ebpf.AttachCGroupInet6Connect},
		{"getpeername4", h.objs.ImdsGetpeername4, ebpf.AttachCgroupInet4GetPeername},
		{"getpeername6", h.objs.ImdsGetpeername6, ebpf.AttachCgroupInet6GetPeername},
		{"sockops", h.objs.ImdsSockops, ebpf.AttachCGroupSockOps},
		{"egress", h.objs.ImdsEgress, ebpf.AttachCGroupInetEgress},
		{"sock_create", h.objs.ImdsSockCreate, ebpf.AttachCGroupInetSockCreate},
	}
}

// Attach attaches the programs to the cgroup v2 directory at path. When pinned links of
// an earlier agent exist for the same cgroup, their programs are swapped for the new
// ones in place (bpf_link_update): no connect() is ever unguarded during a restart or an
// upgrade. Pinned links for another cgroup are replaced.
func (h *Hook) Attach(path string) error {
	if err := h.setGuardedCgroup(path); err != nil {
		return err
	}
	var cgroupID uint64
	if h.pinDir != "" {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			return fmt.Errorf("stat cgroup %s: %w", path, err)
		}
		cgroupID = st.Ino
	}
	for _, p := range h.programs() {
		if h.pinDir != "" {
			pin := filepath.Join(h.pinDir, "link_"+p.name)
			if l, err := adopt(pin, p.prog, cgroupID); err != nil {
				return fmt.Errorf("adopt pinned %s: %w", p.name, err)
			} else if l != nil {
				h.links = append(h.links, attached{p.name, l})
				continue
			}
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: path, Attach: p.typ, Program: p.prog})
		if err != nil {
			return fmt.Errorf("attach %s to %s: %w", p.name, path, err)
		}
		if h.pinDir != "" {
			if err := l.Pin(filepath.Join(h.pinDir, "link_"+p.name)); err != nil {
				_ = l.Close()
				return fmt.Errorf("pin %s: %w", p.name, err)
			}
		}
		h.links = append(h.links, attached{p.name, l})
	}
	return h.attachExecTracing()
}

// setGuardedCgroup tells the programs which cgroup is guarded (its processes' new
// network namespaces are reported).
func (h *Hook) setGuardedCgroup(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open cgroup %s: %w", path, err)
	}
	defer func() { _ = unix.Close(fd) }()
	if err := h.objs.GuardedCgroup.Put(uint32(0), uint32(fd)); err != nil {
		return fmt.Errorf("set guarded cgroup: %w", err)
	}
	return nil
}

// NetnsTracing says why network namespaces are not reported as processes fork into
// them (nil: they are, by the fork tracing program).
func (h *Hook) NetnsTracing() error {
	if !h.execIdentity {
		return fmt.Errorf("the fork tracing program is not attached: %w", h.execWhy)
	}
	return nil
}

// attachExecTracing attaches the programs that record each task's executable at exec
// and fork (tracepoints sched_process_exec and sched_process_fork). A tracing link cannot
// be updated in place: the new one is attached (and pinned) before an earlier agent's is
// removed, so no exec goes unrecorded in between.
func (h *Hook) attachExecTracing() error {
	for _, p := range []struct {
		name string
		prog *ebpf.Program
	}{{"exec", h.objs.ImdsExec}, {"fork", h.objs.ImdsFork}} {
		if p.prog == nil {
			continue
		}
		l, err := link.AttachTracing(link.TracingOptions{Program: p.prog})
		if err != nil {
			// Not fatal: with nothing recorded, connect falls back to mm->exe_file
			// for every process, as where the programs do not load.
			h.execIdentity = false
			h.execWhy = fmt.Errorf("attach %s (tp_btf): %w", p.name, err)
			return nil
		}
		if h.pinDir != "" {
			pin := filepath.Join(h.pinDir, "link_"+p.name)
			if old, err := link.LoadPinnedLink(pin, nil); err == nil {
				_ = old.Unpin()
				_ = old.Close()
			} else {
				_ = os.Remove(pin)
			}
			if err := l.Pin(pin); err != nil {
				_ = l.Close()
				return fmt.Errorf("pin %s: %w", p.name, err)
			}
		}
		h.links = append(h.links, attached{p.name, l})
	}
	return nil
}

// adopt returns the pinned link at pin, updated to prog, when it guards cgroupID; nil
// when there is no usable pin (a pin for another cgroup is removed, which detaches it).
func adopt(pin string, prog *ebpf.Program, cgroupID uint64) (link.Link, error) {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		// A pin we cannot open is of no use; remove it so a fresh link can be made.
		_ = os.Remove(pin)
		return nil, nil
	}
	info, err := l.Info()
	if err == nil {
		if cg := info.Cgroup(); cg != nil && cg.CgroupId == cgroupID {
			if err := l.Update(prog); err != nil {
				_ = l.Close()
				return nil, fmt.Errorf("update program: %w", err)
			}
			return l, nil
		}
	}
	// Another cgroup (the configuration changed): detach the old one.
	_ = l.Unpin()
	_ = l.Close()
	return nil, nil
}

// Pinned reports whether the programs outlive this process.
func (h *Hook) Pinned() bool { return h.pinDir != "" }

// Detach removes unpinned programs from the cgroup. Pinned links stay attached: closing
// this process's handles does not detach them, that is the point. Use Unpin to remove.
func (h *Hook) Detach() error {
	var errs []error
	for _, a := range h.links {
		if err := a.l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", a.name, err))
		}
	}
	h.links = nil
	return errors.Join(errs...)
}

// Unpin detaches the programs and removes every pin: links and maps.
func (h *Hook) Unpin() error {
	var errs []error
	for _, a := range h.links {
		if err := a.l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", a.name, err))
		}
	}
	errs = append(errs, h.Detach())
	if h.pinDir != "" {
		errs = append(errs, h.objs.imdsguardMaps.unpin(), os.RemoveAll(h.pinDir))
		_ = os.Remove(filepath.Dir(h.pinDir)) // only if empty
	}
	return errors.Join(errs...)
}

func (m *imdsguardMaps) unpin() error {
	var errs []error
	for _, mp := range []*ebpf.Map{m.Policies, m.ActiveGen, m.Heartbeat, m.RuleUids, m.RuleGids, m.RuleExes,
		m.RuleCgroups, m.Redirects, m.BrokerConns, m.Stats, m.ExecIds, m.SkVerdicts, m.NetnsBrokers} {
		if err := mp.Unpin(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Unpin removes whatever an agent pinned under pinDir without loading anything: for
// `imdsguard uninstall` and package removal. Missing pins are not an error.
func Unpin(pinDir string) error {
	dir := filepath.Join(pinDir, layoutVersion)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read pin directory: %w", err)
	}
	var errs []error
	for _, e := range entries {
		// Removing a link's last reference (its pin, no open fd) detaches it.
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, os.Remove(dir))
	_ = os.Remove(pinDir)
	return errors.Join(errs...)
}

// Close releases this process's handles. Unpinned programs are detached; pinned ones
// keep guarding.
func (h *Hook) Close() error {
	err := h.Detach()
	if h.reader != nil {
		err = errors.Join(err, h.reader.Close())
	}
	if h.refused != nil {
		err = errors.Join(err, h.refused.Close())
	}
	return errors.Join(err, h.objs.Close())
}

// Stats are the kernel's counters and the reader's loss count.
type Stats struct {
	RingFull    uint64 // events the kernel could not write: ring buffer full
	QueueDrops  uint64 // events read but dropped: the consumer was behind
	Denied      uint64 // connect() refused by the allowlist (enforce)
	AuditDenied uint64 // connect() the allowlist would refuse (audit)
	FailOpen    uint64 // connect() let through straight to IMDS: agent gone
	FailClosed  uint64 // connect() refused: agent gone, failure_mode closed
	Redirected  uint64 // connect() sent to the broker
	// BackstopDropped counts packets to IMDS from sockets no connect() hook let through
	// to it (raw sockets, DNAT), dropped by the egress program; BackstopAudit the same
	// let through (audit mode, or no policy loaded yet).
	BackstopDropped uint64
	BackstopAudit   uint64
}

// Stats reads the counters.
func (h *Hook) Stats() (Stats, error) {
	st := Stats{QueueDrops: h.queueDrops.Load()}
	for _, c := range st.counters() {
		var perCPU []uint64
		if err := h.objs.Stats.Lookup(uint32(c.stat), &perCPU); err != nil {
			return Stats{}, fmt.Errorf("read stats map: %w", err)
		}
		*c.dst = 0
		for _, v := range perCPU {
			*c.dst += v
		}
	}
	return st, nil
}

// counters names where each of the kernel's enum stat counters goes in s.
func (s *Stats) counters() []struct {
	stat imdsguardStat
	dst  *uint64
} {
	return []struct {
		stat imdsguardStat
		dst  *uint64
	}{
		{imdsguardStatSTAT_RINGBUF_FULL, &s.RingFull},
		{imdsguardStatSTAT_DENIED, &s.Denied},
		{imdsguardStatSTAT_AUDIT_DENIED, &s.AuditDenied},
		{imdsguardStatSTAT_FAIL_OPEN, &s.FailOpen},
		{imdsguardStatSTAT_FAIL_CLOSED, &s.FailClosed},
		{imdsguardStatSTAT_REDIRECTED, &s.Redirected},
		{imdsguardStatSTAT_BACKSTOP_DROPPED, &s.BackstopDropped},
		{imdsguardStatSTAT_BACKSTOP_AUDIT, &s.BackstopAudit},
	}
}

// Beat tells the kernel the agent is alive. Without a beat for a second, the programs
// stop redirecting to the broker and apply the failure mode.
func (h *Hook) Beat() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("read clock: %w", err)
	}
	if err := h.objs.Heartbeat.Put(uint32(0), uint64(ts.Nano())); err != nil {
		return fmt.Errorf("write heartbeat: %w", err)
	}
	return nil
}

// HeartbeatTimeout is how long after the last beat the programs apply the failure mode.
const HeartbeatTimeout = time.Second

// StopBeating marks the agent as gone at once (an uninstall, or a start that failed
// before its programs were in): the failure mode applies from the next connect().
func (h *Hook) StopBeating() error {
	return h.objs.Heartbeat.Put(uint32(0), uint64(0))
}

// Linger marks the agent alive for grace more (a clean stop that leaves the programs
// pinned): the programs keep redirecting to the broker port, where the next agent
// listens, instead of applying the failure mode at once. Only the programs of this
// package's object understand a beat in the future: call it once Attach swapped them in.
func (h *Hook) Linger(grace time.Duration) error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("read clock: %w", err)
	}
	at := ts.Nano() + int64(grace) - int64(HeartbeatTimeout)
	if err := h.objs.Heartbeat.Put(uint32(0), uint64(at)); err != nil {
		return fmt.Errorf("write heartbeat: %w", err)
	}
	return nil
}

// Run reads the ring buffers and sends decoded events to out until ctx is done or the
// hook is closed. It never blocks on out: when out is full the event is counted in
// Stats().QueueDrops and dropped, so the kernel's rings keep draining. Events of refused
// and UDP connects may fill only half of out: the other half stays for the connections
// that went through, whose events the broker's request lines are named from.
//
// When ctx is done, Run first delivers what is still in the rings, then returns: detach
// before cancelling and no event is lost on shutdown.
func (h *Hook) Run(ctx context.Context, out chan<- Event) error {
	// Flush wakes a blocked read; the reader then returns what is pending, then
	// ErrFlushed.
	stop := context.AfterFunc(ctx, func() {
		_ = h.reader.Flush()
		_ = h.refused.Flush()
	})
	defer stop()
	clock := newClock()
	refusedErr := make(chan error, 1)
	go func() {
		refusedErr <- h.read(h.refused, clock, out, max(cap(out)/2, 1))
	}()
	err := h.read(h.reader, clock, out, cap(out))
	if err != nil {
		// Wake the other reader: a broken ring ends the agent's reading.
		_ = h.refused.Flush()
	}
	return errors.Join(err, <-refusedErr)
}

// read hands the events of one ring to out while out holds fewer than room.
func (h *Hook) read(rd *ringbuf.Reader, clock clock, out chan<- Event, room int) error {
	var rec ringbuf.Record
	for {
		if err := rd.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, ringbuf.ErrFlushed) {
				return nil
			}
			return fmt.Errorf("read ring buffer: %w", err)
		}
		ev, err := decode(rec.RawSample, clock)
		if err != nil {
			return err
		}
		if room < cap(out) && len(out) >= room {
			h.queueDrops.Add(1)
			continue
		}
		select {
		case out <- ev:
		default:
			h.queueDrops.Add(1)
		}
	}
}
