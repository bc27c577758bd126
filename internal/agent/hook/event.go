package hook

import (
	"bytes"
	"fmt"
	"net/netip"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Event is one connect() to IMDS as the kernel saw it. Every field here was recorded in
// the kernel at connect time, so it stays true after the process has exited.
type Event struct {
	Time          time.Time
	StartBoottime uint64 // task start, ns since boot; with PID it names one process
	PID           uint32 // thread-group id in the host's pid namespace
	TID           uint32
	PPID          uint32 // parent's thread-group id at connect time
	UID, GID      uint32
	Comm          string
	CgroupID      uint64
	NetnsCookie   uint64
	SocketCookie  uint64
	Dst           netip.AddrPort
	// ExePath is the executable's path as the kernel walked it at connect time
	// (relative to the root of the process's mount tree), "" for kernel threads.
	// ExeDev (user-space encoding) and ExeIno identify the file itself.
	ExePath string
	// ExeTruncated says ExePath holds only the last components of a deeper path.
	ExeTruncated bool
	ExeDev       uint64
	ExeIno       uint64
	Verdict      Verdict
	// Rule is the index of the first matching allowlist rule, -1 when the default
	// applied (or no policy was loaded).
	Rule       int
	Redirected bool // sent to the broker
	V2Required bool // the matching rule requires IMDSv2
	// Agent says the socket was one of the agent's own (RegisterOwnSocket): passed
	// unjudged.
	Agent bool
	// NoBroker says the connection could not be brokered (another network namespace,
	// not TCP, or no listener of the agent's for its family); with V2Required it was
	// refused for that.
	NoBroker bool
	// ExeBorrowed says the process's mm->exe_file (what /proc/PID/exe and ExePath name)
	// is not the file it exec'd, which ExeDev and ExeIno are: it repointed it
	// (prctl PR_SET_MM_MAP). Only where executables are recorded at exec.
	ExeBorrowed bool
}

// Verdict is what the kernel did with the connect().
type Verdict uint8

// Verdicts: the kernel's enum verdict, as bpf2go generated it from bpf/.
const (
	VerdictAllow      = Verdict(imdsguardVerdictVERDICT_ALLOW)
	VerdictDeny       = Verdict(imdsguardVerdictVERDICT_DENY)        // EPERM: the allowlist refused it (enforce)
	VerdictAuditDeny  = Verdict(imdsguardVerdictVERDICT_AUDIT_DENY)  // allowed, but the allowlist would refuse it (audit)
	VerdictFailOpen   = Verdict(imdsguardVerdictVERDICT_FAIL_OPEN)   // agent gone: let through straight to IMDS
	VerdictFailClosed = Verdict(imdsguardVerdictVERDICT_FAIL_CLOSED) // agent gone: EPERM
)

func (v Verdict) String() string {
	switch v {
	case VerdictAllow:
		return "allow"
	case VerdictDeny:
		return "deny"
	case VerdictAuditDeny:
		return "audit_deny"
	case VerdictFailOpen:
		return "fail_open"
	case VerdictFailClosed:
		return "fail_closed"
	}
	return fmt.Sprintf("verdict(%d)", uint8(v))
}

var rawEventSize = int(unsafe.Sizeof(imdsguardEvent{}))

func decode(sample []byte, c clock) (Event, error) {
	if len(sample) < rawEventSize {
		return Event{}, fmt.Errorf("decode event: %d bytes, want %d", len(sample), rawEventSize)
	}
	// The sample is the C struct in this machine's layout (bpf2go generated the Go
	// type from the same BTF): read it in place instead of decoding field by field,
	// which costs microseconds per event with reflection.
	raw := (*imdsguardEvent)(unsafe.Pointer(unsafe.SliceData(sample)))
	return fromRaw(raw, c), nil
}

func fromRaw(r *imdsguardEvent, c clock) Event {
	ev := Event{
		Time:          c.wall(r.KtimeNs),
		StartBoottime: r.StartBoottime,
		PID:           r.Tgid,
		TID:           r.Tid,
		PPID:          r.Ppid,
		UID:           r.Uid,
		GID:           r.Gid,
		Comm:          cString(r.Comm[:]),
		CgroupID:      r.CgroupId,
		NetnsCookie:   r.NetnsCookie,
		SocketCookie:  r.SocketCookie,
		ExeIno:        r.ExeIno,
		Verdict:       Verdict(r.Verdict),
		Rule:          ruleIndex(r.Rule),
		Redirected:    r.Flags&flagRedirected != 0,
		V2Required:    r.Flags&flagV2Required != 0,
		Agent:         r.Flags&flagAgent != 0,
		NoBroker:      r.Flags&flagNoBroker != 0,
		ExeBorrowed:   r.Flags&flagBorrowed != 0,
	}
	if r.ExeIno != 0 {
		// Kernel dev_t is major<<20|minor; stat(2) uses the glibc encoding.
		ev.ExeDev = unix.Mkdev(r.ExeDev>>20, r.ExeDev&(1<<20-1))
	}
	var addr netip.Addr
	if r.Family == unix.AF_INET {
		addr = netip.AddrFrom4([4]byte(r.Daddr[:4]))
	} else {
		addr = netip.AddrFrom16(r.Daddr)
	}
	ev.Dst = netip.AddrPortFrom(addr, r.Dport)
	depth := min(int(r.ExeDepth), len(r.ExeNames))
	if depth > 0 {
		parts := make([]string, depth)
		for i := 0; i < depth; i++ {
			parts[depth-1-i] = cString(r.ExeNames[i][:])
		}
		ev.ExePath = "/" + strings.Join(parts, "/")
		ev.ExeTruncated = r.ExeTruncated != 0
	}
	return ev
}

func cString(b []int8) string {
	u := unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(b))), len(b))
	if i := bytes.IndexByte(u, 0); i >= 0 {
		u = u[:i]
	}
	return string(u)
}

// clock turns bpf_ktime_get_ns (CLOCK_MONOTONIC) into wall time.
type clock struct{ offset time.Duration }

func newClock() clock {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return clock{offset: time.Duration(time.Now().UnixNano() - ts.Nano())}
}

func (c clock) wall(ktime uint64) time.Time {
	return time.Unix(0, int64(ktime)+int64(c.offset))
}
