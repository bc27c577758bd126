package tally

import (
	"path/filepath"
	"testing"
	"time"
)

func TestLedgerSurvivesRestartAndReports(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "usage.json")
	now := time.Date(2026, 11, 23, 12, 30, 0, 0, time.UTC)
	l, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	l.since = now.Add(-72 * time.Hour)
	l.SetInstance("i-1")
	legacy := Who{Exe: "/opt/legacy/bin/app", Unit: "legacy.service", User: "app"}
	modern := Who{Exe: "/usr/bin/aws", User: "root"}
	l.Observe(V1, legacy, now.Add(-30*time.Hour)) // outside a 24h window
	l.Observe(V2, modern, now.Add(-time.Hour))
	l.Observe(Token, modern, now.Add(-time.Hour))
	l.Observe(Denied, Who{Exe: "/usr/bin/python3", User: "www-data"}, now.Add(-2*time.Hour))
	if err := l.Save(now); err != nil {
		t.Fatal(err)
	}
	// A restarted agent picks up where the last one stopped.
	l2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	r := l2.Report(24*time.Hour, now)
	if !r.ReadyForV2 || !r.Covered || r.InstanceID != "i-1" || len(r.Rows) != 2 ||
		r.Command != "aws ec2 modify-instance-metadata-options --instance-id i-1 --http-tokens required --http-endpoint enabled" {
		t.Fatalf("24h report %+v", r)
	}
	r = l2.Report(48*time.Hour, now)
	if r.ReadyForV2 || r.Command != "" || r.Rows[0].Who != legacy || r.Rows[0].V1 != 1 {
		t.Fatalf("48h report %+v", r)
	}
	l2.Observe(V1Rejected, legacy, now)
	if r := l2.Report(time.Hour, now); r.ReadyForV2 {
		t.Fatal("a refused IMDSv1 request still means a process wants v1")
	}
	if r := l2.Report(100*time.Hour, now); r.Covered {
		t.Fatal("a window longer than the ledger claims to be covered")
	}
	// Retention.
	if err := l2.Save(now.Add(Retention + 48*time.Hour)); err != nil {
		t.Fatal(err)
	}
	l3, _ := Open(path)
	if r := l3.Report(Retention*2, now.Add(Retention+48*time.Hour)); len(r.Rows) != 0 {
		t.Fatalf("old buckets kept: %+v", r.Rows)
	}
}

// The running agent hands its live tally to `imdsguard report` as a snapshot; decoded,
// it reports what the ledger itself would, V1WouldReject included.
func TestSnapshotDecode(t *testing.T) {
	l, err := Open(t.TempDir() + "/usage.json")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	who := Who{Exe: "/usr/bin/curl", User: "root"}
	l.Observe(V1, who, now)
	l.Observe(V1WouldReject, who, now)
	data, err := l.Snapshot(now)
	if err != nil {
		t.Fatal(err)
	}
	live, err := Decode(data)
	if err != nil {
		t.Fatal(err)
	}
	r := live.Report(time.Hour, now)
	if len(r.Rows) != 1 || r.Rows[0].V1 != 1 || r.Rows[0].V1WouldReject != 1 || r.ReadyForV2 {
		t.Fatalf("report from snapshot %+v", r)
	}
	if _, err := Decode([]byte("{")); err == nil {
		t.Fatal("a corrupt snapshot decoded")
	}
}
