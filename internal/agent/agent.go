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

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/broker"
	"github.com/imdsguard/imdsguard/internal/agent/cgroup"
	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/containers"
	"github.com/imdsguard/imdsguard/internal/agent/events"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/netns"
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
	// stopGrace is how long after a clean stop (not an uninstall) the kernel keeps
	// redirecting to the broker's port for the next agent before it applies the failure
	// mode: a restart or an upgrade never lapses into it.
	stopGrace    = 5 * time.Second
	ownWait      = 10 * time.Second      // longest an own socket waits for the programs
	resolveEvery = 2 * time.Second       // re-resolve exes, units, containers
	flushEvery   = 20 * time.Millisecond // longest an event line waits in the buffer
	// summariseEvery is how often the kernel's counts of refused and UDP connects are
	// read and written as imds_connect_summary lines: one event, then at most one
	// summary per process and outcome each time, however fast it connects.
	summariseEvery = time.Second
)

// Run guards until ctx is done. Errors are start-up failures or a broken reader. Each
// value on hup reloads the configuration and reopens the output files.
func Run(ctx context.Context, opts Options, log zerolog.Logger, hup <-chan struct{}) error {
	a := &agent{cfg: opts.Config, opts: opts, log: log, recent: newRecent(4096),
		requests: make(chan events.Record, opts.Config.Agent.QueueSize), sd: newNotifier(log), swapped: make(chan struct{}),
		ownReady: make(chan struct{}), probeTGID: make(chan uint32, 1)}
	defer a.close()
	if err := a.start(); err != nil {
		return err
	}
	// After start: loading parsed the kernel's BTF, megabytes that are garbage once the
	// programs are in; under the limit the collector would run dozens of times meanwhile.
	setMemoryLimit(log)
	a.startWorkers()
	a.learnKernelTGID()
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
	a.sd.status("opening kernel maps")
	dir := cfg.Cgroup
	if dir == "" {
		dir = root
	}
	if err := cgroup.Check(dir); err != nil {
		return fmt.Errorf("guarded cgroup: %w", err)
	}
	a.guardedDir = dir
	a.containers = containers.NewResolver(containers.DefaultSources())
	a.resolver = procinfo.NewResolver("/proc", cgroup.NewPaths(root), 8192).WithContainers(a.containers)
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
			// Guard unpinned rather than not at all: without bpffs (and without
			// CAP_SYS_ADMIN to mount one) the programs still judge every connection
			// while the agent runs; only a restart's continuity is lost, which
			// preflight's bpffs warning already told the operator.
			a.log.Warn().Err(err).Str("event", "pins_unavailable").Str("pin_path", cfg.PinPath).
				Msg("no bpf file system to pin on: guarding unpinned, a restart leaves a gap")
			cfg.PinPath = ""
			a.cfg.PinPath = ""
		}
	}
	target := hook.Target{IPv4: cfg.IMDS.Addr4, IPv6: cfg.IMDS.Addr6, Port: uint16(cfg.IMDS.Port),
		ContainersDeny: cfg.Containers.Fallback.Denies()}
	for _, g := range cfg.GuardedAddrs() {
		if g.Kind != config.EndpointIMDS {
			target.Others = append(target.Others, g.AddrPort)
		}
	}
	if cfg.Broker.Enabled {
		target.BrokerPort = uint16(cfg.Broker.Port)
	}
	// Restart with no lapse (issue 16): the pinned programs of the agent before keep
	// guarding while this one starts. Maps first (milliseconds), then the broker they
	// redirect to and the heartbeat that keeps them redirecting, and only then the slow
	// part, the verifier, whose programs are swapped in by link update. The kernel never
	// judges a connection under the failure mode because this agent is loading.
	if a.h, err = hook.Open(target, cfg.PinPath); err != nil {
		return err
	}
	a.onClose(func() { _ = a.h.Close() })
	if a.netns, err = hook.OwnNetnsCookie(); err != nil {
		return err
	}
	a.h.SetHostNetns(a.netns)
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
	// Broker listening, then alive: the kernel never redirects to a listener that is
	// not ours (an earlier agent's policy is only followed while somebody beats).
	if cfg.Broker.Enabled {
		bc := brokerConfig(cfg)
		bc.Own = a.registerOwn
		bc.CredentialsOwner = a.credentialsOwner
		a.broker = broker.New(bc, a.h, a.recordRequest, a.log)
		a.adoptListeners()
		if err := a.broker.Listen(); err != nil {
			return err
		}
		a.storeListeners()
		if cfg.Containers.MaxNamespaces > 0 {
			if err := a.serveNamespaces(); err != nil {
				return err
			}
		}
	} else {
		a.adoptListeners() // closes any: no broker
	}
	if err := a.startHeartbeat(); err != nil {
		return err
	}
	a.onClose(func() {
		a.stopHeartbeat()
		// A start that failed before its programs were in: nobody will serve the
		// broker's port, so the failure mode applies at once.
		if !a.isSwapped() {
			_ = a.h.StopBeating()
		}
	})
	// The policy naming the families whose listener we hold, before any program of
	// ours judges (the first attach never judges without it).
	if err := a.applyPolicy(true); err != nil {
		return err
	}
	a.sd.status("loading kernel programs")
	loadStart := time.Now()
	if err := a.h.LoadPrograms(a.log); err != nil {
		return err
	}
	loaded := time.Since(loadStart)
	// Loading parsed the kernel's BTF (megabytes) for CO-RE; hand that back now rather
	// than carry it for the agent's lifetime.
	debug.FreeOSMemory()
	a.sd.status("attaching to " + dir)
	if err := a.h.Attach(dir); err != nil {
		return err
	}
	// Our programs are in: they know this agent's own sockets.
	a.own.Store(a.h)
	close(a.swapped)
	a.log.Info().Str("event", "agent_started").Str("cgroup", dir).
		Str("imds_ipv4", cfg.IMDS.Addr4.String()).Str("imds_ipv6", cfg.IMDS.Addr6.String()).
		Int("imds_port", cfg.IMDS.Port).Str("events_output", cfg.Events.Output).
		Str("mode", string(cfg.Mode)).Str("failure_mode", string(cfg.FailureMode)).Str("default_action", string(cfg.DefaultAction)).
		Int("rules", len(cfg.Rules)).Bool("broker", cfg.Broker.Enabled).Str("pin_path", cfg.PinPath).
		Bool("containers", a.namespaces != nil).Str("containers_fallback", string(cfg.Containers.Fallback)).
		Bool("deny_refused", a.h.DenyRefused()).Bool("exec_identity", a.h.ExecIdentity()).Dur("programs_load", loaded).
		Msg("hooks attached, guarding IMDS connections")
	if err := a.h.ExecIdentityError(); err != nil {
		a.log.Warn().Str("event", "exec_identity_unavailable").Err(err).
			Msg("cannot record executables at exec (tp_btf sched_process_exec/fork with task storage): exe rules match mm->exe_file, which an unprivileged process in a user namespace can point at another file (prctl PR_SET_MM_MAP)")
	}
	if err := a.h.NetnsTracing(); err != nil && a.namespaces != nil {
		a.log.Info().Str("event", "netns_creation_unreported").Err(err).
			Msg("new network namespaces are reported at their first socket, not as they are made: a container that connects as it starts may get containers.fallback for its first connection")
	}
	if cfg.Agent.ReadyFile != "" {
		if err := writeReady(cfg.Agent.ReadyFile); err != nil {
			return err
		}
		a.onClose(func() { _ = os.Remove(cfg.Agent.ReadyFile) })
	}
	a.reportPreexisting()
	// Only now: programs attached, policy in the kernel, broker listening.
	a.sd.ready()
	if n, err := dropStartupPages(); err != nil {
		a.log.Debug().Err(err).Int("mappings", n).Msg("start-up pages of the binary kept")
	}
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
	resolve := time.NewTicker(resolveEvery)
	defer resolve.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-a.readErr:
			a.readErr <- err // stop() collects it
			return fmt.Errorf("event reader stopped: %w", err)
		case <-resolve.C:
			if err := a.applyPolicy(false); err != nil {
				a.log.Error().Err(err).Str("event", "policy_update_failed").Msg("keeping the previous policy")
			}
		case <-statsTick.C:
			a.stats.report()
			a.reportNamespaces()
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
// connects. Until this agent's programs are swapped in, the programs guarding are an
// earlier agent's, which know only that agent's sockets: wait for the swap (tens of
// milliseconds) rather than have this socket judged as a client's.
func (a *agent) registerOwn(fd int) error {
	select {
	case <-a.ownReady:
	case <-time.After(ownWait):
		return errors.New("register own socket: the agent's programs are not loaded yet")
	}
	return a.own.Load().RegisterOwnSocket(fd)
}

