package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/events"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	"github.com/imdsguard/imdsguard/internal/agent/netns"
	"github.com/imdsguard/imdsguard/internal/agent/status"
	"github.com/imdsguard/imdsguard/internal/agent/tally"
)

// telemetry is what the agent reports about IMDS use besides the event lines: the
// instance identity, the metrics and their sinks, and the status socket. Observe feeds
// it; everything else runs in the background.
type telemetry struct {
	Identity *hostid.Source
	Metrics  *metrics.Aggregator

	log    zerolog.Logger
	emf    *metrics.EMF // nil when off; reopened on SIGHUP
	status *status.Server
	cancel context.CancelFunc
	done   chan struct{}
	// ledger is the usage tally, set once the agent opened it: the status socket
	// serves it live to `imdsguard report`.
	ledger atomic.Pointer[tally.Ledger]
	// namespaces is the manager of containers' broker endpoints once started, for the
	// status socket.
	namespaces atomic.Pointer[netns.Manager]
}

// servedNamespaces lists the network namespaces served, for the status socket.
func (t *telemetry) servedNamespaces() []netns.Endpoint {
	if m := t.namespaces.Load(); m != nil {
		return m.Endpoints()
	}
	return nil
}

// usage is the live usage tally for the status socket.
func (t *telemetry) usage() ([]byte, error) {
	l := t.ledger.Load()
	if l == nil {
		return nil, errors.New("usage tally not open yet")
	}
	return l.Snapshot(time.Now().UTC())
}

// statusTableSize bounds the per-process table `imdsguard status` shows.
const statusTableSize = 4096

// finalFlush bounds the last publish at shutdown (CloudWatch may be unreachable).
const finalFlush = 5 * time.Second

