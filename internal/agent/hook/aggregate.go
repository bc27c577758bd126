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
	// Count is how many connects wrote no event; First and Last when the first and
	// the last of the kind happened (First is the evented one's when it wrote one).
	Count       uint64
	First, Last time.Time
}

// TakeAggregates removes every per-process count from the kernel and returns those that
// counted a connect without an event. The next connect of each kind writes an event
// again: one event per process and kind per call, however many connects.
func (h *Hook) TakeAggregates() ([]Aggregate, error) {
	var (
		key  imdsguardAggKey
		keys []imdsguardAggKey
	)
	var val imdsguardAgg
	it := h.objs.Aggregates.Iterate()
	for it.Next(&key, &val) {
		keys = append(keys, key)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list aggregates: %w", err)
	}
	clock := newClock()
	var out []Aggregate
	for _, k := range keys {
		if err := h.objs.Aggregates.LookupAndDelete(k, &val); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				continue // evicted meanwhile
			}
			return out, fmt.Errorf("take aggregate: %w", err)
		}
		if val.Count == 0 {
			continue // its one connect wrote its event
		}
		a := Aggregate{
			PID: k.Tgid, StartBoottime: val.StartBoottime, UID: val.Uid, GID: val.Gid,
			CgroupID: val.CgroupId, NetnsCookie: val.NetnsCookie, ExeIno: val.ExeIno,
			Family: val.Family, UDP: k.Udp != 0, Verdict: Verdict(k.Verdict), Rule: ruleIndex(k.Rule),
			V2Required: k.Flags&flagV2Required != 0, NoBroker: k.Flags&flagNoBroker != 0,
			Count: val.Count, First: clock.wall(val.FirstNs), Last: clock.wall(val.LastNs),
		}
		if val.ExeIno != 0 {
			a.ExeDev = unix.Mkdev(val.ExeDev>>20, val.ExeDev&(1<<20-1))
		}
		out = append(out, a)
	}
	return out, nil
}
