package hook

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Redirect is the kernel's record of a connection it sent to the broker, taken at
// connect() time.
type Redirect struct {
	SocketCookie  uint64
	StartBoottime uint64
	ExeDev        uint64 // user-space encoding
	ExeIno        uint64
	PID, TID      uint32
	UID, GID      uint32
	CgroupID      uint64
	Dst           netip.AddrPort // what the client asked for
	Rule          int            // -1: no rule matched, the default applied
	V2Required    bool
	Verdict       Verdict
}

// ErrNotRedirected means a connection reached the broker without the kernel having
// redirected it: somebody dialled the broker port directly. The broker refuses those.
var ErrNotRedirected = errors.New("connection was not redirected by the kernel")

// LookupRedirect finds the record of the connection the broker accepted from client on
// its address server, in the host's network namespace. The kernel keyed it by the whole
// connection at connect time, so another connection from the same port (another
// address, or outside the guarded cgroup) finds nothing. The entry is consumed: ports
// are reused.
func (h *Hook) LookupRedirect(client, server netip.AddrPort) (Redirect, error) {
	return h.LookupRedirectIn(h.netns.Load(), client, server)
}

// LookupRedirectIn is LookupRedirect for a connection accepted on a listener in the
// network namespace netns (a container's, see PublishNetns): the kernel redirected the
// connection to the broker's port inside that namespace and keyed it by its cookie.
func (h *Hook) LookupRedirectIn(netns uint64, client, server netip.AddrPort) (Redirect, error) {
	k := imdsguardConnKey{
		Netns:  netns,
		Client: client.Addr().As16(), Server: server.Addr().As16(),
		ClientPort: client.Port(), ServerPort: server.Port(),
	}
	var cookie uint64
	if err := h.objs.BrokerConns.LookupAndDelete(k, &cookie); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Redirect{}, ErrNotRedirected
		}
		return Redirect{}, fmt.Errorf("look up broker connection from %s: %w", client, err)
	}
	var r imdsguardRedirect
	if err := h.objs.Redirects.Lookup(cookie, &r); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Redirect{}, ErrNotRedirected
		}
		return Redirect{}, fmt.Errorf("look up redirect: %w", err)
	}
	var addr netip.Addr
	if r.Family == unix.AF_INET {
		addr = netip.AddrFrom4([4]byte(r.Daddr[:4]))
	} else {
		addr = netip.AddrFrom16(r.Daddr)
	}
	var exeDev uint64
	if r.ExeIno != 0 {
		exeDev = unix.Mkdev(r.ExeDev>>20, r.ExeDev&(1<<20-1))
	}
	return Redirect{
		SocketCookie: cookie, StartBoottime: r.StartBoottime, ExeDev: exeDev, ExeIno: r.ExeIno,
		PID: r.Tgid, TID: r.Tid, UID: r.Uid, GID: r.Gid, CgroupID: r.CgroupId,
		Dst: netip.AddrPortFrom(addr, r.Dport), Rule: ruleIndex(r.Rule),
		V2Required: r.Flags&flagV2Required != 0, Verdict: Verdict(r.Verdict),
	}, nil
}

// PublishNetns tells the kernel that the broker listens at its port on loopback inside
// the network namespace cookie, for IPv4 and or IPv6: the programs redirect that
// namespace's connections of those families to it. Publish only once the listeners
// accept; with neither family it unpublishes.
func (h *Hook) PublishNetns(cookie uint64, ipv4, ipv6 bool) error {
	var fams uint8
	if ipv4 {
		fams |= uint8(imdsguardBrokerFamilyBROKER_IPV4)
	}
	if ipv6 {
		fams |= uint8(imdsguardBrokerFamilyBROKER_IPV6)
	}
	if fams == 0 {
		return h.UnpublishNetns(cookie)
	}
	if err := h.objs.NetnsBrokers.Put(cookie, fams); err != nil {
		return fmt.Errorf("publish network namespace %d: %w", cookie, err)
	}
	return nil
}

// UnpublishNetns withdraws the namespace's endpoint (before its listeners close): its
// connections get containers.fallback from then on. An endpoint not published is no
// error.
func (h *Hook) UnpublishNetns(cookie uint64) error {
	if err := h.objs.NetnsBrokers.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unpublish network namespace %d: %w", cookie, err)
	}
	return nil
}

// RegisterOwnSocket tells the kernel that the socket fd, not yet connected, is the
// agent's own: its connect() to IMDS passes unjudged and unredirected (with an event),
// as long as the caller is the agent's process (KernelPolicy.AgentTGID) in the host's
// network namespace. The socket is named by its cookie, which no other process can
// give to a socket of its own; the map holding it is not pinned.
func (h *Hook) RegisterOwnSocket(fd int) error {
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return fmt.Errorf("read socket cookie: %w", err)
	}
	if err := h.objs.OwnSockets.Put(cookie, uint8(1)); err != nil {
		return fmt.Errorf("register own socket: %w", err)
	}
	return nil
}

// The kernel's enum flag and enum rule, in the width of the fields that hold them.
const (
	flagRedirected = uint8(imdsguardFlagFLAG_REDIRECTED)
	flagV2Required = uint8(imdsguardFlagFLAG_V2REQUIRED)
	flagAgent      = uint8(imdsguardFlagFLAG_AGENT)
	flagNoBroker   = uint8(imdsguardFlagFLAG_NO_BROKER)
	flagBorrowed   = uint8(imdsguardFlagFLAG_EXE_BORROWED)
	flagBackstop   = uint8(imdsguardFlagFLAG_BACKSTOP)
	ruleNone       = uint8(imdsguardRuleRULE_NONE)
)

func ruleIndex(r uint8) int {
	if r == ruleNone {
		return -1
	}
	return int(r)
}
