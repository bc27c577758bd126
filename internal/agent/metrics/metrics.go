// Package metrics turns what the agent sees about IMDS traffic into MetadataNoToken-style
// counters with the process behind them: per interval, per instance, per executable, per
// user and per container (the workload: pod, ECS task, named container, or the host), with
// the number of values of each capped so that one host cannot run up a CloudWatch bill. Sinks publish each interval to CloudWatch (PutMetricData),
// Embedded Metric Format lines and a Prometheus endpoint. The aggregator also keeps a
// lifetime per-process table for `imdsguard status`.
package metrics

import (
	"cmp"
	"slices"
	"sync"
	"time"
)

// Kind is what was observed. Each kind is published as the metric of the same name.
type Kind int

// Kinds of observation. The first group describes IMDS traffic and carries the process
// (Executable, User, Container dimensions); the second is the agent's own health and is published
// per instance only.
const (
	// MetadataRequests counts every IMDS request (today: every connect() the hook sees).
	MetadataRequests Kind = iota
	// MetadataNoToken counts IMDSv1 requests answered (no session token).
	MetadataNoToken
	// MetadataNoTokenRejected counts IMDSv1 requests refused by policy.
	MetadataNoTokenRejected
	// MetadataWithToken counts IMDSv2 requests answered (with a session token).
	MetadataWithToken
	// MetadataTokenRequests counts session token requests (PUT /latest/api/token).
	MetadataTokenRequests
	// MetadataDenied counts connect() calls the kernel allowlist refused.
	MetadataDenied
	// CredentialFetches counts responses carrying IAM role credentials.
	CredentialFetches
	// TaskCredentialFetches counts task credentials the ECS endpoint handed out, and
	// PodCredentialFetches those the EKS Pod Identity agent did (docs/metrics.md: why
	// the endpoint is in the name, not a dimension).
	TaskCredentialFetches
	PodCredentialFetches
	// ForeignTaskCredentials counts ECS credential requests for an id handed to
	// another task (refused in enforce mode).
	ForeignTaskCredentials

	// EventsDropped counts kernel events lost (ring buffer or queue full).
	EventsDropped
	// EventsAggregated counts connects the kernel counted in a summary instead of
	// writing an event of their own (refused and UDP connects after the first).
	EventsAggregated
	// BrokerErrors counts requests the broker could not forward.
	BrokerErrors
	// FailModeActivations counts switches to the configured failure mode.
	FailModeActivations
	// BackstopDropped counts packets to IMDS the egress program dropped: from sockets
	// no connect() hook let through to it (raw sockets, DNAT).
	BackstopDropped

	numKinds
)

var kindNames = [numKinds]string{
	"MetadataRequests", "MetadataNoToken", "MetadataNoTokenRejected", "MetadataWithToken",
	"MetadataTokenRequests", "MetadataDenied", "CredentialFetches",
	"TaskCredentialFetches", "PodCredentialFetches", "ForeignTaskCredentials",
	"EventsDropped", "EventsAggregated", "BrokerErrors", "FailModeActivations", "BackstopDropped",
}

// String is the metric name.
func (k Kind) String() string {
	if k < 0 || k >= numKinds {
		return "Unknown"
	}
	return kindNames[k]
}

// PerProcess says whether the kind is published with Executable, User and Container
// dimensions.
func (k Kind) PerProcess() bool { return k < EventsDropped }

// Kinds lists every kind in publishing order.
func Kinds() []Kind {
	out := make([]Kind, numKinds)
	for i := range out {
		out[i] = Kind(i)
	}
	return out
}

// Other is the dimension value that stands for every executable (user, container) beyond
// the cap of an interval. Unknown stands for an empty one: for a container, a process
// whose cgroup is not known.
const (
	Other   = "other"
	Unknown = "unknown"
)

// maxDimensionValue is CloudWatch's limit on a dimension value's length.
const maxDimensionValue = 1024

// Observation is one thing seen. Count 0 means 1; Time zero means now.
type Observation struct {
	Kind Kind
	Exe  string // executable path; ignored for health kinds
	User string // user name, or the uid in decimal when the host has no name for it
	// Container is the ContainerValue of the process's container (Host for none); ""
	// when its cgroup is not known.
	Container string
	Count     uint64
	Time      time.Time
}

// Counts holds one number per kind.
type Counts [numKinds]uint64

// Get returns the count of k.
func (c *Counts) Get(k Kind) uint64 { return c[k] }

// Series is the counts of one dimension value (an executable, a user or a container) in
// an interval.
type Series struct {
	Value  string
	Counts Counts
}

