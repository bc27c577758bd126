// Package hook loads imdsguard's connect4/connect6 programs into the kernel, attaches
// them to one cgroup v2 directory and reads the events they record for every connect()
// to the Instance Metadata Service.
package hook

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
)

// Target is the IMDS endpoint the programs watch for, fixed at load time.
type Target struct {
	IPv4 netip.Addr
	IPv6 netip.Addr
	Port uint16
}

// Hook owns the loaded programs, their links and the ring-buffer reader.
type Hook struct {
	objs   imdsguardObjects
	links  []link.Link
	reader *ringbuf.Reader

	// queueDrops counts events read from the kernel but dropped because the consumer
	// was behind (the reader never blocks on it).
	queueDrops atomic.Uint64
}

// Load loads the programs with the target baked in as constants.
func Load(t Target) (*Hook, error) {
	if !t.IPv4.Is4() || !t.IPv6.Is6() || t.Port == 0 {
		return nil, fmt.Errorf("load hooks: incomplete target %+v", t)
	}
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	spec, err := loadImdsguard()
	if err != nil {
		return nil, fmt.Errorf("load BPF spec: %w", err)
	}
	ip4 := t.IPv4.As4()
	ip6 := t.IPv6.As16()
	port := [2]byte{byte(t.Port >> 8), byte(t.Port)}
	// The programs compare raw context words, which hold network byte order; these
	// byte arrays are written as-is, so they land in memory in network order too.
	for name, val := range map[string]any{
		imdsguardVarImdsIp4:  ip4,
		imdsguardVarImdsIp6:  ip6,
		imdsguardVarImdsPort: port,
	} {
		v, ok := spec.Variables[name]
		if !ok {
			return nil, fmt.Errorf("load BPF spec: variable %s missing", name)
		}
		if err := v.Set(val); err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
	}
	h := &Hook{}
	if err := spec.LoadAndAssign(&h.objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load BPF programs: verifier rejected them: %+v", ve)
		}
		return nil, fmt.Errorf("load BPF programs: %w", err)
	}
	rd, err := ringbuf.NewReader(h.objs.Events)
	if err != nil {
		h.objs.Close()
		return nil, fmt.Errorf("open ring buffer: %w", err)
	}
	h.reader = rd
	return h, nil
}

// Attach attaches both programs to the cgroup v2 directory at path.
func (h *Hook) Attach(path string) error {
	for _, a := range []struct {
		name string
		prog *ebpf.Program
		typ  ebpf.AttachType
	}{
		{"connect4", h.objs.ImdsConnect4, ebpf.AttachCGroupInet4Connect},
		{"connect6", h.objs.ImdsConnect6, ebpf.AttachCGroupInet6Connect},
	} {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: path, Attach: a.typ, Program: a.prog})
		if err != nil {
			return fmt.Errorf("attach %s to %s: %w", a.name, path, err)
		}
		h.links = append(h.links, l)
	}
	return nil
}

// Detach removes the programs from the cgroup; connects from then on are not seen.
func (h *Hook) Detach() error {
	var errs []error
	for _, l := range h.links {
		if err := l.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	h.links = nil
	return errors.Join(errs...)
}

// Close detaches, stops the reader and frees the programs and maps.
func (h *Hook) Close() error {
	err := h.Detach()
	if h.reader != nil {
		err = errors.Join(err, h.reader.Close())
	}
	return errors.Join(err, h.objs.Close())
}

// Stats are the loss counters: both must stay visible, never silent.
type Stats struct {
	RingFull   uint64 // events the kernel could not write: ring buffer full
	QueueDrops uint64 // events read but dropped: the consumer was behind
}

// Stats reads the loss counters.
func (h *Hook) Stats() (Stats, error) {
	var perCPU []uint64
	if err := h.objs.Stats.Lookup(uint32(0), &perCPU); err != nil {
		return Stats{}, fmt.Errorf("read stats map: %w", err)
	}
	var s Stats
	for _, v := range perCPU {
		s.RingFull += v
	}
	s.QueueDrops = h.queueDrops.Load()
	return s, nil
}

// Run reads the ring buffer and sends decoded events to out until ctx is done or the
// hook is closed. It never blocks on out: when out is full the event is counted in
// Stats().QueueDrops and dropped, so the kernel's ring keeps draining.
//
// When ctx is done, Run first delivers what is still in the ring, then returns: detach
// before cancelling and no event is lost on shutdown.
func (h *Hook) Run(ctx context.Context, out chan<- Event) error {
	// Flush wakes a blocked read; the reader then returns what is pending, then
	// ErrFlushed.
	stop := context.AfterFunc(ctx, func() { _ = h.reader.Flush() })
	defer stop()
	clock := newClock()
	var rec ringbuf.Record
	for {
		if err := h.reader.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, ringbuf.ErrFlushed) {
				return nil
			}
			return fmt.Errorf("read ring buffer: %w", err)
		}
		ev, err := decode(rec.RawSample, clock)
		if err != nil {
			return err
		}
		select {
		case out <- ev:
		default:
			h.queueDrops.Add(1)
		}
	}
}