// startHeartbeat beats once, then every heartbeatEvery on a goroutine of its own:
// nothing the agent does (resolving the policy, a slow disk) delays a beat.
func (a *agent) startHeartbeat() error {
	if err := a.h.Beat(); err != nil {
		return err
	}
	a.beatStop = make(chan struct{})
	a.beatDone = make(chan struct{})
	go func() {
		defer close(a.beatDone)
		t := time.NewTicker(heartbeatEvery)
		defer t.Stop()
		for {
			select {
			case <-a.beatStop:
				return
			case now := <-t.C:
				if err := a.h.Beat(); err != nil {
					a.log.Error().Err(err).Str("event", "heartbeat_failed").Msg("kernel will apply the failure mode")
				} else {
					a.sd.alive(now)
				}
			}
		}
	}()
	return nil
}

// stopHeartbeat stops the beating goroutine and waits for it; a second call is a no-op.
func (a *agent) stopHeartbeat() {
	if a.beatStop == nil {
		return
	}
	select {
	case <-a.beatStop:
	default:
		close(a.beatStop)
	}
	<-a.beatDone
}

// close releases what start acquired, last first.
func (a *agent) close() {
	for i := len(a.closers) - 1; i >= 0; i-- {
		a.closers[i]()
	}
}

type agent struct {
	cfg         config.Config
	opts        Options
	log         zerolog.Logger
	sd          *notifier // systemd: status, readiness, watchdog
	h           *hook.Hook
	out         *events.Writer
	broker      *broker.Broker
	namespaces  *netns.Manager // the broker in containers' network namespaces; nil: none
	resolver    *procinfo.Resolver
	containers  *containers.Resolver // runtimes' state: events and container rules
	recent      *recent
	requests    chan events.Record // the broker's request lines, written by writeLoop
	fps         *fingerprints
	tel         *telemetry
	ledger      *tally.Ledger
	reqDrops    atomic.Uint64
	reqMu       sync.RWMutex
	reqClosed   bool
	cgroupRoot  string
	netns       uint64
	own         atomic.Pointer[hook.Hook] // set once loaded: registers the agent's own sockets
	swapped     chan struct{}             // closed once this agent's programs are attached
	guardedDir  string                    // the cgroup the programs attach to
	ownReady    chan struct{}             // closed once the kernel knows the agent's tgid (selfpid.go)
	kernelTGID  atomic.Uint32             // the agent's tgid as the kernel sees it; 0: os.Getpid()
	probeCookie atomic.Uint64             // the self probe's socket cookie while it runs
	probeTGID   chan uint32
	beatStop    chan struct{}
	beatDone    chan struct{}

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
	summarise := time.NewTicker(summariseEvery)
	defer summarise.Stop()
	dirty := false
	for queue != nil || requests != nil {
		select {
		case <-summarise.C:
			if a.writeSummaries() {
				dirty = true
			}
		case ev, ok := <-queue:
			if !ok {
				queue = nil
				continue
			}
			if c := a.probeCookie.Load(); c != 0 && ev.SocketCookie == c {
				select {
				case a.probeTGID <- ev.PID:
				default:
				}
				continue // the agent's own probe, not a client's connection
			}
			a.ensureNamespace(ev)
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
	a.writeSummaries()
	_ = a.out.Flush()
}

// writeSummaries writes a summary line for each process and outcome the kernel counted
// connects of since the last call; reports whether it wrote any.
func (a *agent) writeSummaries() bool {
	aggs, err := a.h.TakeAggregates()
	if err != nil {
		a.log.Error().Err(err).Str("event", "summaries_failed").Msg("reading the kernel's connect counts")
	}
	for _, ag := range aggs {
		rec := a.summaryRecord(ag)
		a.out.Write(rec)
		a.tel.observeSummary(rec)
		if ag.Verdict == hook.VerdictDeny {
			a.ledger.Observe(tally.Denied, tally.Who{Exe: rec.Exe, Unit: rec.Unit, User: rec.User}, rec.Time)
		}
	}
	return len(aggs) > 0
}

// shutdown stops the heartbeat and the broker, then leaves the pinned programs guarding
// or removes them. A clean stop that leaves them pinned keeps the kernel redirecting for
// stopGrace, for the next agent's broker, instead of applying the failure mode at once;
// an uninstall, or a start that never swapped its programs in, applies it at once (no
// client waits on a broker that is going away for good).
func (a *agent) shutdown() {
	a.stopHeartbeat()
	if a.opts.UnpinOnExit || !a.h.Pinned() || !a.isSwapped() {
		if err := a.h.StopBeating(); err != nil {
			a.log.Error().Err(err).Str("event", "heartbeat_failed").Msg("stopping heartbeat")
		}
	} else if err := a.h.Linger(stopGrace); err != nil {
		a.log.Error().Err(err).Str("event", "heartbeat_failed").Msg("stopping heartbeat")
	} else {
		a.log.Info().Str("event", "heartbeat_grace").Dur("grace", stopGrace).
			Msg("the kernel keeps redirecting to the broker's port for the next agent, then applies the failure mode")
	}
	// Containers' endpoints first: unpublished before their listeners close, so that
	// the kernel applies containers.fallback rather than redirect to a closed port.
	a.closeNamespaces()
	if a.broker != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		if err := a.broker.Shutdown(ctx); err != nil {
			a.log.Warn().Err(err).Str("event", "broker_shutdown").Msg("broker stopped with requests in flight")
		}
		cancel()
	}
	if a.opts.UnpinOnExit || !a.h.Pinned() {
		a.sd.forgetFiles(fdStoreName)
		if err := a.h.Unpin(); err != nil {
			a.log.Error().Err(err).Str("event", "detach_failed").Msg("detaching hooks")
		}
	}
}

// adoptListeners serves the broker listeners systemd kept for this unit (LISTEN_FDS,
// from the file descriptor store of the agent before): connections made while no agent
// ran wait in their backlog. Descriptors that are not the broker's are closed.
func (a *agent) adoptListeners() {
	lns, err := activation.Listeners()
	if err != nil {
		a.log.Warn().Err(err).Str("event", "listen_fds_failed").Msg("ignoring descriptors passed by systemd")
		return
	}
	for _, ln := range lns {
		if ln == nil {
			continue
		}
		if a.broker == nil || !a.broker.Adopt(ln) {
			_ = ln.Close()
		}
	}
}

// storeListeners hands the broker's listeners to systemd's file descriptor store, which
// gives them to the next agent: a restart never closes the broker's port.
func (a *agent) storeListeners() {
	conns, err := a.broker.ListenerConns()
	if err != nil {
		a.log.Warn().Err(err).Str("event", "fdstore_failed").Msg("the broker's port closes across a restart")
		return
	}
	var fds []int
	for _, rc := range conns {
		_ = rc.Control(func(fd uintptr) { fds = append(fds, int(fd)) })
	}
	a.sd.storeFDs(fdStoreName, fds) // the listeners are open: their numbers are valid
}

func (a *agent) isSwapped() bool {
	select {
	case <-a.swapped:
		return true
	default:
		return false
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
		Endpoints:          brokerEndpoints(cfg.Endpoints),
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
