package hook

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// MaxRules is how many rules the kernel evaluates: one bit each in a 64-bit mask.
const MaxRules = 64

// ExeID identifies an executable file as the kernel sees it.
type ExeID struct {
	Dev uint64 // user-space encoding (stat's st_dev)
	Ino uint64
}

// KernelRule is one allowlist rule with its criteria resolved to kernel identities. A
// rule matches when every criterion it has matches; a criterion that resolved to an
// empty set (a user that does not exist, an executable not installed) never matches.
type KernelRule struct {
	Allow      bool
	V2Required bool
	UIDs       []uint32
	GIDs       []uint32
	Exes       []ExeID
	Cgroups    []uint64 // matches these cgroups and everything below them
	HasUID     bool
	HasGID     bool
	HasExe     bool
	HasCgroup  bool
}

// KernelPolicy is what the programs decide with.
type KernelPolicy struct {
	Rules        []KernelRule // ordered; first match wins
	DefaultAllow bool
	Enforce      bool   // false: audit, deny decisions are only recorded
	FailClosed   bool   // agent gone: EPERM instead of straight to IMDS
	BrokerPort   uint16 // 0: no broker, allowed connections go straight to IMDS
	// BrokerIPv4 and BrokerIPv6 say which loopback listeners the agent holds: a
	// family whose port someone else took first is never redirected.
	BrokerIPv4, BrokerIPv6 bool
	// AgentTGID is the agent's process id in the host's pid namespace: with the
	// socket cookies it registers (RegisterOwnSocket), it names the agent's own
	// sockets, which pass unjudged.
	AgentTGID uint32
	HostNetns uint64 // netns cookie whose connections may be redirected
	// EventsUDP: a UDP connect() to IMDS writes an event the first time per process
	// and flush (as a refused one does); otherwise UDP connects are only counted in
	// summaries (Aggregates).
	EventsUDP bool
}

// SetPolicy writes p into the inactive generation of the policy maps, then flips the
// active generation with a single 4-byte map write: a connect() sees the old policy or
// the new one, never a mix.
func (h *Hook) SetPolicy(p KernelPolicy) error {
	if len(p.Rules) > MaxRules {
		return fmt.Errorf("set policy: %d rules, at most %d", len(p.Rules), MaxRules)
	}
	var cur uint32
	if err := h.objs.ActiveGen.Lookup(uint32(0), &cur); err != nil {
		return fmt.Errorf("read active policy generation: %w", err)
	}
	gen := (cur & 1) ^ 1
	if err := h.clearGen(gen); err != nil {
		return err
	}
	kp := imdsguardPolicy{
		Nrules: uint32(len(p.Rules)), AgentTgid: p.AgentTGID, HostNetns: p.HostNetns,
		BrokerPort:   p.BrokerPort>>8 | p.BrokerPort<<8, // network byte order in memory
		DefaultAllow: b2u(p.DefaultAllow), Enforce: b2u(p.Enforce), FailClosed: b2u(p.FailClosed), Loaded: 1,
		EventsUdp: b2u(p.EventsUDP),
	}
	uids, gids := map[uint32]uint64{}, map[uint32]uint64{}
	exes, cgroups := map[ExeID]uint64{}, map[uint64]uint64{}
	for i, r := range p.Rules {
		bit := uint64(1) << i
		if r.Allow {
			kp.Allow |= bit
		}
		if r.V2Required {
			kp.V2Required |= bit
		}
		if r.HasUID {
			kp.HasUid |= bit
		}
		if r.HasGID {
			kp.HasGid |= bit
		}
		if r.HasExe {
			kp.HasExe |= bit
		}
		if r.HasCgroup {
			kp.HasCgroup |= bit
		}
		for _, u := range r.UIDs {
			uids[u] |= bit
		}
		for _, g := range r.GIDs {
			gids[g] |= bit
		}
		for _, e := range r.Exes {
			exes[e] |= bit
		}
		for _, c := range r.Cgroups {
			cgroups[c] |= bit
		}
	}
	if p.BrokerIPv4 {
		kp.BrokerFamilies |= uint8(imdsguardBrokerFamilyBROKER_IPV4)
	}
	if p.BrokerIPv6 {
		kp.BrokerFamilies |= uint8(imdsguardBrokerFamilyBROKER_IPV6)
	}
	for id, bits := range uids {
		if err := h.objs.RuleUids.Put(imdsguardIdKey{Gen: gen, Id: id}, bits); err != nil {
			return fmt.Errorf("write uid rule: %w", err)
		}
	}
	for id, bits := range gids {
		if err := h.objs.RuleGids.Put(imdsguardIdKey{Gen: gen, Id: id}, bits); err != nil {
			return fmt.Errorf("write gid rule: %w", err)
		}
	}
	for e, bits := range exes {
		if err := h.objs.RuleExes.Put(imdsguardExeKey{Gen: gen, Dev: kernelDev(e.Dev), Ino: e.Ino}, bits); err != nil {
			return fmt.Errorf("write exe rule: %w", err)
		}
	}
	for id, bits := range cgroups {
		if err := h.objs.RuleCgroups.Put(imdsguardCgroupKey{Gen: uint64(gen), Id: id}, bits); err != nil {
			return fmt.Errorf("write cgroup rule: %w", err)
		}
	}
	if err := h.objs.Policies.Put(gen, kp); err != nil {
		return fmt.Errorf("write policy: %w", err)
	}
	if err := h.objs.ActiveGen.Put(uint32(0), gen); err != nil {
		return fmt.Errorf("activate policy: %w", err)
	}
	h.netns.Store(p.HostNetns)
	return nil
}

// clearGen removes every rule entry of generation gen (the inactive one).
func (h *Hook) clearGen(gen uint32) error {
	var errs []error
	errs = append(errs, deleteWhere(h.objs.RuleUids, func(k imdsguardIdKey) bool { return k.Gen == gen }))
	errs = append(errs, deleteWhere(h.objs.RuleGids, func(k imdsguardIdKey) bool { return k.Gen == gen }))
	errs = append(errs, deleteWhere(h.objs.RuleExes, func(k imdsguardExeKey) bool { return k.Gen == gen }))
	errs = append(errs, deleteWhere(h.objs.RuleCgroups, func(k imdsguardCgroupKey) bool { return k.Gen == uint64(gen) }))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clear inactive policy: %w", err)
	}
	return nil
}

func deleteWhere[K any](m *ebpf.Map, match func(K) bool) error {
	var doomed []K
	var k K
	var v uint64
	it := m.Iterate()
	for it.Next(&k, &v) {
		if match(k) {
			doomed = append(doomed, k)
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range doomed {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

// kernelDev converts stat's st_dev to the kernel's major<<20|minor.
func kernelDev(dev uint64) uint32 {
	return unix.Major(dev)<<20 | unix.Minor(dev)
}

func b2u(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// SetHostNetns names the network namespace whose connections the broker looks up before
// the first SetPolicy: a restarted agent's broker serves connections the pinned programs
// redirected (under the policy of the agent before) from its first accept.
func (h *Hook) SetHostNetns(cookie uint64) { h.netns.Store(cookie) }
