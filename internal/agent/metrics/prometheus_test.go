package metrics

import (
	"context"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/agent/metrics/metricstest"
)

func TestPrometheusScrape(t *testing.T) {
	p := NewPrometheus(3, zerolog.Nop())
	srv := httptest.NewServer(p.Handler())
	defer srv.Close()

	fams, err := metricstest.Scrape(srv.Client(), srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := metricstest.Counter(fams, "imdsguard_metadata_no_token_total", "", ""); !ok || v != 0 {
		t.Errorf("fresh counter = %v, %v", v, ok)
	}

	a := NewAggregator(20, 100)
	a.Observe(Observation{Kind: MetadataRequests, Exe: "/usr/bin/curl", User: "root", Count: 2})
	a.Observe(Observation{Kind: MetadataNoToken, Exe: "/usr/bin/curl", User: "nobody"})
	id := hostid.Identity{InstanceID: "i-0abc", AccountID: "123456789012", Region: "eu-west-1"}
	if err := p.Publish(context.Background(), a.Flush(time.Now()), id, true); err != nil {
		t.Fatal(err)
	}
	a.Observe(Observation{Kind: MetadataRequests, Exe: "/usr/bin/curl", User: "root"})
	// Later executables beyond the lifetime label limit (3) count as "other".
	for _, exe := range []string{"/a", "/b", "/c"} {
		a.Observe(Observation{Kind: MetadataRequests, Exe: exe, User: "root"})
	}
	if err := p.Publish(context.Background(), a.Flush(time.Now()), id, true); err != nil {
		t.Fatal(err)
	}
	if fams, err = metricstest.Scrape(srv.Client(), srv.URL); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		family, label, value string
		want                 float64
	}{
		{"imdsguard_metadata_requests_total", "", "", 6},
		{"imdsguard_metadata_no_token_total", "", "", 1},
		{"imdsguard_metadata_requests_by_executable_total", "executable", "/usr/bin/curl", 3},
		{"imdsguard_metadata_no_token_by_user_total", "user", "nobody", 1},
		{"imdsguard_metadata_requests_by_user_total", "user", "root", 6},
	} {
		if v, ok := metricstest.Counter(fams, c.family, c.label, c.value); !ok || v != c.want {
			t.Errorf("%s{%s=%q} = %v (present %v), want %v", c.family, c.label, c.value, v, ok, c.want)
		}
	}
	labels := map[string]bool{}
	for _, m := range fams["imdsguard_metadata_requests_by_executable_total"].GetMetric() {
		labels[m.GetLabel()[0].GetValue()] = true
	}
	if len(labels) != 4 || !labels[Other] {
		t.Errorf("executable labels %v: want 3 plus other", labels)
	}
	info := fams["imdsguard_instance_info"]
	if info == nil || len(info.GetMetric()) != 1 {
		t.Fatalf("instance info %v", info)
	}
}

// The netns endpoints' counts arrive cumulative each interval; the counters advance by
// what is new, the gauge is the last value.
func TestPrometheusNetnsEndpoints(t *testing.T) {
	p := NewPrometheus(3, zerolog.Nop())
	srv := httptest.NewServer(p.Handler())
	defer srv.Close()
	a := NewAggregator(20, 100)
	for _, n := range []NetnsStats{{Served: 3, Added: 4, Removed: 1, Failed: 2}, {Served: 1, Added: 5, Removed: 4, Failed: 2}} {
		a.SetNetns(n)
		if err := p.Publish(context.Background(), a.Flush(time.Now()), hostid.Identity{}, false); err != nil {
			t.Fatal(err)
		}
	}
	fams, err := metricstest.Scrape(srv.Client(), srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]float64{"imdsguard_netns_endpoints_added_total": 5,
		"imdsguard_netns_endpoints_removed_total": 4, "imdsguard_netns_endpoints_failed_total": 2} {
		if v, ok := metricstest.Counter(fams, name, "", ""); !ok || v != want {
			t.Errorf("%s = %v (%v), want %v", name, v, ok, want)
		}
	}
	if v, ok := metricstest.Gauge(fams, "imdsguard_netns_served"); !ok || v != 1 {
		t.Errorf("imdsguard_netns_served = %v (%v), want 1", v, ok)
	}
}
