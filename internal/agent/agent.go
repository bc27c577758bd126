// Package agent runs imdsguard on a host: it attaches the kernel programs to the guarded
// cgroup (adopting the pinned ones of an earlier agent), keeps the allowlist in the
// kernel current, serves the broker, turns kernel events and broker requests into event
// lines, keeps loss visible, and hands the host back to the pinned programs, or detaches
// them, on shutdown.
package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/broker"
	"github.com/imdsguard/imdsguard/internal/cgroup"
	"github.com/imdsguard/imdsguard/internal/config"
	"github.com/imdsguard/imdsguard/internal/eventlog"
	"github.com/imdsguard/imdsguard/internal/hook"
	"github.com/imdsguard/imdsguard/internal/procinfo"
	"github.com/imdsguard/imdsguard/internal/usage"
)

// Options are what the command line gives the agent.
type Options struct {
	Config config.Config
	// Reload reads the configuration again (SIGHUP, `imdsguard reload`); nil disables it.
	Reload func() (config.Config, error)
	// UnpinOnExit detaches and removes the pinned programs on shutdown instead of
	// leaving them guarding for the next agent.
	UnpinOnExit bool
}

// Intervals of the agent's background work.
const (
	heartbeatEvery = 250 * time.Millisecond // the kernel's timeout is 1s
	resolveEvery   = 2 * time.Second        // re-resolve exes, units, containers
)

// Run guards until ctx is done. Errors are start-up failures or a broken reader. Each
// value on hup reloads the configuration and reopens the events file.
func Run(ctx context.Context, opts Options, log zerolog.Logger, hup <-chan struct{}) error {
	cfg := opts.Config
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

	tel, err := startTelemetry(cfg, log, markedIMDSClient(cfg))
	if err != nil {
		return err
	}
	defer tel.Close()

	if cfg.PinPath != "" {
		if err := hook.EnsureBPFFS(cfg.PinPath); err != nil {
			return err
		}
	}
	target := hook.Target{IPv4: cfg.IMDS.Addr4, IPv6: cfg.IMDS.Addr6, Port: uint16(cfg.IMDS.Port)}
	if cfg.Broker.Enabled {
		target.BrokerPort = uint16(cfg.Broker.Port)
	}
	h, err := hook.Load(target, cfg.PinPath)
	if err != nil {
		return err
	}
	defer h.Close()
	// Loading parsed the kernel's BTF (megabytes) for CO-RE; hand that back now rather
	// than carry it for the agent's lifetime.
	debug.FreeOSMemory()

	a := &agent{cfg: cfg, opts: opts, log: log, h: h, out: out, cgroupRoot: root,
		resolver: procinfo.NewResolver("/proc", cgroup.NewPaths(root), 8192), recent: newRecent(4096),
		requests: make(chan eventlog.Record, cfg.Agent.QueueSize), tel: tel}
	if a.netns, err = hook.OwnNetnsCookie(); err != nil {
		return err
	}
	if err := a.openFingerprints(); err != nil {
		return err
	}
	if a.ledger, err = usage.Open(filepath.Join(cfg.StateDir, "usage.json")); err != nil {
		return err
	}
	defer a.saveLedger()
	defer a.fps.Close()
	// Alive before the policy can redirect to us, broker listening before redirects.
	if err := h.Beat(); err != nil {
		return err
	}
	if cfg.Broker.Enabled {
		a.broker = broker.New(brokerConfig(cfg), h, a.recordRequest, log)
		if err := a.broker.Listen(); err != nil {
			return err
		}
	}
	if err := a.applyPolicy(true); err != nil {
		return err
	}
	if err := h.Attach(dir); err != nil {
		return err
	}
	log.Info().Str("event", "agent_started").Str("cgroup", dir).
		Str("imds_ipv4", cfg.IMDS.Addr4.String()).Str("imds_ipv6", cfg.IMDS.Addr6.String()).
		Int("imds_port", cfg.IMDS.Port).Str("events_output", cfg.Events.Output).
		Str("mode", cfg.Mode).Str("failure_mode", cfg.FailureMode).Str("default_action", cfg.DefaultAction).
		Int("rules", len(cfg.Rules)).Bool("broker", cfg.Broker.Enabled).Str("pin_path", cfg.PinPath).
		Msg("hooks attached, guarding IMDS connections")
	if cfg.Agent.ReadyFile != "" {
		if err := writeReady(cfg.Agent.ReadyFile); err != nil {
			return err
		}
		defer os.Remove(cfg.Agent.ReadyFile)
	}
	a.reportPreexisting()

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
		a.writeLoop(queue)
	}()
	fwdCtx, stopForwarding := context.WithCancel(context.Background())
	defer stopForwarding()
	if err := a.forward(fwdCtx); err != nil {
		return err
	}
	ctl, err := a.serveControl()
	if err != nil {
		return err
	}
	defer ctl.Close()

	stats := newStatsReporter(h, log, a.reqDrops.Load, tel.observeDrops)
	statsTick := time.NewTicker(cfg.Agent.StatsInterval)
	defer statsTick.Stop()
	beat := time.NewTicker(heartbeatEvery)
	defer beat.Stop()
	resolve := time.NewTicker(resolveEvery)
	defer resolve.Stop()
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
		case <-beat.C:
			if err := h.Beat(); err != nil {
				log.Error().Err(err).Str("event", "heartbeat_failed").Msg("kernel will apply the failure mode")
			}
		case <-resolve.C:
			if err := a.applyPolicy(false); err != nil {
				log.Error().Err(err).Str("event", "policy_update_failed").Msg("keeping the previous policy")
			}
		case <-statsTick.C:
			stats.report()
			a.saveLedger()
		case <-hup:
			a.reload()
			if err := tel.reopen(); err != nil {
				log.Error().Err(err).Str("event", "emf_reopen_failed").Msg("reopening EMF output")
			}
			if err := out.Reopen(); err != nil {
				log.Error().Err(err).Str("event", "events_reopen_failed").Msg("reopening events output")
			}
		case done := <-ctl.reload:
			done <- a.reload()
		}
	}
	a.shutdown()
	a.reqMu.Lock() // a request still in flight after the broker's grace is dropped
	a.reqClosed = true
	close(a.requests)
	a.reqMu.Unlock()
	stopReading()
	if err := <-readErr; err != nil && runErr == nil {
		runErr = fmt.Errorf("event reader: %w", err)
	}
	wg.Wait()
	stats.report()
	log.Info().Str("event", "agent_stopped").Bool("pinned", h.Pinned() && !opts.UnpinOnExit).
		Msg("events flushed")
	return runErr
}

