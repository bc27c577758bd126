package hook

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Aggregate is a process's refused or UDP connects that wrote no event of their own: the
// kernel writes an event for the first of a kind and counts the rest here, so a flood
// costs one event and one summary per process per flush.
type Aggregate struct {
	PID           uint32
	StartBoottime uint64
	UID, GID      uint32
	CgroupID      uint64
	NetnsCookie   uint64
	ExeDev        uint64 // user-space encoding
	ExeIno        uint64
	Family        uint16 // AF_INET or AF_INET6, as the first of them called
	UDP           bool
	Verdict       Verdict
	Rule          int // -1: the default applied
	V2Required    bool
	NoBroker      bool
	// Backstop says these were packets the egress program saw from a socket no connect()
	// hook let through to IMDS (raw sockets, DNAT): dropped (VerdictDeny) or, in audit
	// mode, let through (VerdictAuditDeny). Count counts packets; no event precedes it.
	Backstop    bool
	ExeBorrowed bool
	// Count is how many connects wrote no event; First and Last when the first and
	// the last of the kind happened (First is the evented one's when it wrote one).
	Count       uint64
	First, Last time.Time
}

// TakeAggregates returns, per process and kind, the connects the kernel counted
// without an event since the last call. Entries stay in the kernel while they count (so
// no increment races a delete); one that counted nothing since the last call is removed,
// and the next connect of its kind writes an event again. Not safe for concurrent use.
func (h *Hook) TakeAggregates() ([]Aggregate, error) {
	type entry struct {
		key imdsguardAggKey
		val imdsguardAgg
	}
	var (
		key     imdsguardAggKey
		val     imdsguardAgg
		entries []entry
	)
	it := h.objs.Aggregates.Iterate()
	for it.Next(&key, &val) {
		entries = append(entries, entry{key, val})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list aggregates: %w", err)
	}
	if h.aggSeen == nil {
		h.aggSeen = map[imdsguardAggKey]aggSeen{}
	}
	clock := newClock()
	var out []Aggregate
	live := make(map[imdsguardAggKey]bool, len(entries))
	for _, e := range entries {
		k, v := e.key, e.val
		live[k] = true
		seen, known := h.aggSeen[k]
		if known && seen.start != v.FirstNs {
			known, seen = false, aggSeen{} // another entry under the same key
		}
		if v.Count == seen.count {
			if known {
				// Idle for a whole call: the process stopped. Rarely, a connect
				// counted between the read and the delete is lost.
				if err := h.objs.Aggregates.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
					return out, fmt.Errorf("remove aggregate: %w", err)
				}
				delete(h.aggSeen, k)
			} else {
				h.aggSeen[k] = aggSeen{start: v.FirstNs, count: v.Count, last: v.LastNs}
			}
			continue
		}
		first := v.FirstNs
		if known {
			first = seen.last
		}
		h.aggSeen[k] = aggSeen{start: v.FirstNs, count: v.Count, last: v.LastNs}
		a := Aggregate{
			PID: k.Tgid, StartBoottime: v.StartBoottime, UID: v.Uid, GID: v.Gid,
			CgroupID: v.CgroupId, NetnsCookie: v.NetnsCookie, ExeIno: v.ExeIno,
			Family: v.Family, UDP: k.Udp != 0, Verdict: Verdict(k.Verdict), Rule: ruleIndex(k.Rule),
			V2Required: k.Flags&flagV2Required != 0, NoBroker: k.Flags&flagNoBroker != 0,
			Backstop: k.Flags&flagBackstop != 0, ExeBorrowed: k.Flags&flagBorrowed != 0,
			Count: v.Count - seen.count, First: clock.wall(first), Last: clock.wall(v.LastNs),
		}
		if v.ExeIno != 0 {
			a.ExeDev = unix.Mkdev(v.ExeDev>>20, v.ExeDev&(1<<20-1))
		}
		out = append(out, a)
	}
	for k := range h.aggSeen {
		if !live[k] {
			delete(h.aggSeen, k) // evicted by the kernel (LRU)
		}
	}
	return out, nil
}

// aggSeen is what TakeAggregates last read of one kernel entry.
type aggSeen struct {
	start, last uint64 // the entry's first_ns (names it) and last_ns
	count       uint64
}
