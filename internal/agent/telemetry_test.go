package agent

import (
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/containers"
	"github.com/imdsguard/imdsguard/internal/agent/events"
	"github.com/imdsguard/imdsguard/internal/agent/metrics"
)

// The event loop's one call: an allowed connect is a request, a denied one (the
// allowlist's EPERM) is MetadataDenied, and a uid without a name is counted by number.
func TestObserveConnect(t *testing.T) {
	tel := &telemetry{Metrics: metrics.NewAggregator(20, 100)}
	now := time.Now()
	tel.observeConnect(events.Record{Time: now, Exe: "/usr/bin/curl", User: "root", Verdict: "allow"})
	tel.observeConnect(events.Record{Time: now, Exe: "/tmp/x", UID: 4242, Verdict: "deny"})
	tel.observeDrops(3)
	tel.observeDrops(0)
	s := tel.Metrics.Flush(now)
	if s.Totals[metrics.MetadataRequests] != 1 || s.Totals[metrics.MetadataDenied] != 1 || s.Totals[metrics.EventsDropped] != 3 {
		t.Errorf("totals %v", s.Totals)
	}
	users := map[string]bool{}
	for _, u := range s.ByUser {
		users[u.Value] = true
	}
	if !users["root"] || !users["4242"] {
		t.Errorf("users %v", s.ByUser)
	}
}

// Every per-process count carries the workload of the record's container: the pod, the
// host for a process in none, unknown when its cgroup is not known, and the host for a
// cgroup merely named like a container (no runtime made it: rec.Container is empty).
func TestObserveByContainer(t *testing.T) {
	tel := &telemetry{Metrics: metrics.NewAggregator(20, 100)}
	now := time.Now()
	pod := containers.Info{ID: "c0ffee", Runtime: containers.CRIO,
		Pod: containers.Pod{Namespace: "shop", Name: "web-7d9f8b6c5d-x2x7k", Container: "app"}}
	tel.observeConnect(events.Record{Time: now, Exe: "/app", User: "root", Verdict: "allow",
		Cgroup: "/kubepods.slice/x/crio-c0ffee.scope", ContainerID: "c0ffee", Container: pod})
	tel.observeProcess(metrics.MetadataNoToken, events.Record{Exe: "/app", UID: 0, Cgroup: "/kubepods.slice/x", Container: pod}, now)
	tel.observeSummary(events.Record{Time: now, Exe: "/usr/bin/curl", User: "root", Verdict: "deny", Count: 4,
		Cgroup: "/system.slice/cloud-init.service"})
	tel.observeConnect(events.Record{Time: now, Exe: "/x", User: "u", Verdict: "allow",
		Cgroup: "/user.slice/user-1000.slice/docker-" + strings.Repeat("a", 64) + ".scope", ContainerID: strings.Repeat("a", 64)})
	tel.observeConnect(events.Record{Time: now, Exe: "/gone", Verdict: "allow"})
	got := map[string]metrics.Counts{}
	for _, sr := range tel.Metrics.Flush(now).ByContainer {
		got[sr.Value] = sr.Counts
	}
	if c := got["pod/shop/web/app"]; len(got) != 3 || c.Get(metrics.MetadataRequests) != 1 || c.Get(metrics.MetadataNoToken) != 1 {
		t.Errorf("pod: %v", got)
	}
	if c := got[metrics.Host]; c.Get(metrics.MetadataDenied) != 4 || c.Get(metrics.MetadataRequests) != 1 {
		t.Errorf("host: %v", c)
	}
	if c := got[metrics.Unknown]; c.Get(metrics.MetadataRequests) != 1 {
		t.Errorf("unknown: %v", c)
	}
}
