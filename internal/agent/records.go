package agent

import (
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/imdsguard/imdsguard/internal/agent/broker"
	"github.com/imdsguard/imdsguard/internal/agent/events"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	"github.com/imdsguard/imdsguard/internal/agent/procinfo"
	"github.com/imdsguard/imdsguard/internal/agent/tally"
)

func (a *agent) connectRecord(ev hook.Event) events.Record {
	info := a.resolver.Resolve(procinfo.Process{
		PID: ev.PID, StartBoottime: ev.StartBoottime, UID: ev.UID, CgroupID: ev.CgroupID,
		ExePath: ev.ExePath, ExeDev: ev.ExeDev, ExeIno: ev.ExeIno,
	})
	return events.Record{
		Kind: events.KindConnect, Time: ev.Time, PID: ev.PID, TID: ev.TID, PPID: ev.PPID, UID: ev.UID, GID: ev.GID,
		User: info.User, Comm: ev.Comm, Exe: info.Exe,
		ExeTruncated: ev.ExeTruncated && info.Exe == ev.ExePath,
		Cmdline:      info.Cmdline, Cgroup: info.Cgroup, CgroupID: ev.CgroupID, Unit: info.Unit,
		ContainerID: info.ContainerID, Container: info.Container, Netns: ev.NetnsCookie, SocketCookie: ev.SocketCookie,
		Dst: ev.Dst.String(), Verdict: ev.Verdict.String(), Rule: a.ruleName(ev.Rule),
		Redirected: ev.Redirected, Agent: ev.Agent, NoBroker: ev.NoBroker, ExeBorrowed: ev.ExeBorrowed,
		Missing: info.Missing,
	}
}

// summaryRecord is the imds_connect_summary line of one kernel aggregate.
func (a *agent) summaryRecord(ag hook.Aggregate) events.Record {
	info := a.resolver.Resolve(procinfo.Process{
		PID: ag.PID, StartBoottime: ag.StartBoottime, UID: ag.UID, CgroupID: ag.CgroupID,
		ExeDev: ag.ExeDev, ExeIno: ag.ExeIno,
	})
	host := a.cfg.IMDS.IPv4
	if ag.Family == unix.AF_INET6 {
		host = a.cfg.IMDS.IPv6
	}
	dst := net.JoinHostPort(host, strconv.Itoa(a.cfg.IMDS.Port))
	return events.Record{
		Kind: events.KindConnectSummary, Time: ag.Last, First: ag.First, Count: ag.Count, UDP: ag.UDP,
		PID: ag.PID, UID: ag.UID, GID: ag.GID, User: info.User, Exe: info.Exe, Cmdline: info.Cmdline,
		Cgroup: info.Cgroup, CgroupID: ag.CgroupID, Unit: info.Unit, ContainerID: info.ContainerID,
		Container: info.Container, Netns: ag.NetnsCookie, Dst: dst, Verdict: ag.Verdict.String(),
		Rule: a.ruleName(ag.Rule), NoBroker: ag.NoBroker, ExeBorrowed: ag.ExeBorrowed, Backstop: ag.Backstop,
		Missing: info.Missing,
	}
}

// recordRequest writes one imds_request line. The process comes from the connect event
// of the same socket when the agent has seen it, else from the broker's kernel record.
func (a *agent) recordRequest(req broker.Request) {
	rec, ok := a.recent.get(req.Conn.SocketCookie)
	// The kernel sent the connect event long before this request was answered, but the
	// ring-buffer reader may still be behind it; its record carries the exe path the
	// kernel saw, which /proc no longer has once a short-lived client exited. This runs
	// after the client has its answer: waiting costs the client nothing.
	for wait := time.Millisecond; !ok && wait <= 64*time.Millisecond; wait *= 2 {
		time.Sleep(wait)
		rec, ok = a.recent.get(req.Conn.SocketCookie)
	}
	if !ok {
		c := req.Conn
		info := a.resolver.Resolve(procinfo.Process{PID: c.PID, StartBoottime: c.StartBoottime, UID: c.UID,
			CgroupID: c.CgroupID, ExeDev: c.ExeDev, ExeIno: c.ExeIno})
		rec = events.Record{PID: c.PID, TID: c.TID, UID: c.UID, GID: c.GID, User: info.User, Exe: info.Exe,
			Cmdline: info.Cmdline, Cgroup: info.Cgroup, CgroupID: c.CgroupID, Unit: info.Unit,
			ContainerID: info.ContainerID, Container: info.Container, Netns: req.Netns, SocketCookie: c.SocketCookie, Dst: c.Dst.String(),
			Verdict: c.Verdict.String(), Rule: a.ruleName(c.Rule), Redirected: true, Missing: info.Missing}
	}
	a.recordCredential(req, rec)
	a.observeRequest(req, rec)
	rec.Kind = events.KindRequest
	rec.Time = req.Started
	rec.Endpoint, rec.ForeignTask = string(req.Endpoint), req.ForeignTask
	rec.Method, rec.Path, rec.IMDSVersion = req.Method, req.Path, string(req.Version)
	rec.Status, rec.Refused, rec.WouldRefuse = req.Status, req.Refused, req.WouldRefuse
	rec.DurationMS = float64(req.Duration.Microseconds()) / 1000
	a.reqMu.RLock()
	defer a.reqMu.RUnlock()
	if a.reqClosed {
		a.reqDrops.Add(1)
		return
	}
	select {
	case a.requests <- rec:
	default:
		a.reqDrops.Add(1) // reported with the other loss counters
	}
}

