package agent

import (
	"context"

	"github.com/imdsguard/imdsguard/internal/agent/cgroup"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	"github.com/imdsguard/imdsguard/internal/agent/netns"
)

// serveNamespaces starts the manager of the broker's endpoints in containers' network
// namespaces (containers.max_namespaces > 0, with the broker). Each namespace served is
// published to the kernel, which redirects its connections to the endpoint inside it.
func (a *agent) serveNamespaces() error {
	m, err := netns.New(netns.Config{Port: a.cfg.Broker.Port, MaxNamespaces: a.cfg.Containers.MaxNamespaces, HostNetns: a.netns,
		Cgroups: cgroup.NewPaths(a.cgroupRoot), CgroupRoot: a.cgroupRoot},
		a.broker, kernelPublisher{a.h}, a.log)
	if err != nil {
		return err
	}
	a.namespaces = m
	a.tel.namespaces.Store(m)
	a.onClose(func() { a.closeNamespaces() })
	// Namespaces reported by the kernel at their first socket (a container being set
	// up), served before the container's process connects.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		err := a.h.RunDiscovery(ctx, func(s hook.NetnsSeen) {
			m.Ensure(netns.Origin{Cookie: s.NetnsCookie, PID: s.PID, StartBoottime: s.StartBoottime, PPID: s.PPID,
				CgroupID: s.CgroupID})
		})
		if err != nil {
			a.log.Error().Err(err).Str("event", "netns_discovery_failed").Msg("new network namespaces are served from their connect events only")
		}
	}()
	a.onClose(func() { cancel(); <-done })
	return nil
}

// ensureNamespace serves the network namespace of a connect event from a namespace
// other than the agent's. Cheap for a namespace already served or being served (one
// map look-up): it runs for every event.
func (a *agent) ensureNamespace(ev hook.Event) {
	if a.namespaces == nil || ev.NetnsCookie == a.netns || (ev.Verdict == hook.VerdictDeny && !ev.NoBroker) {
		return // a denied process gains nothing from a broker (unless a broker is what it lacked)
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

// kernelPublisher publishes the namespaces served to the kernel programs.
type kernelPublisher struct{ h *hook.Hook }

func (p kernelPublisher) Add(cookie uint64, f netns.Families) error {
	return p.h.PublishNetns(cookie, f.IPv4, f.IPv6)
}

func (p kernelPublisher) Remove(cookie uint64) error { return p.h.UnpublishNetns(cookie) }
