package dashboards

import (
	"encoding/json"
	"net/http/httptest"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	"github.com/imdsguard/imdsguard/internal/agent/metrics/metricstest"
)

// emittedDimensionSets is what the agent's CloudWatch sink sends (metrics.Datums) for an
// interval in which every kind was seen in a process of a container: each data point's
// dimension names, sorted and comma-joined, and the metric names sent with each.
func emittedDimensionSets(t *testing.T) map[string]map[string]bool {
	t.Helper()
	agg := metrics.NewAggregator(10, 10)
	for _, k := range metrics.Kinds() {
		agg.Observe(metrics.Observation{Kind: k, Exe: "/bin/x", User: "root", Container: "pod/ns/web/app"})
	}
	sets := map[string]map[string]bool{}
	for _, d := range metrics.Datums(agg.Flush(time.Now()), hostid.Identity{InstanceID: "i-1"}, true) {
		var names []string
		for _, dim := range d.Dimensions {
			names = append(names, *dim.Name)
		}
		sort.Strings(names)
		set := strings.Join(names, ",")
		if sets[set] == nil {
			sets[set] = map[string]bool{}
		}
		sets[set][*d.MetricName] = true
	}
	if len(sets) < 4 {
		t.Fatalf("dimension sets emitted: %v", sets)
	}
	return sets
}

var searchRE = regexp.MustCompile(`^SEARCH\('\{([^}]*)\} MetricName="([A-Za-z]+)"', '(Sum|SampleCount|Average|Maximum|Minimum)', \d+\)$`)

func TestCloudWatchDashboardUsesEmittedMetrics(t *testing.T) {
	var body struct {
		Widgets []struct {
			Type       string `json:"type"`
			Properties struct {
				Region  string  `json:"region"`
				Metrics [][]any `json:"metrics"`
			} `json:"properties"`
		} `json:"widgets"`
	}
	if err := json.Unmarshal(CloudWatch, &body); err != nil {
		t.Fatalf("cloudwatch.json: %v", err)
	}
	emitted := emittedDimensionSets(t)
	used := map[string]bool{}
	for i, w := range body.Widgets {
		if w.Type != "metric" {
			continue
		}
		if w.Properties.Region == "" || len(w.Properties.Metrics) == 0 {
			t.Errorf("widget %d: metric widgets need a region and metrics", i)
		}
		for _, m := range w.Properties.Metrics {
			if len(m) != 1 {
				t.Errorf("widget %d: only SEARCH expressions are used, got %v", i, m)
				continue
			}
			obj, _ := m[0].(map[string]any)
			expr, _ := obj["expression"].(string)
			sm := searchRE.FindStringSubmatch(expr)
			if sm == nil {
				t.Errorf("widget %d: expression %q", i, expr)
				continue
			}
			schema := strings.Split(sm[1], ",")
			if schema[0] != "IMDSGuard" {
				t.Errorf("widget %d: namespace %q, the default is IMDSGuard", i, schema[0])
			}
			dims := slices.Clone(schema[1:])
			sort.Strings(dims)
			set, ok := emitted[strings.Join(dims, ",")]
			switch {
			case !ok:
				t.Errorf("widget %d: dimension set %v is not emitted", i, dims)
			case !set[sm[2]]:
				t.Errorf("widget %d: metric %q is not emitted with dimensions %v", i, sm[2], dims)
			}
			used[sm[2]] = true
		}
	}
	for _, k := range metrics.Kinds() {
		if !used[k.String()] {
			t.Errorf("metric %s is on no widget", k)
		}
	}
}

var promNameRE = regexp.MustCompile(`\bimdsguard_[a-z_]+\b`)
var byRE = regexp.MustCompile(`\bby \(([a-z_, ]+)\)`)

func TestGrafanaDashboardUsesEmittedMetrics(t *testing.T) {
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(Grafana, &dash); err != nil {
		t.Fatalf("grafana.json: %v", err)
	}
	// What the agent's endpoint really exposes, with one labelled series per family.
	p := metrics.NewPrometheus(10, zerolog.Nop())
	agg := metrics.NewAggregator(10, 10)
	for _, k := range metrics.Kinds() {
		agg.Observe(metrics.Observation{Kind: k, Exe: "/bin/x", User: "root", Container: "pod/ns/web/app"})
	}
	if err := p.Publish(t.Context(), agg.Flush(time.Now()), hostid.Identity{}, false); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(p.Handler())
	defer srv.Close()
	fams, err := metricstest.Scrape(srv.Client(), srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	labels := map[string]map[string]bool{}
	for name, f := range fams {
		labels[name] = map[string]bool{}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				labels[name][l.GetName()] = true
			}
		}
	}
	targets := 0
	for _, panel := range dash.Panels {
		for _, tg := range panel.Targets {
			targets++
			refs := promNameRE.FindAllString(tg.Expr, -1)
			if len(refs) == 0 {
				t.Errorf("%s: %q references no imdsguard metric", panel.Title, tg.Expr)
			}
			for _, name := range refs {
				got, ok := labels[name]
				if !ok {
					t.Errorf("%s: %s is not exposed", panel.Title, name)
					continue
				}
				for _, by := range byRE.FindAllStringSubmatch(tg.Expr, -1) {
					for _, l := range strings.Split(by[1], ",") {
						if l = strings.TrimSpace(l); !got[l] {
							t.Errorf("%s: %s has no label %q", panel.Title, name, l)
						}
					}
				}
			}
		}
	}
	if targets < 6 {
		t.Errorf("only %d queries", targets)
	}
}
