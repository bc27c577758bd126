package docs

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	agentconfig "github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/containers"
	"github.com/imdsguard/imdsguard/internal/agent/events"
	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	correlatorconfig "github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/intake"
	"github.com/imdsguard/imdsguard/internal/testing/doctable"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// When one of these tests fails after you added or renamed a key, a field or a metric:
// add (or fix) its row on the page the message names, in the table it names.

func TestAgentConfigurationTable(t *testing.T) {
	const page = "agent-configuration.md"
	doctable.Compare(t, page, "agent-config", doctable.YAMLKeys(agentconfig.Config{}), "internal/agent/config.Config")
	checkDefaults(t, page, "agent-config", func(y []byte) (fmt.Stringer, error) { return agentconfig.Parse(y) })
}

func TestCorrelatorConfigurationTable(t *testing.T) {
	const page = "correlator-configuration.md"
	doctable.Compare(t, page, "correlator-config", doctable.YAMLKeys(correlatorconfig.Config{}), "internal/correlator/config.Config")
	checkDefaults(t, page, "correlator-config", func(y []byte) (fmt.Stringer, error) { return correlatorconfig.Parse(y) })
}

// checkDefaults sets each key of the table to the value its "default" cell gives, and
// requires the effective configuration to be the same as with nothing set. Keys inside a
// list ("rules[].exe") have no default and say so with "—".
func checkDefaults(t *testing.T, page, table string, parse func([]byte) (fmt.Stringer, error)) {
	t.Helper()
	base, err := parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range doctable.Table(t, page, table) {
		if len(r.Keys) != 1 || len(r.Cells) < 2 {
			t.Errorf("%s:%d: a row names one key and gives its default", page, r.Line)
			continue
		}
		key, cell := r.Keys[0], r.Cells[1]
		if strings.Contains(key, "[]") {
			if cell != "—" {
				t.Errorf("%s:%d: %s has no default of its own: write — in the default column", page, r.Line, key)
			}
			continue
		}
		m := regexp.MustCompile("^`([^`]*)`$").FindStringSubmatch(cell)
		if m == nil {
			t.Errorf("%s:%d: the default of %s must be one YAML value in backticks, got %q", page, r.Line, key, cell)
			continue
		}
		got, err := parse([]byte(nested(key, m[1])))
		if err != nil {
			t.Errorf("%s:%d: %s: the documented default %s is refused: %v", page, r.Line, key, m[1], err)
			continue
		}
		if got.String() != base.String() {
			t.Errorf("%s:%d: %s: the documented default %s is not the code's (see Default())", page, r.Line, key, m[1])
		}
	}
}