type agent struct {
	cfg        config.Config
	opts       Options
	log        zerolog.Logger
	h          *hook.Hook
	out        *eventlog.Writer
	broker     *broker.Broker
	resolver   *procinfo.Resolver
	recent     *recent
	requests   chan eventlog.Record // the broker's request lines, written by writeLoop
	fps        *fingerprints
	tel        *telemetry
	ledger     *usage.Ledger
	reqDrops   atomic.Uint64
	reqMu      sync.RWMutex
	reqClosed  bool
	cgroupRoot string
	netns      uint64

	mu     sync.Mutex
	policy policyState
}

// saveLedger persists the usage tally for `imdsguard report`.
func (a *agent) saveLedger() {
	if id, ok := a.tel.Identity.Get(); ok {
		a.ledger.SetInstance(id.InstanceID)
	}
	if err := a.ledger.Save(time.Now()); err != nil {
		a.log.Error().Err(err).Str("event", "usage_save_failed").Msg("saving usage ledger")
	}
}

// writeLoop is the only writer of event lines: kernel events and broker requests are
// written here, off the request path, and flushed whenever nothing else is waiting.
func (a *agent) writeLoop(queue <-chan hook.Event) {
	requests := a.requests
	for queue != nil || requests != nil {
		select {
		case ev, ok := <-queue:
			if !ok {
				queue = nil
				continue
			}
			rec := a.connectRecord(ev)
			a.recent.put(ev.SocketCookie, rec)
			a.out.Write(rec)
			a.tel.observeConnect(rec)
			if ev.Verdict == hook.VerdictDeny {
				a.ledger.Observe(usage.Denied, usage.Who{Exe: rec.Exe, Unit: rec.Unit, User: rec.User}, rec.Time)
			}
		case rec, ok := <-requests:
			if !ok {
				requests = nil
				continue
			}
			a.out.Write(rec)
		}
		if len(queue) == 0 && len(requests) == 0 {
			if err := a.out.Flush(); err != nil {
				a.log.Error().Err(err).Str("event", "events_write_failed").Msg("writing events")
			}
		}
	}
	_ = a.out.Flush()
}

