// Package agent runs imdsguard on a host: it attaches the kernel programs to the guarded
// cgroup (adopting the pinned ones of an earlier agent), keeps the allowlist in the
// kernel current, serves the broker, turns kernel events and broker requests into event
// lines, keeps loss visible, and hands the host back to the pinned programs, or detaches
// them, on shutdown.
package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/broker"
	"github.com/imdsguard/imdsguard/internal/agent/cgroup"
	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/events"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/procinfo"
	"github.com/imdsguard/imdsguard/internal/agent/tally"
	"github.com/imdsguard/imdsguard/internal/atomicfile"
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
	flushEvery     = 20 * time.Millisecond  // longest an event line waits in the buffer
)

// Run guards until ctx is done. Errors are start-up failures or a broken reader. Each
// value on hup reloads the configuration and reopens the output files.
func Run(ctx context.Context, opts Options, log zerolog.Logger, hup <-chan struct{}) error {
	a := &agent{cfg: opts.Config, opts: opts, log: log, recent: newRecent(4096),
		requests: make(chan events.Record, opts.Config.Agent.QueueSize), sd: newNotifier(log)}
	defer a.close()
	if err := a.start(); err != nil {
		return err
	}
	// After start: loading parsed the kernel's BTF, megabytes that are garbage once the
	// programs are in; under the limit the collector would run dozens of times meanwhile.
	setMemoryLimit(log)
	a.startWorkers()
	a.learnMeta(a.bg)
	if err := a.forward(a.bg); err != nil {
		return err
	}
	ctl, err := a.serveControl()
	if err != nil {
		return err
	}
	a.onClose(func() { _ = ctl.Close() })
	runErr := a.loop(ctx, hup, ctl)
	a.sd.stopping()
	return errors.Join(runErr, a.stop())
}

// start builds everything the host needs before the first redirect: outputs, the
// kernel programs (adopting pinned ones), the broker, the policy, then the attach.
func (a *agent) start() error {
	cfg := a.cfg
	root, err := cgroup.Root()
	if err != nil {
		return fmt.Errorf("find cgroup v2: %w", err)
	}
	a.cgroupRoot = root
	a.sd.status("loading kernel programs")
	dir := cfg.Cgroup
	if dir == "" {
		dir = root
	}
	if err := cgroup.Check(dir); err != nil {
		return fmt.Errorf("guarded cgroup: %w", err)
	}
	a.resolver = procinfo.NewResolver("/proc", cgroup.NewPaths(root), 8192)
	if a.out, err = events.Open(cfg.Events.Output); err != nil {
		return err
	}
	a.onClose(func() {
		if err := a.out.Close(); err != nil {
			a.log.Error().Err(err).Str("event", "events_close_failed").Msg("closing events output")
		}
	})
	if a.tel, err = startTelemetry(cfg, a.log, markedIMDSClient(cfg, a.registerOwn)); err != nil {
		return err
	}
	a.onClose(a.tel.Close)
	if cfg.PinPath != "" {
		if err := hook.EnsureBPFFS(cfg.PinPath); err != nil {
			return err
		}
	}
	target := hook.Target{IPv4: cfg.IMDS.Addr4, IPv6: cfg.IMDS.Addr6, Port: uint16(cfg.IMDS.Port)}
	if cfg.Broker.Enabled {
		target.BrokerPort = uint16(cfg.Broker.Port)
	}
	if a.h, err = hook.Load(target, cfg.PinPath); err != nil {
		return err
	}
	a.onClose(func() { _ = a.h.Close() })
	a.own.Store(a.h)
	// Loading parsed the kernel's BTF (megabytes) for CO-RE; hand that back now rather
	// than carry it for the agent's lifetime.
	debug.FreeOSMemory()
	if a.netns, err = hook.OwnNetnsCookie(); err != nil {
		return err
	}
	if err := a.openFingerprints(); err != nil {
		return err
	}
	a.onClose(func() {
		if err := a.fps.Close(); err != nil {
			a.log.Error().Err(err).Str("event", "fingerprints_close_failed").Msg("closing fingerprint outputs")
		}
	})
	if a.ledger, err = tally.Open(filepath.Join(cfg.StateDir, "usage.json")); err != nil {
		return err
	}
	a.onClose(a.saveLedger)
	a.tel.ledger.Store(a.ledger)
	// Broker listening, then the policy naming the families whose listener we hold,
	// then alive: the kernel never redirects to a listener that is not ours (an earlier
	// agent's policy is only followed while somebody beats).
	if cfg.Broker.Enabled {
		bc := brokerConfig(cfg)
		bc.Own = a.registerOwn
		a.broker = broker.New(bc, a.h, a.recordRequest, a.log)
		if err := a.broker.Listen(); err != nil {
			return err
		}
	}
	if err := a.applyPolicy(true); err != nil {
		return err
	}
	if err := a.h.Beat(); err != nil {
		return err
	}
	a.sd.status("attaching to " + dir)
	if err := a.h.Attach(dir); err != nil {
		return err
	}
	a.log.Info().Str("event", "agent_started").Str("cgroup", dir).
		Str("imds_ipv4", cfg.IMDS.Addr4.String()).Str("imds_ipv6", cfg.IMDS.Addr6.String()).
		Int("imds_port", cfg.IMDS.Port).Str("events_output", cfg.Events.Output).
		Str("mode", string(cfg.Mode)).Str("failure_mode", string(cfg.FailureMode)).Str("default_action", string(cfg.DefaultAction)).
		Int("rules", len(cfg.Rules)).Bool("broker", cfg.Broker.Enabled).Str("pin_path", cfg.PinPath).
		Msg("hooks attached, guarding IMDS connections")
	if cfg.Agent.ReadyFile != "" {
		if err := writeReady(cfg.Agent.ReadyFile); err != nil {
			return err
		}
		a.onClose(func() { _ = os.Remove(cfg.Agent.ReadyFile) })
	}
	a.reportPreexisting()
	// Only now: programs attached, policy in the kernel, broker listening.
	a.sd.ready()
	return nil
}

