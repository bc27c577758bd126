package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hostid"
)

var promNames = [numKinds]string{
	"metadata_requests", "metadata_no_token", "metadata_no_token_rejected", "metadata_with_token",
	"metadata_token_requests", "metadata_denied", "credential_fetches",
	"task_credential_fetches", "pod_credential_fetches", "foreign_task_credentials",
	"events_dropped", "events_aggregated", "broker_errors", "fail_mode_activations", "backstop_packets_dropped",
}

// PromName is the Prometheus family name of k's per-instance counter.
func PromName(k Kind) string { return "imdsguard_" + promNames[k] + "_total" }

// Prometheus serves the counters on /metrics. Counters advance once per interval, from
// the same capped snapshots as the other sinks, so every sink tells the same numbers.
// Counters are cumulative, so label values accumulate over the agent's life: at most
// labelLimit distinct executables (users, containers) get a label of their own, later
// ones count as Other.
type Prometheus struct {
	reg    *prometheus.Registry
	total  [numKinds]prometheus.Counter
	byExe  [numKinds]*prometheus.CounterVec
	byUser [numKinds]*prometheus.CounterVec
	// byCtr has the container (ContainerValue) and, for a pod's, its namespace: a label
	// derived from the first, so it adds no series, for sums by namespace.
	byCtr [numKinds]*prometheus.CounterVec
	info  *prometheus.GaugeVec
	// The netns endpoints' gauge and counters, and the cumulative counts last added.
	netnsServed                           prometheus.Gauge
	netnsAdded, netnsRemoved, netnsFailed prometheus.Counter
	netnsLast                             NetnsStats

	mu         sync.Mutex
	labelLimit int
	exeLabels  map[string]bool
	userLabels map[string]bool
	ctrLabels  map[string]bool
	srv        *http.Server
	log        zerolog.Logger
}

// NewPrometheus registers the families; labelLimit bounds label values per dimension.
func NewPrometheus(labelLimit int, log zerolog.Logger) *Prometheus {
	p := &Prometheus{reg: prometheus.NewRegistry(), labelLimit: max(1, labelLimit), log: log,
		exeLabels: map[string]bool{}, userLabels: map[string]bool{}, ctrLabels: map[string]bool{}}
	for k := Kind(0); k < numKinds; k++ {
		help := "IMDS " + k.String() + " counted by imdsguard"
		p.total[k] = prometheus.NewCounter(prometheus.CounterOpts{Name: PromName(k), Help: help + "."})
		p.reg.MustRegister(p.total[k])
		if !k.PerProcess() {
			continue
		}
		p.byExe[k] = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsguard_" + promNames[k] + "_by_executable_total",
			Help: help + ", by executable (top N per interval, the rest as \"other\").",
		}, []string{"executable"})
		p.byUser[k] = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsguard_" + promNames[k] + "_by_user_total",
			Help: help + ", by user (top N per interval, the rest as \"other\").",
		}, []string{"user"})
		p.byCtr[k] = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsguard_" + promNames[k] + "_by_container_total",
			Help: help + ", by container: pod/NS/WORKLOAD/CONTAINER, ecs/FAMILY/CONTAINER, RUNTIME/NAME or host (top N per interval, the rest as \"other\").",
		}, []string{"container", "pod_namespace"})
		p.reg.MustRegister(p.byExe[k], p.byUser[k], p.byCtr[k])
	}
	p.info = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "imdsguard_instance_info",
		Help: "The EC2 instance the agent runs on (1 once learnt from IMDS).",
	}, []string{"instance_id", "account_id", "region", "availability_zone", "instance_type", "image_id"})
	p.reg.MustRegister(p.info)
	p.netnsServed = prometheus.NewGauge(prometheus.GaugeOpts{Name: "imdsguard_netns_served",
		Help: "Network namespaces (containers) served a broker endpoint, at the last interval's end."})
	p.netnsAdded = prometheus.NewCounter(prometheus.CounterOpts{Name: "imdsguard_netns_endpoints_added_total",
		Help: "Broker endpoints made in containers' network namespaces."})
	p.netnsRemoved = prometheus.NewCounter(prometheus.CounterOpts{Name: "imdsguard_netns_endpoints_removed_total",
		Help: "Broker endpoints closed in containers' network namespaces (last process exited, or shutdown)."})
	p.netnsFailed = prometheus.NewCounter(prometheus.CounterOpts{Name: "imdsguard_netns_endpoints_failed_total",
		Help: "Network namespaces that could not be served (port taken, lo down, over max_namespaces)."})
	p.reg.MustRegister(p.netnsServed, p.netnsAdded, p.netnsRemoved, p.netnsFailed)
	return p
}

