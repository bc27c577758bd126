package metrics

import (
	"fmt"
	"testing"
	"time"
)

func TestAggregatorCountsPerDimension(t *testing.T) {
	a := NewAggregator(20, 100)
	t0 := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	a.Observe(Observation{Kind: MetadataRequests, Exe: "/usr/bin/curl", User: "root", Time: t0})
	a.Observe(Observation{Kind: MetadataNoToken, Exe: "/usr/bin/curl", User: "root", Time: t0})
	a.Observe(Observation{Kind: MetadataRequests, Exe: "/usr/bin/curl", User: "nobody", Time: t0.Add(time.Second)})
	a.Observe(Observation{Kind: MetadataRequests, Exe: "/opt/app", User: "root", Count: 3, Time: t0})
	a.Observe(Observation{Kind: EventsDropped, Exe: "ignored", Count: 7})
	a.Observe(Observation{Kind: MetadataRequests}) // nothing known: "unknown"

	s := a.Flush(t0.Add(time.Minute))
	if s.Totals[MetadataRequests] != 6 || s.Totals[MetadataNoToken] != 1 || s.Totals[EventsDropped] != 7 {
		t.Errorf("totals %v", s.Totals)
	}
	got := map[string]Counts{}
	for _, sr := range s.ByExecutable {
		got[sr.Value] = sr.Counts
	}
	if got["/usr/bin/curl"][MetadataRequests] != 2 || got["/opt/app"][MetadataRequests] != 3 ||
		got[Unknown][MetadataRequests] != 1 || len(got) != 3 {
		t.Errorf("by executable %v", s.ByExecutable)
	}
	// The IMDSv1 user ranks first.
	if s.ByExecutable[0].Value != "/usr/bin/curl" {
		t.Errorf("ranking: %v", s.ByExecutable)
	}
	users := map[string]uint64{}
	for _, sr := range s.ByUser {
		users[sr.Value] = sr.Counts[MetadataRequests]
	}
	if users["root"] != 4 || users["nobody"] != 1 || users[Unknown] != 1 {
		t.Errorf("by user %v", users)
	}
	// The next interval starts empty.
	if s2 := a.Flush(t0.Add(2 * time.Minute)); s2.Totals != (Counts{}) || len(s2.ByExecutable) != 0 || !s2.Start.Equal(s.End) {
		t.Errorf("second interval %+v", s2)
	}
	// The status table outlives intervals.
	procs := a.Processes()
	if len(procs) != 4 {
		t.Fatalf("processes %+v", procs)
	}
	var curlRoot ProcessStats
	for _, p := range procs {
		if p.Exe == "/usr/bin/curl" && p.User == "root" {
			curlRoot = p
		}
	}
	if curlRoot.Requests != 1 || curlRoot.V1 != 1 || !curlRoot.LastSeen.Equal(t0) {
		t.Errorf("curl/root %+v", curlRoot)
	}
}

// 50 executables with a cap of 5: five get their own series, the other 45 sum into
// "other", and nothing is lost from the totals.
func TestCardinalityCap(t *testing.T) {
	a := NewAggregator(5, 100)
	for i := range 50 {
		a.Observe(Observation{Kind: MetadataRequests, Exe: fmt.Sprintf("/bin/p%02d", i), User: fmt.Sprintf("u%d", i),
			Count: uint64(100 + i)})
	}
	// A rare IMDSv1 caller outranks busy IMDSv2 ones.
	a.Observe(Observation{Kind: MetadataNoToken, Exe: "/bin/rare-v1", User: "u1"})
	s := a.Flush(time.Now())
	if len(s.ByExecutable) != 6 || s.ByExecutable[5].Value != Other {
		t.Fatalf("capped series: %d, last %q", len(s.ByExecutable), s.ByExecutable[len(s.ByExecutable)-1].Value)
	}
	if s.ByExecutable[0].Value != "/bin/rare-v1" || s.ByExecutable[1].Value != "/bin/p49" {
		t.Errorf("ranking: %q, %q", s.ByExecutable[0].Value, s.ByExecutable[1].Value)
	}
	var sum uint64
	for _, sr := range s.ByExecutable {
		sum += sr.Counts[MetadataRequests]
	}
	if sum != s.Totals[MetadataRequests] {
		t.Errorf("capped series sum to %d, total is %d", sum, s.Totals[MetadataRequests])
	}
	if len(s.ByUser) != 6 || s.ByUser[5].Value != Other {
		t.Errorf("users not capped: %d", len(s.ByUser))
	}
}

// Within one interval, memory is bounded even before the cap applies.
func TestTrackedValuesBounded(t *testing.T) {
	a := NewAggregator(3, 10)
	for i := range maxTracked + 500 {
		a.Observe(Observation{Kind: MetadataRequests, Exe: fmt.Sprintf("/tmp/x%d", i), User: "root"})
	}
	a.mu.Lock()
	n := len(a.byExe)
	procs := len(a.procs)
	a.mu.Unlock()
	if n > maxTracked+1 || procs != 10 {
		t.Errorf("tracked %d executables, %d processes", n, procs)
	}
	s := a.Flush(time.Now())
	if s.Totals[MetadataRequests] != maxTracked+500 || len(s.ByExecutable) != 4 {
		t.Errorf("totals %d, series %d", s.Totals[MetadataRequests], len(s.ByExecutable))
	}
}

// Observe sits on the event path: it must stay a short lock and no allocation for a
// known executable.
func BenchmarkObserve(b *testing.B) {
	a := NewAggregator(20, 4096)
	exes := make([]string, 50)
	for i := range exes {
		exes[i] = fmt.Sprintf("/usr/bin/prog%d", i)
	}
	now := time.Now()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		a.Observe(Observation{Kind: MetadataRequests, Exe: exes[i%len(exes)], User: "root", Time: now})
	}
}