// startWorkers starts the ring-buffer reader and the event writer.
func (a *agent) startWorkers() {
	var cancel context.CancelFunc
	a.bg, cancel = context.WithCancel(context.Background())
	a.onClose(cancel)
	queue := make(chan hook.Event, a.cfg.Agent.QueueSize)
	var readCtx context.Context
	readCtx, a.stopReading = context.WithCancel(context.Background())
	a.readErr = make(chan error, 1)
	go func() {
		a.readErr <- a.h.Run(readCtx, queue)
		close(queue)
	}()
	a.writer.Add(1)
	go func() {
		defer a.writer.Done()
		a.writeLoop(queue)
	}()
	a.stats = newStatsReporter(a.h, a.log, a.reqDrops.Load, a.tel.observeDrops)
}

// loop keeps the kernel's view current until ctx is done or the reader breaks.
func (a *agent) loop(ctx context.Context, hup <-chan struct{}, ctl *control) error {
	statsTick := time.NewTicker(a.cfg.Agent.StatsInterval)
	defer statsTick.Stop()
	beat := time.NewTicker(heartbeatEvery)
	defer beat.Stop()
	resolve := time.NewTicker(resolveEvery)
	defer resolve.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-a.readErr:
			a.readErr <- err // stop() collects it
			return fmt.Errorf("event reader stopped: %w", err)
		case now := <-beat.C:
			if err := a.h.Beat(); err != nil {
				a.log.Error().Err(err).Str("event", "heartbeat_failed").Msg("kernel will apply the failure mode")
			} else {
				a.sd.alive(now)
			}
		case <-resolve.C:
			if err := a.applyPolicy(false); err != nil {
				a.log.Error().Err(err).Str("event", "policy_update_failed").Msg("keeping the previous policy")
			}
		case <-statsTick.C:
			a.stats.report()
			a.saveLedger()
		case <-hup:
			_ = a.reload() // it logs why it refused a file
			if err := a.tel.reopen(); err != nil {
				a.log.Error().Err(err).Str("event", "emf_reopen_failed").Msg("reopening EMF output")
			}
			if err := a.out.Reopen(); err != nil {
				a.log.Error().Err(err).Str("event", "events_reopen_failed").Msg("reopening events output")
			}
		case done := <-ctl.reload:
			done <- a.reload()
		}
	}
}