// Snapshot is one closed interval, already capped.
type Snapshot struct {
	Start, End time.Time
	Totals     Counts
	// Netns is the state of the broker's endpoints in containers' network namespaces at
	// the interval's end: the agent's own health, published to Prometheus only (it
	// would cost CloudWatch metrics on every host, containers or not).
	Netns NetnsStats
	// ByExecutable, ByUser and ByContainer hold at most the cap, plus Other when
	// something was folded into it, ranked with the most IMDSv1 use first.
	ByExecutable []Series
	ByUser       []Series
	ByContainer  []Series
}

// seriesGroup is one per-process dimension and its capped series in an interval.
type seriesGroup struct {
	dim    string
	series []Series
}

// groups lists the per-process dimensions in publishing order, for the sinks.
func (s Snapshot) groups() []seriesGroup {
	return []seriesGroup{{DimExecutable, s.ByExecutable}, {DimUser, s.ByUser}, {DimContainer, s.ByContainer}}
}

// ProcessStats is the lifetime count of one (executable, user) pair, for status.
type ProcessStats struct {
	Exe       string    `json:"exe"`
	User      string    `json:"user"`
	Container string    `json:"container"` // the workload, as the Container dimension names it
	Requests  uint64    `json:"requests"`
	V1        uint64    `json:"v1"`
	V1Refused uint64    `json:"v1_rejected"`
	V2        uint64    `json:"v2"`
	Tokens    uint64    `json:"token_requests"`
	Denied    uint64    `json:"denied"`
	Creds     uint64    `json:"credential_fetches"`
	FirstSeen time.Time `json:"first_seen"`
	LastSeen  time.Time `json:"last_seen"`
}

// Aggregator counts observations per interval. It is safe for concurrent use; Observe
// takes one short lock and allocates only for a new executable, user or container.
type Aggregator struct {
	maxValues int // the cap per interval, for executables, users and containers
	maxProcs  int // lifetime table size
	now       func() time.Time

	mu     sync.Mutex
	start  time.Time
	totals Counts
	netns  NetnsStats
	byExe  map[string]*Counts
	byUser map[string]*Counts
	byCtr  map[string]*Counts
	procs  map[procKey]*ProcessStats
}

type procKey struct{ exe, user, container string }

// maxTracked bounds the distinct executables (and users) held within one interval,
// before the cap is applied at its end: a host spawning endless new binaries costs at
// most this much memory, the excess counted as Other at once.
const maxTracked = 10000

// NewAggregator returns an aggregator publishing at most maxExecutables executables
// (and as many users, and containers) per interval, the rest as Other. maxProcs bounds the status table
// (the least recently seen pair is forgotten first).
func NewAggregator(maxExecutables, maxProcs int) *Aggregator {
	a := &Aggregator{maxValues: max(1, maxExecutables), maxProcs: max(1, maxProcs), now: time.Now}
	a.reset(a.now())
	a.procs = map[procKey]*ProcessStats{}
	return a
}

func (a *Aggregator) reset(start time.Time) {
	a.start = start
	a.totals = Counts{}
	a.byExe = map[string]*Counts{}
	a.byUser = map[string]*Counts{}
	a.byCtr = map[string]*Counts{}
}