// startTelemetry starts identity, metrics sinks and the status socket. httpClient,
// when not nil, carries the agent's own requests to IMDS and CloudWatch (the broker
// must not redirect them). A sink that cannot start (Prometheus address taken, EMF file
// not writable) is an error: the operator asked for it.
func startTelemetry(cfg config.Config, log zerolog.Logger, httpClient *http.Client) (*telemetry, error) {
	m := cfg.Metrics
	t := &telemetry{
		Identity: hostid.New(hostid.Options{
			Endpoint:   "http://" + net.JoinHostPort(cfg.IMDS.IPv4, strconv.Itoa(cfg.IMDS.Port)),
			HTTPClient: httpClient,
			Log:        log,
		}),
		Metrics: metrics.NewAggregator(m.MaxExecutables, statusTableSize),
		log:     log,
		done:    make(chan struct{}),
	}
	var sinks []metrics.Sink
	closeSinks := func() {
		for _, s := range sinks {
			_ = s.Close(context.Background())
		}
	}
	if m.Prometheus.Listen != "" {
		// Ten times the per-interval cap: room for the set of busy programs to change
		// over the agent's life without unbounded label growth.
		p := metrics.NewPrometheus(10*m.MaxExecutables, log)
		if err := p.Listen(m.Prometheus.Listen); err != nil {
			return nil, err
		}
		sinks = append(sinks, p)
	}
	if m.EMF.Output != "" {
		e, err := metrics.OpenEMF(m.EMF.Output, m.Namespace)
		if err != nil {
			closeSinks()
			return nil, err
		}
		sinks = append(sinks, e)
		t.emf = e
	}
	if m.CloudWatch.Enabled {
		sinks = append(sinks, metrics.NewCloudWatch(metrics.CloudWatchOptions{
			Namespace: m.Namespace, Region: m.CloudWatch.Region, Endpoint: m.CloudWatch.Endpoint,
			HTTPClient: httpClient, Log: log,
		}))
	}
	if cfg.Status.Socket != "" {
		// The status socket is a console convenience: without it the agent still
		// guards, counts and publishes, so a failure here is a warning, not a stop.
		s, err := status.Listen(cfg.Status.Socket, status.Source{Processes: t.Metrics.Processes, Identity: t.Identity.Get, Usage: t.usage,
			Namespaces: t.servedNamespaces}, log)
		if err != nil {
			log.Warn().Err(err).Str("event", "status_unavailable").Str("status_socket", cfg.Status.Socket).
				Msg("`imdsguard status` will not work")
		}
		t.status = s
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.cancel = cancel
	go func() { _ = t.Identity.Run(ctx) }()
	pub := metrics.NewPublisher(t.Metrics, t.Identity, m.Interval, log, sinks...)
	go func() {
		defer close(t.done)
		if err := pub.Run(ctx, finalFlush); err != nil {
			log.Error().Err(err).Str("event", "metrics_close_failed").Msg("last metrics publish")
		}
	}()
	log.Info().Str("event", "metrics_started").Str("namespace", m.Namespace).Dur("interval", m.Interval).
		Bool("cloudwatch", m.CloudWatch.Enabled).Str("emf_output", m.EMF.Output).
		Str("prometheus_listen", m.Prometheus.Listen).Str("status_socket", cfg.Status.Socket).
		Msg("metrics publishing")
	return t, nil
}

// observeConnect counts one connect() event from the hook. A denied connect is
// MetadataDenied; an allowed one is a MetadataRequests (until the broker classifies
// the requests themselves).
func (t *telemetry) observeConnect(rec events.Record) {
	kind := metrics.MetadataRequests
	if rec.Verdict == hook.VerdictDeny.String() {
		kind = metrics.MetadataDenied
	}
	t.observeProcess(kind, rec, rec.Time)
}

// observeProcess counts one thing a process did: the broker's classifications
// (MetadataNoToken, MetadataNoTokenRejected, MetadataWithToken, MetadataTokenRequests,
// CredentialFetches) come in here, with the record of the process's connect.
func (t *telemetry) observeProcess(kind metrics.Kind, rec events.Record, at time.Time) {
	t.Metrics.Observe(metrics.Observation{Kind: kind, Exe: rec.Exe, User: userValue(rec),
		Container: containerValue(rec), Time: at})
}

// userValue is the User dimension value: a user without a name is counted by uid, so
// that it stays distinct.
func userValue(rec events.Record) string {
	if rec.User == "" {
		return strconv.FormatUint(uint64(rec.UID), 10)
	}
	return rec.User
}

// containerValue is the Container dimension value of the record's process: the
// workload its container belongs to, metrics.Host for none, and "" (counted as
// unknown) when its cgroup is not known. Only a container its runtime made counts
// (rec.Container): a cgroup in a delegated subtree merely named like one is the host's.
func containerValue(rec events.Record) string {
	if rec.Cgroup == "" {
		return ""
	}
	return metrics.ContainerValue(rec.Container)
}

// observeSummary counts the connects of one summary: in the per-process counts as
// their events would have been, and as aggregated.
func (t *telemetry) observeSummary(rec events.Record) {
	if rec.Backstop {
		// Packets, not connects: counted apart.
		if rec.Verdict == hook.VerdictDeny.String() {
			t.Metrics.Observe(metrics.Observation{Kind: metrics.BackstopDropped, Count: rec.Count})
		}
		return
	}
	kind := metrics.MetadataRequests
	if rec.Verdict == hook.VerdictDeny.String() {
		kind = metrics.MetadataDenied
	}
	t.Metrics.Observe(metrics.Observation{Kind: kind, Exe: rec.Exe, User: userValue(rec),
		Container: containerValue(rec), Time: rec.Time, Count: rec.Count})
	t.Metrics.Observe(metrics.Observation{Kind: metrics.EventsAggregated, Count: rec.Count})
}

// observeDrops counts events lost in the kernel ring buffer or the agent's queue.
func (t *telemetry) observeDrops(n uint64) {
	if n > 0 {
		t.Metrics.Observe(metrics.Observation{Kind: metrics.EventsDropped, Count: n})
	}
}

// reopen reopens the EMF file after log rotation.
func (t *telemetry) reopen() error {
	if t.emf == nil {
		return nil
	}
	return t.emf.Reopen()
}

// Close publishes the last interval, closes the sinks and the status socket.
func (t *telemetry) Close() {
	t.cancel()
	<-t.done
	if t.status != nil {
		if err := t.status.Close(); err != nil {
			t.log.Error().Err(err).Str("event", "status_close_failed").Msg("closing status socket")
		}
	}
}