// nested turns ("a.b.c", "v") into the YAML "a:\n  b:\n    c: v\n".
func nested(key, value string) string {
	var b strings.Builder
	parts := strings.Split(key, ".")
	for i, p := range parts {
		b.WriteString(strings.Repeat("  ", i) + p + ":")
		if i == len(parts)-1 {
			b.WriteString(" " + value)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// The event fields are what the writer really puts on a line: write one event of each
// kind with every field set, and collect the keys.
func TestEventFieldsTable(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.jsonl")
	w, err := events.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	full := events.Record{Time: time.Now(), PID: 1, TID: 1, PPID: 1, UID: 1, GID: 1, User: "u", Comm: "c",
		Exe: "/e", ExeTruncated: true, Cmdline: []string{"c"}, Cgroup: "/g", CgroupID: 1, Unit: "u.service",
		ContainerID: "c", Container: containers.Info{ID: "c", Runtime: "containerd", Name: "n",
			Pod: containers.Pod{Namespace: "ns", Name: "p", UID: "u", Container: "c", ServiceAccount: "sa"},
			ECS: containers.ECSTask{ARN: "arn", Family: "f", Container: "c"}},
		Netns: 1, SocketCookie: 1, Dst: "169.254.169.254:80", Verdict: "allow", Rule: "r",
		Redirected: true, Agent: true, NoBroker: true, ExeBorrowed: true, Backstop: true, Missing: []string{"cmdline"}, Endpoint: "ecs", ForeignTask: "arn", Method: "GET", Path: "/", IMDSVersion: "v1", Status: 401,
		Refused: "imdsv2_required", DurationMS: 1}
	full.Count, full.First, full.UDP = 1, time.Now(), true
	for _, kind := range []string{events.KindConnect, events.KindRequest, events.KindPreexisting, events.KindConnectSummary} {
		r := full
		r.Kind = kind
		w.Write(r)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for line := range strings.Lines(string(data)) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("event line %q: %v", line, err)
		}
		for k := range m {
			seen[k] = true
		}
	}
	if len(seen) == 0 {
		t.Fatal("the writer wrote no event")
	}
	doctable.Compare(t, "events.md", "event-fields", sortedKeys(seen), "the lines internal/agent/events writes")
}

func TestAgentMetricsTable(t *testing.T) {
	const page = "metrics.md"
	var names []string
	perProcess := map[string]bool{}
	for _, k := range metrics.Kinds() {
		names = append(names, k.String())
		perProcess[k.String()] = k.PerProcess()
	}
	doctable.Compare(t, page, "agent-metrics", names, "internal/agent/metrics.Kinds()")
	for _, r := range doctable.Table(t, page, "agent-metrics") {
		if len(r.Keys) != 1 || len(r.Cells) < 3 {
			continue
		}
		says := strings.Contains(r.Cells[2], "executable") && strings.Contains(r.Cells[2], "user") &&
			strings.Contains(r.Cells[2], "container")
		if says != perProcess[r.Keys[0]] {
			t.Errorf("%s:%d: %s: the dimensions column says executable, user and container = %v, the code publishes them = %v",
				page, r.Line, r.Keys[0], says, perProcess[r.Keys[0]])
		}
	}
}

// The Prometheus families are what a scrape of the agent's registry returns, once every
// family has a sample.
func TestPrometheusFamiliesTable(t *testing.T) {
	p := metrics.NewPrometheus(10, zerolog.Nop())
	var all metrics.Counts
	for i := range all {
		all[i] = 1
	}
	snap := metrics.Snapshot{Totals: all, ByExecutable: []metrics.Series{{Value: "/e", Counts: all}},
		ByUser: []metrics.Series{{Value: "u", Counts: all}}, ByContainer: []metrics.Series{{Value: "pod/ns/w/c", Counts: all}}}
	if err := p.Publish(context.Background(), snap, hostid.Identity{InstanceID: "i-1"}, true); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	p.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	seen := map[string]bool{}
	for line := range strings.Lines(rec.Body.String()) {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "#" && f[1] == "TYPE" {
			seen[f[2]] = true
		}
	}
	if len(seen) == 0 {
		t.Fatalf("scrape returned no family:\n%s", rec.Body)
	}
	doctable.Compare(t, "metrics.md", "agent-prometheus", sortedKeys(seen), "a scrape of internal/agent/metrics.Prometheus")
}

func TestFindingTables(t *testing.T) {
	doctable.Compare(t, "findings.md", "finding-fields", doctable.JSONKeys(detector.Finding{}), "internal/correlator/detector.Finding")
	types := []string{detector.TypeOutsideAWS, detector.TypeInsideAWS, detector.TypeOtherInstance, detector.TypeResourceOutsideAWS}
	doctable.Compare(t, "findings.md", "finding-types", types, "internal/correlator/detector's Type constants")
}

func TestWireTables(t *testing.T) {
	var batch []string
	for _, k := range doctable.JSONKeys(wire.Batch{}) {
		if !strings.HasPrefix(k, "fingerprints[].") {
			batch = append(batch, k)
		}
	}
	doctable.Compare(t, "intake-api.md", "wire-batch", append(batch, "fingerprints"), "internal/wire.Batch")
	doctable.Compare(t, "intake-api.md", "wire-fingerprint", doctable.JSONKeys(wire.Fingerprint{}), "internal/wire.Fingerprint")
}

// The README is a front door, not a manual.
func TestReadmeIsShort(t *testing.T) {
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if n := len([]rune(string(data))); n > 10000 {
		t.Errorf("README.md has %d characters, at most 10,000: move the detail into a page under docs/", n)
	}
}

var linkRE = regexp.MustCompile(`\]\(([^)\s]+)\)`)

// Every relative link of the README and the pages leads to a file that exists, and every
// page is linked from the README.
func TestLinks(t *testing.T) {
	pages, err := filepath.Glob("*.md")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pages {
		if !strings.Contains(string(readme), "docs/"+p) {
			t.Errorf("README.md does not link docs/%s", p)
		}
	}
	for _, p := range append([]string{"../README.md"}, pages...) {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range linkRE.FindAllStringSubmatch(string(data), -1) {
			target, _, _ := strings.Cut(m[1], "#")
			if target == "" || strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			if _, err := os.Stat(filepath.Join(filepath.Dir(p), target)); err != nil {
				t.Errorf("%s: link %s leads nowhere: %v", p, m[1], err)
			}
		}
	}
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// TestPackagesTable keeps architecture.md's package table the map of the tree: every Go
// package (but the docs' own) has a row, and every row is a package.
func TestPackagesTable(t *testing.T) {
	var pkgs []string
	root := ".."
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") && path != root || d.Name() == "testdata" || d.Name() == "node_modules") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		rel, _ := filepath.Rel(root, filepath.Dir(path))
		if top := strings.Split(rel, string(filepath.Separator))[0]; top != "cmd" && top != "internal" && top != "tools" && top != "test" {
			return nil
		}
		if !slices.Contains(pkgs, rel) {
			pkgs = append(pkgs, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// test/e2e has only _test.go files: a package all the same.
	pkgs = append(pkgs, "test/e2e")
	doctable.Compare(t, "architecture.md", "packages", pkgs, "the Go packages under cmd/, internal/, test/ and tools/")
}

func TestIntakePrometheusFamiliesTable(t *testing.T) {
	h := intake.NewHandler(intake.Options{Log: zerolog.Nop()})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	seen := map[string]bool{}
	for line := range strings.Lines(rec.Body.String()) {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "#" && f[1] == "TYPE" {
			seen[f[2]] = true
		}
	}
	if len(seen) == 0 {
		t.Fatalf("scrape returned no family:\n%s", rec.Body)
	}
	doctable.Compare(t, "intake-api.md", "intake-prometheus", sortedKeys(seen), "a scrape of internal/correlator/intake's /metrics")
}
