package metrics

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/agent/metrics/metricstest"
)

func TestEMFLinesAreValid(t *testing.T) {
	a := NewAggregator(20, 100)
	a.Observe(Observation{Kind: MetadataRequests, Exe: "/usr/bin/curl", User: "root", Container: "ecs/billing/api", Count: 2})
	a.Observe(Observation{Kind: MetadataNoToken, Exe: "/usr/bin/curl", User: "root", Container: "ecs/billing/api"})
	a.Observe(Observation{Kind: EventsDropped, Count: 4})
	end := time.Date(2026, 11, 23, 10, 1, 0, 0, time.UTC)
	snap := a.Flush(end)
	var buf bytes.Buffer
	e := NewEMF(&buf, nil, "IMDSGuard")
	id := hostid.Identity{InstanceID: "i-0abc", Region: "eu-west-1"}
	if err := e.Publish(context.Background(), snap, id, true); err != nil {
		t.Fatal(err)
	}
	if err := e.Publish(context.Background(), snap, hostid.Identity{}, false); err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	sc := bufio.NewScanner(&buf)
	lines := 0
	for sc.Scan() {
		lines++
		vals, err := metricstest.ValidateEMF(sc.Bytes())
		if err != nil {
			t.Fatalf("line %d invalid: %v\n%s", lines, err, sc.Bytes())
		}
		if !strings.Contains(sc.Text(), fmt.Sprintf(`"Timestamp":%d`, end.UnixMilli())) {
			t.Errorf("timestamp is not the interval's end: %s", sc.Text())
		}
		for k, v := range vals {
			got[k] += v
		}
	}
	if lines != 8 {
		t.Errorf("%d lines, want 4 per publish (instance, executable, user, container)", lines)
	}
	for k, want := range map[string]float64{
		"MetadataRequests{InstanceId=i-0abc}":                          2,
		"MetadataNoToken{InstanceId=i-0abc}":                           1,
		"MetadataDenied{InstanceId=i-0abc}":                            0,
		"EventsDropped{InstanceId=i-0abc}":                             4,
		"MetadataRequests{Executable=/usr/bin/curl,InstanceId=i-0abc}": 2,
		"MetadataNoToken{InstanceId=i-0abc,User=root}":                 1,
		"MetadataRequests{}":                                           2,
		"MetadataRequests{Executable=/usr/bin/curl}":                   2,
		"MetadataNoToken{Container=ecs/billing/api,InstanceId=i-0abc}": 1,
		"MetadataRequests{Container=ecs/billing/api}":                  2,
	} {
		if v, ok := got[k]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", k, v, ok, want)
		}
	}
	if _, ok := got["MetadataDenied{Executable=/usr/bin/curl,InstanceId=i-0abc}"]; ok {
		t.Error("zero per-process metric written")
	}
}

// After rotation (rename, then SIGHUP → Reopen) lines go to a new file at the path.
func TestEMFReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "emf", "emf.log")
	e, err := OpenEMF(path, "IMDSGuard")
	if err != nil {
		t.Fatal(err)
	}
	a := NewAggregator(20, 10)
	if err := e.Publish(context.Background(), a.Flush(time.Now()), hostid.Identity{}, false); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := e.Reopen(); err != nil {
		t.Fatal(err)
	}
	if err := e.Publish(context.Background(), a.Flush(time.Now()), hostid.Identity{}, false); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + ".1"} {
		data, err := os.ReadFile(p)
		if err != nil || bytes.Count(data, []byte("\n")) != 1 {
			t.Errorf("%s: %q, %v", p, data, err)
		}
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v", p, fi.Mode())
		}
	}
}