// stop hands the host to the pinned programs (or detaches them), then drains the ring
// and the queues so that every event seen is written.
func (a *agent) stop() error {
	a.shutdown()
	a.reqMu.Lock() // a request still in flight after the broker's grace is dropped
	a.reqClosed = true
	close(a.requests)
	a.reqMu.Unlock()
	a.stopReading()
	err := <-a.readErr
	if err != nil {
		err = fmt.Errorf("event reader: %w", err)
	}
	a.writer.Wait()
	a.stats.report()
	a.log.Info().Str("event", "agent_stopped").Bool("pinned", a.h.Pinned() && !a.opts.UnpinOnExit).
		Msg("events flushed")
	return err
}

func (a *agent) onClose(f func()) { a.closers = append(a.closers, f) }

// registerOwn registers one of the agent's sockets to IMDS with the kernel before it
// connects. Before the programs are loaded there is nothing to register with.
func (a *agent) registerOwn(fd int) error {
	if h := a.own.Load(); h != nil {
		return h.RegisterOwnSocket(fd)
	}
	return nil
}

// close releases what start acquired, last first.
func (a *agent) close() {
	for i := len(a.closers) - 1; i >= 0; i-- {
		a.closers[i]()
	}
}

type agent struct {
	cfg        config.Config
	opts       Options
	log        zerolog.Logger
	sd         *notifier // systemd: status, readiness, watchdog
	h          *hook.Hook
	out        *events.Writer
	broker     *broker.Broker
	resolver   *procinfo.Resolver
	recent     *recent
	requests   chan events.Record // the broker's request lines, written by writeLoop
	fps        *fingerprints
	tel        *telemetry
	ledger     *tally.Ledger
	reqDrops   atomic.Uint64
	reqMu      sync.RWMutex
	reqClosed  bool
	cgroupRoot string
	netns      uint64
	own        atomic.Pointer[hook.Hook] // set once loaded: registers the agent's own sockets

	mu     sync.Mutex
	policy policyState

	closers     []func()
	bg          context.Context // background work, cancelled on close
	stopReading context.CancelFunc
	readErr     chan error
	writer      sync.WaitGroup
	stats       *statsReporter
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
	// Lines reach the file within flushEvery: one write per burst instead of one per
	// line keeps the writer off the CPU the broker's clients are waiting for.
	flush := time.NewTicker(flushEvery)
	defer flush.Stop()
	dirty := false
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
				a.ledger.Observe(tally.Denied, tally.Who{Exe: rec.Exe, Unit: rec.Unit, User: rec.User}, rec.Time)
			}
			dirty = true
		case rec, ok := <-requests:
			if !ok {
				requests = nil
				continue
			}
			a.out.Write(rec)
			dirty = true
		case <-flush.C:
			if dirty {
				if err := a.out.Flush(); err != nil {
					a.log.Error().Err(err).Str("event", "events_write_failed").Msg("writing events")
				}
				dirty = false
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
		IMDSPort: cfg.IMDS.Port, Enforce: cfg.Mode.Enforcing(),
		MaxHeaderBytes: cfg.Broker.MaxHeaderBytes, MaxBodyBytes: cfg.Broker.MaxBodyBytes,
		ReadTimeout: cfg.Broker.ReadTimeout, IdleTimeout: cfg.Broker.IdleTimeout, UpstreamTimeout: cfg.Broker.UpstreamTimeout,
		MaxConns: cfg.Broker.MaxConnections, MaxConnsPerUID: cfg.Broker.MaxConnectionsPerUID,
		MaxConnsPerProcess: cfg.Broker.MaxConnectionsPerProcess,
	}
}

func writeReady(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create ready file directory: %w", err)
	}
	// Atomic: whoever waits for the file never reads it half written.
	if err := atomicfile.Write(path, fmt.Appendf(nil, "%d\n", os.Getpid()), 0o644); err != nil {
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
