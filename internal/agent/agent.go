// Package agent runs imdsguard on a host: it attaches the connect hooks to the guarded
// cgroup, turns each kernel event into one enriched event line, keeps loss visible, and
// detaches cleanly on shutdown.
package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/cgroup"
	"github.com/imdsguard/imdsguard/internal/config"
	"github.com/imdsguard/imdsguard/internal/eventlog"
	"github.com/imdsguard/imdsguard/internal/hook"
	"github.com/imdsguard/imdsguard/internal/procinfo"
)

// Run guards until ctx is done, then detaches, writes out what is still queued and
// returns nil. Errors are start-up failures or a broken ring-buffer reader. Each value
// on hup reopens the events file (log rotation).
func Run(ctx context.Context, cfg config.Config, log zerolog.Logger, hup <-chan struct{}) error {
	root, err := cgroup.Root()
	if err != nil {
		return fmt.Errorf("find cgroup v2: %w", err)
	}
	dir := cfg.Cgroup
	if dir == "" {
		dir = root
	}
	if err := cgroup.Check(dir); err != nil {
		return fmt.Errorf("guarded cgroup: %w", err)
	}
	out, err := eventlog.Open(cfg.Events.Output)
	if err != nil {
		return err
	}
	defer func() {
		if err := out.Close(); err != nil {
			log.Error().Err(err).Str("event", "events_close_failed").Msg("closing events output")
		}
	}()

	tel, err := startTelemetry(cfg, log, nil)
	if err != nil {
		return err
	}
	defer tel.Close()

	h, err := hook.Load(hook.Target{IPv4: cfg.IMDS.Addr4, IPv6: cfg.IMDS.Addr6, Port: uint16(cfg.IMDS.Port)})
	if err != nil {
		return err
	}
	defer h.Close()
	// Loading parsed the kernel's BTF (megabytes) for CO-RE; hand that back now rather
	// than carry it for the agent's lifetime.
	debug.FreeOSMemory()
	if err := h.Attach(dir); err != nil {
		return err
	}
	log.Info().Str("event", "agent_started").Str("cgroup", dir).
		Str("imds_ipv4", cfg.IMDS.Addr4.String()).Str("imds_ipv6", cfg.IMDS.Addr6.String()).
		Int("imds_port", cfg.IMDS.Port).Str("events_output", cfg.Events.Output).
		Msg("hooks attached, guarding IMDS connections")
	if cfg.Agent.ReadyFile != "" {
		if err := writeReady(cfg.Agent.ReadyFile); err != nil {
			return err
		}
		defer os.Remove(cfg.Agent.ReadyFile)
	}

	resolver := procinfo.NewResolver("/proc", cgroup.NewPaths(root), 8192)
	queue := make(chan hook.Event, cfg.Agent.QueueSize)
	readCtx, stopReading := context.WithCancel(context.Background())
	defer stopReading()
	readErr := make(chan error, 1)
	go func() {
		readErr <- h.Run(readCtx, queue)
		close(queue)
	}()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ev := range queue {
			rec := record(ev, resolver)
			out.Write(rec)
			tel.observeConnect(rec)
			if len(queue) == 0 {
				if err := out.Flush(); err != nil {
					log.Error().Err(err).Str("event", "events_write_failed").Msg("writing events")
				}
			}
		}
		_ = out.Flush()
	}()

	stats := newStatsReporter(h, log, tel.observeDrops)
	ticker := time.NewTicker(cfg.Agent.StatsInterval)
	defer ticker.Stop()
	var runErr error
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err := <-readErr:
			runErr = fmt.Errorf("event reader stopped: %w", err)
			readErr <- err
			break loop
		case <-ticker.C:
			stats.report()
		case <-hup:
			if err := tel.reopen(); err != nil {
				log.Error().Err(err).Str("event", "emf_reopen_failed").Msg("reopening EMF output")
			}
			if err := out.Reopen(); err != nil {
				log.Error().Err(err).Str("event", "events_reopen_failed").Msg("reopening events output")
			} else {
				log.Info().Str("event", "events_reopened").Msg("events output reopened")
			}
		}
	}
	// Detach first so that no new event arrives, then drain the ring and the queue.
	if err := h.Detach(); err != nil {
		log.Error().Err(err).Str("event", "detach_failed").Msg("detaching hooks")
	}
	stopReading()
	if err := <-readErr; err != nil && runErr == nil {
		runErr = fmt.Errorf("event reader: %w", err)
	}
	wg.Wait()
	stats.report()
	log.Info().Str("event", "agent_stopped").Msg("hooks detached, events flushed")
	return runErr
}

func record(ev hook.Event, r *procinfo.Resolver) eventlog.Record {
	info := r.Resolve(procinfo.Process{
		PID: ev.PID, StartBoottime: ev.StartBoottime, UID: ev.UID, CgroupID: ev.CgroupID,
		ExePath: ev.ExePath, ExeDev: ev.ExeDev, ExeIno: ev.ExeIno,
	})
	return eventlog.Record{
		Time: ev.Time, PID: ev.PID, TID: ev.TID, PPID: ev.PPID, UID: ev.UID, GID: ev.GID,
		User: info.User, Comm: ev.Comm, Exe: info.Exe,
		ExeTruncated: ev.ExeTruncated && info.Exe == ev.ExePath,
		Cmdline:      info.Cmdline, Cgroup: info.Cgroup, CgroupID: ev.CgroupID, Unit: info.Unit,
		ContainerID: info.ContainerID, Netns: ev.NetnsCookie, SocketCookie: ev.SocketCookie,
		Dst: ev.Dst.String(), Verdict: ev.Verdict.String(), Missing: info.Missing,
	}
}

func writeReady(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create ready file directory: %w", err)
	}
	if err := os.WriteFile(path, []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o644); err != nil {
		return fmt.Errorf("write ready file: %w", err)
	}
	return nil
}

// statsReporter logs loss counters when they grow: loss is never silent, and a quiet
// agent does not repeat itself.
type statsReporter struct {
	h       *hook.Hook
	log     zerolog.Logger
	last    hook.Stats
	dropped func(n uint64) // told how many events were lost since the last report
}

func newStatsReporter(h *hook.Hook, log zerolog.Logger, dropped func(uint64)) *statsReporter {
	return &statsReporter{h: h, log: log, dropped: dropped}
}

func (s *statsReporter) report() {
	st, err := s.h.Stats()
	if err != nil {
		s.log.Error().Err(err).Str("event", "stats_failed").Msg("reading loss counters")
		return
	}
	if st == s.last {
		return
	}
	s.log.Warn().Str("event", "events_dropped").
		Uint64("ring_full", st.RingFull).Uint64("queue_full", st.QueueDrops).
		Uint64("ring_full_new", st.RingFull-s.last.RingFull).Uint64("queue_full_new", st.QueueDrops-s.last.QueueDrops).
		Msg("IMDS connect events were lost: the agent could not keep up")
	s.dropped(st.RingFull - s.last.RingFull + st.QueueDrops - s.last.QueueDrops)
	s.last = st
}