// recent remembers the last connect records by socket cookie, for the broker's
// request lines. Bounded: the oldest entry goes first.
type recent struct {
	mu    sync.Mutex
	max   int
	order []uint64
	m     map[uint64]events.Record
}

func newRecent(max int) *recent {
	return &recent{max: max, m: make(map[uint64]events.Record, max)}
}

func (r *recent) put(cookie uint64, rec events.Record) {
	if cookie == 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.m[cookie]; !ok {
		if len(r.order) >= r.max {
			delete(r.m, r.order[0])
			r.order = r.order[1:]
		}
		r.order = append(r.order, cookie)
	}
	r.m[cookie] = rec
}

func (r *recent) get(cookie uint64) (events.Record, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rec, ok := r.m[cookie]
	return rec, ok
}

// observeRequest counts a brokered request in the metrics, MetadataNoToken-style.
func (a *agent) observeRequest(req broker.Request, rec events.Record) {
	var kind metrics.Kind
	who := tally.Who{Exe: rec.Exe, Unit: rec.Unit, User: rec.User}
	if req.ForeignTask != "" {
		a.tel.observeProcess(metrics.ForeignTaskCredentials, rec, req.Started)
	}
	if req.Endpoint != "" && req.Endpoint != broker.EndpointIMDS {
		a.observeEndpointRequest(req, rec)
		return
	}
	switch {
	case req.Refused == "imdsv2_required":
		kind = metrics.MetadataNoTokenRejected
		a.ledger.Observe(tally.V1Rejected, who, req.Started)
	case req.Refused == "upstream_error":
		a.tel.Metrics.Observe(metrics.Observation{Kind: metrics.BrokerErrors, Count: 1})
		return
	case req.Refused != "":
		return
	case req.Version == broker.VersionV1:
		kind = metrics.MetadataNoToken
		a.ledger.Observe(tally.V1, who, req.Started)
		if req.WouldRefuse != "" {
			a.ledger.Observe(tally.V1WouldReject, who, req.Started)
		}
	case req.Version == broker.VersionV2:
		kind = metrics.MetadataWithToken
		a.ledger.Observe(tally.V2, who, req.Started)
	case req.Version == broker.VersionToken:
		kind = metrics.MetadataTokenRequests
		a.ledger.Observe(tally.Token, who, req.Started)
	}
	a.tel.observeProcess(kind, rec, req.Started)
	if req.Body != nil {
		a.tel.observeProcess(metrics.CredentialFetches, rec, req.Started)
		a.ledger.Observe(tally.Credential, who, req.Started)
	}
}

// observeEndpointRequest counts a request to the ECS or Pod Identity endpoint: as a
// request (MetadataRequests counts connects, not these), a broker error, or a credential
// fetch of its endpoint. They carry no IMDS version, so none of the MetadataNoToken
// family counts them.
func (a *agent) observeEndpointRequest(req broker.Request, rec events.Record) {
	switch {
	case req.Refused == "upstream_error":
		a.tel.Metrics.Observe(metrics.Observation{Kind: metrics.BrokerErrors, Count: 1})
	case req.Body == nil:
	case req.Endpoint == broker.EndpointECS:
		a.tel.observeProcess(metrics.TaskCredentialFetches, rec, req.Started)
	case req.Endpoint == broker.EndpointPodIdentity:
		a.tel.observeProcess(metrics.PodCredentialFetches, rec, req.Started)
	}
}