// Handler serves the registry in the Prometheus exposition formats.
func (p *Prometheus) Handler() http.Handler {
	return promhttp.HandlerFor(p.reg, promhttp.HandlerOpts{})
}

// Listen binds addr and serves /metrics in the background until Close.
func (p *Prometheus) Listen(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen for Prometheus on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", p.Handler())
	p.mu.Lock()
	p.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	srv := p.srv
	p.mu.Unlock()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			p.log.Error().Err(err).Str("event", "prometheus_failed").Str("listen", addr).
				Msg("Prometheus endpoint stopped")
		}
	}()
	return nil
}

// Name implements Sink.
func (p *Prometheus) Name() string { return "prometheus" }

// Publish implements Sink.
func (p *Prometheus) Publish(_ context.Context, s Snapshot, id hostid.Identity, known bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if known {
		p.info.Reset()
		p.info.WithLabelValues(id.InstanceID, id.AccountID, id.Region, id.AvailabilityZone,
			id.InstanceType, id.ImageID).Set(1)
	}
	for k := Kind(0); k < numKinds; k++ {
		p.total[k].Add(float64(s.Totals[k]))
	}
	p.netnsServed.Set(float64(s.Netns.Served))
	// Cumulative counts: the counters advance by what is new since the last publish.
	for _, c := range []struct {
		ctr       prometheus.Counter
		now, last uint64
	}{{p.netnsAdded, s.Netns.Added, p.netnsLast.Added}, {p.netnsRemoved, s.Netns.Removed, p.netnsLast.Removed},
		{p.netnsFailed, s.Netns.Failed, p.netnsLast.Failed}} {
		if c.now > c.last {
			c.ctr.Add(float64(c.now - c.last))
		}
	}
	p.netnsLast = s.Netns
	p.add(p.byExe, p.exeLabels, s.ByExecutable, nil)
	p.add(p.byUser, p.userLabels, s.ByUser, nil)
	p.add(p.byCtr, p.ctrLabels, s.ByContainer, PodNamespace)
	return nil
}

// add advances the labelled counters by the interval's series; derive, when not nil,
// gives the value of a second label from the first.
func (p *Prometheus) add(vecs [numKinds]*prometheus.CounterVec, seen map[string]bool, series []Series, derive func(string) string) {
	for _, sr := range series {
		label := sr.Value
		if !seen[label] {
			if len(seen) >= p.labelLimit && label != Other {
				label = Other
			}
			seen[label] = true
		}
		values := []string{label}
		if derive != nil {
			values = append(values, derive(label))
		}
		for k := Kind(0); k < numKinds; k++ {
			if k.PerProcess() && sr.Counts[k] > 0 {
				vecs[k].WithLabelValues(values...).Add(float64(sr.Counts[k]))
			}
		}
	}
}

// Close implements Sink.
func (p *Prometheus) Close(ctx context.Context) error {
	p.mu.Lock()
	srv := p.srv
	p.mu.Unlock()
	if srv == nil {
		return nil
	}
	if err := srv.Shutdown(ctx); err != nil {
		return fmt.Errorf("stop Prometheus endpoint: %w", err)
	}
	return nil
}