// Observe counts one observation.
func (a *Aggregator) Observe(o Observation) {
	if o.Kind < 0 || o.Kind >= numKinds {
		return
	}
	n := o.Count
	if n == 0 {
		n = 1
	}
	if o.Time.IsZero() {
		o.Time = a.now()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.totals[o.Kind] += n
	if !o.Kind.PerProcess() {
		return
	}
	exe, user := dimValue(o.Exe), dimValue(o.User)
	bump(a.byExe, exe, o.Kind, n)
	bump(a.byUser, user, o.Kind, n)
	ctr := dimValue(o.Container)
	bump(a.byCtr, ctr, o.Kind, n)
	a.recordProcess(exe, user, ctr, o.Kind, n, o.Time)
}

func dimValue(v string) string {
	if v == "" {
		return Unknown
	}
	if len(v) > maxDimensionValue {
		// Keep the end: the file name tells more than the directories.
		return v[len(v)-maxDimensionValue:]
	}
	return v
}

func bump(m map[string]*Counts, key string, k Kind, n uint64) {
	c, ok := m[key]
	if !ok {
		if len(m) >= maxTracked {
			key = Other
			if c, ok = m[key]; !ok {
				c = &Counts{}
				m[key] = c
			}
		} else {
			c = &Counts{}
			m[key] = c
		}
	}
	c[k] += n
}

func (a *Aggregator) recordProcess(exe, user, ctr string, k Kind, n uint64, t time.Time) {
	key := procKey{exe, user, ctr}
	p, ok := a.procs[key]
	if !ok {
		if len(a.procs) >= a.maxProcs {
			a.evictOldest()
		}
		p = &ProcessStats{Exe: exe, User: user, Container: ctr, FirstSeen: t}
		a.procs[key] = p
	}
	if t.After(p.LastSeen) {
		p.LastSeen = t
	}
	switch k {
	case MetadataRequests:
		p.Requests += n
	case MetadataNoToken:
		p.V1 += n
	case MetadataNoTokenRejected:
		p.V1Refused += n
	case MetadataWithToken:
		p.V2 += n
	case MetadataTokenRequests:
		p.Tokens += n
	case MetadataDenied:
		p.Denied += n
	case CredentialFetches:
		p.Creds += n
	}
}

// evictOldest is linear, but runs only when the table is full of distinct pairs, which
// a normal host never reaches.
func (a *Aggregator) evictOldest() {
	var oldest procKey
	var t time.Time
	first := true
	for k, p := range a.procs {
		if first || p.LastSeen.Before(t) {
			oldest, t, first = k, p.LastSeen, false
		}
	}
	delete(a.procs, oldest)
}

// NetnsStats are the counts of internal/agent/netns: namespaces served now, and
// endpoints added, removed and failed (refusals over max_namespaces included) since the
// agent started.
type NetnsStats struct {
	Served                 int
	Added, Removed, Failed uint64
}

// SetNetns records the network namespace endpoints' counts, for the next snapshot.
func (a *Aggregator) SetNetns(n NetnsStats) {
	a.mu.Lock()
	a.netns = n
	a.mu.Unlock()
}

// Flush closes the current interval at now and returns it, capped.
func (a *Aggregator) Flush(now time.Time) Snapshot {
	a.mu.Lock()
	s := Snapshot{Start: a.start, End: now, Totals: a.totals, Netns: a.netns}
	byExe, byUser, byCtr := a.byExe, a.byUser, a.byCtr
	a.reset(now)
	a.mu.Unlock()
	s.ByExecutable = capSeries(byExe, a.maxValues)
	s.ByUser = capSeries(byUser, a.maxValues)
	s.ByContainer = capSeries(byCtr, a.maxValues)
	return s
}

// Processes returns the lifetime table, most recently seen first.
func (a *Aggregator) Processes() []ProcessStats {
	a.mu.Lock()
	out := make([]ProcessStats, 0, len(a.procs))
	for _, p := range a.procs {
		out = append(out, *p)
	}
	a.mu.Unlock()
	slices.SortFunc(out, func(x, y ProcessStats) int {
		if c := y.LastSeen.Compare(x.LastSeen); c != 0 {
			return c
		}
		return cmp.Or(cmp.Compare(x.Exe, y.Exe), cmp.Compare(x.User, y.User))
	})
	return out
}

// capSeries keeps the top n values and sums the rest into Other. The ranking puts
// IMDSv1 use and denials first, because those are what an operator reads these metrics
// for: a rare IMDSv1 caller must not vanish into Other behind a busy IMDSv2 one.
func capSeries(m map[string]*Counts, n int) []Series {
	all := make([]Series, 0, len(m))
	var other *Series
	for v, c := range m {
		if v == Other {
			other = &Series{Value: Other, Counts: *c}
			continue
		}
		all = append(all, Series{Value: v, Counts: *c})
	}
	slices.SortFunc(all, func(x, y Series) int {
		return cmp.Or(
			cmp.Compare(y.Counts.attention(), x.Counts.attention()),
			cmp.Compare(y.Counts.activity(), x.Counts.activity()),
			cmp.Compare(x.Value, y.Value))
	})
	if len(all) > n {
		if other == nil {
			other = &Series{Value: Other}
		}
		for _, s := range all[n:] {
			for k := range s.Counts {
				other.Counts[k] += s.Counts[k]
			}
		}
		all = all[:n]
	}
	if other != nil {
		all = append(all, *other)
	}
	return all
}

func (c *Counts) attention() uint64 {
	return c[MetadataNoToken] + c[MetadataNoTokenRejected] + c[MetadataDenied]
}

func (c *Counts) activity() uint64 {
	var n uint64
	for k := Kind(0); k < EventsDropped; k++ {
		n += c[k]
	}
	return n
}
