package hook

import (
	"context"
	"errors"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf/ringbuf"
)

// NetnsSeen is the first socket() the programs saw in a network namespace other than
// the agent's, from the guarded cgroup: a container's namespace as it is set up (runc
// init's netlink socket, before the container's process runs).
type NetnsSeen struct {
	NetnsCookie   uint64
	PID           uint32 // the process that made the socket (thread-group id)
	PPID          uint32
	StartBoottime uint64 // its start, ns since boot
	CgroupID      uint64 // its cgroup, where the namespace's later processes are too
}

// RunDiscovery hands each namespace the programs report to fn, once per namespace
// while these programs are attached, until ctx is done or the hook is closed. fn runs
// on the reading goroutine: it must not block. Discovery is off (nothing is reported)
// when the host namespace was not known at LoadPrograms (SetHostNetns).
func (h *Hook) RunDiscovery(ctx context.Context, fn func(NetnsSeen)) error {
	rd, err := ringbuf.NewReader(h.objs.NetnsEvents)
	if err != nil {
		return fmt.Errorf("open namespace ring buffer: %w", err)
	}
	defer func() { _ = rd.Close() }()
	stop := context.AfterFunc(ctx, func() { _ = rd.Close() })
	defer stop()
	var rec ringbuf.Record
	for {
		if err := rd.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read namespace ring buffer: %w", err)
		}
		if len(rec.RawSample) < int(unsafe.Sizeof(imdsguardNetnsSeenEvent{})) {
			return fmt.Errorf("decode namespace event: %d bytes", len(rec.RawSample))
		}
		e := (*imdsguardNetnsSeenEvent)(unsafe.Pointer(unsafe.SliceData(rec.RawSample)))
		fn(NetnsSeen{NetnsCookie: e.NetnsCookie, PID: e.Tgid, PPID: e.Ppid, StartBoottime: e.StartBoottime, CgroupID: e.CgroupId})
	}
}
