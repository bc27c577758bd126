package agent

import (
	"testing"
	"time"

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
