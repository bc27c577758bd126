package agent

import (
	"github.com/imdsguard/imdsguard/internal/agent/cgroup"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	"github.com/imdsguard/imdsguard/internal/agent/netns"
)

// serveNamespaces starts the manager of the broker's endpoints in containers' network
// namespaces (containers.max_namespaces > 0, with the broker). The kernel programs do
// not redirect to them yet: until they do, the namespaces served are published to
// memory only, and containers' connections keep the L4 allowlist.
func (a *agent) serveNamespaces() error {
	m, err := netns.New(netns.Config{Port: a.cfg.Broker.Port, MaxNamespaces: a.cfg.Containers.MaxNamespaces, HostNetns: a.netns,
		Cgroups: cgroup.NewPaths(a.cgroupRoot), CgroupRoot: a.cgroupRoot},
		a.broker, netns.NewMemory(), a.log)
	if err != nil {
		return err
	}
	a.namespaces = m
	a.tel.namespaces.Store(m)
	a.onClose(func() { a.closeNamespaces() })
	return nil
}

// ensureNamespace serves the network namespace of a connect event from a namespace
// other than the agent's. Cheap for a namespace already served or being served (one
// map look-up): it runs for every event.
func (a *agent) ensureNamespace(ev hook.Event) {
	if a.namespaces == nil || ev.NetnsCookie == a.netns || ev.Verdict == hook.VerdictDeny {
		return // a denied process gains nothing from a broker
	}
	a.namespaces.Ensure(netns.Origin{Cookie: ev.NetnsCookie, PID: ev.PID, StartBoottime: ev.StartBoottime, PPID: ev.PPID,
		CgroupID: ev.CgroupID})
}

// closeNamespaces unpublishes and closes every namespace endpoint; a second call is a
// no-op.
func (a *agent) closeNamespaces() {
	if a.namespaces == nil {
		return
	}
	if err := a.namespaces.Close(); err != nil {
		a.log.Error().Err(err).Str("event", "netns_close_failed").Msg("closing network namespace endpoints")
	}
}

// reportNamespaces hands the namespace endpoints' counts to the metrics.
func (a *agent) reportNamespaces() {
	if a.namespaces == nil {
		return
	}
	s := a.namespaces.Stats()
	a.tel.Metrics.SetNetns(metrics.NetnsStats{Served: s.Served, Added: s.Added, Removed: s.Removed, Failed: s.Failed + s.Refused})
}