// shutdown hands the host to the kernel's failure mode at once (no client waits on a
// broker that is going away), stops the broker, then leaves the pinned programs
// guarding or removes them.
func (a *agent) shutdown() {
	if err := a.h.StopBeating(); err != nil {
		a.log.Error().Err(err).Str("event", "heartbeat_failed").Msg("stopping heartbeat")
	}
	if a.broker != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		if err := a.broker.Shutdown(ctx); err != nil {
			a.log.Warn().Err(err).Str("event", "broker_shutdown").Msg("broker stopped with requests in flight")
		}
		cancel()
	}
	if a.opts.UnpinOnExit || !a.h.Pinned() {
		if err := a.h.Unpin(); err != nil {
			a.log.Error().Err(err).Str("event", "detach_failed").Msg("detaching hooks")
		}
	}
}

func brokerConfig(cfg config.Config) broker.Config {
	return broker.Config{
		Port: cfg.Broker.Port, Mark: cfg.Broker.Mark, IMDS4: cfg.IMDS.Addr4, IMDS6: cfg.IMDS.Addr6,
		IMDSPort: cfg.IMDS.Port, Enforce: cfg.Mode == "enforce",
		MaxHeaderBytes: cfg.Broker.MaxHeaderBytes, MaxBodyBytes: cfg.Broker.MaxBodyBytes,
		ReadTimeout: cfg.Broker.ReadTimeout, IdleTimeout: cfg.Broker.IdleTimeout, UpstreamTimeout: cfg.Broker.UpstreamTimeout,
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
	h        *hook.Hook
	log      zerolog.Logger
	last     hook.Stats
	reqDrops func() uint64
	lastReq  uint64
	dropped  func(n uint64) // told how many events were lost since the last report
}

func newStatsReporter(h *hook.Hook, log zerolog.Logger, reqDrops func() uint64, dropped func(uint64)) *statsReporter {
	return &statsReporter{h: h, log: log, reqDrops: reqDrops, dropped: dropped}
}

func (s *statsReporter) report() {
	st, err := s.h.Stats()
	if err != nil {
		s.log.Error().Err(err).Str("event", "stats_failed").Msg("reading counters")
		return
	}
	if st.RingFull != s.last.RingFull || st.QueueDrops != s.last.QueueDrops {
		s.log.Warn().Str("event", "events_dropped").
			Uint64("ring_full", st.RingFull).Uint64("queue_full", st.QueueDrops).
			Uint64("ring_full_new", st.RingFull-s.last.RingFull).Uint64("queue_full_new", st.QueueDrops-s.last.QueueDrops).
			Msg("IMDS connect events were lost: the agent could not keep up")
		s.dropped(st.RingFull - s.last.RingFull + st.QueueDrops - s.last.QueueDrops)
	}
	if n := s.reqDrops(); n != s.lastReq {
		s.log.Warn().Str("event", "events_dropped").Uint64("request_lines", n).
			Msg("broker request lines were lost: the event writer could not keep up")
		s.lastReq = n
	}
	if st.FailOpen != s.last.FailOpen || st.FailClosed != s.last.FailClosed {
		s.log.Warn().Str("event", "fail_mode_applied").
			Uint64("fail_open", st.FailOpen).Uint64("fail_closed", st.FailClosed).
			Msg("the kernel applied the failure mode while the agent was not beating")
	}
	s.last = st
}
