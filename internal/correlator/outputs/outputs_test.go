package outputs

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/wire"
)

func sample() []detector.Finding {
	t0 := time.Date(2026, 11, 20, 10, 0, 0, 0, time.UTC)
	return []detector.Finding{
		{ID: "f1", Type: detector.TypeOutsideAWS, Severity: detector.High, AccessKeyID: "ASIA1", SourceIP: "192.0.2.66",
			InstanceID: "i-0123456789abcdef0", AccountID: "111111111111", Role: "web", Region: "us-east-1", IMDSVersion: "v1",
			Processes: []wire.Process{{PID: 42, Exe: "/usr/bin/curl", User: "root"}}, FirstSeen: t0, LastSeen: t0.Add(time.Minute), Count: 3,
			CredentialSource: "fingerprint", Reason: "outside"},
		{ID: "f2", Type: detector.TypeResourceOutsideAWS, Severity: detector.High, AccessKeyID: "ASIA2", SourceIP: "2001:db8::1",
			FunctionName: "fn", AccountID: "111111111111", Role: "r", FirstSeen: t0, LastSeen: t0, Count: 1, Suppressed: true, SuppressedBy: "trusted_cidrs"},
	}
}

func TestJSONLinesSchema(t *testing.T) {
	var b bytes.Buffer
	if err := WriteJSONLines(&b, sample()); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines", len(lines))
	}
	var m map[string]any
	json.Unmarshal([]byte(lines[0]), &m)
	for _, k := range []string{"type", "severity", "access_key_id", "source_ip", "instance_id", "account_id", "role", "first_seen", "last_seen", "count", "suppressed"} {
		if _, ok := m[k]; !ok {
			t.Errorf("field %s missing: %s", k, lines[0])
		}
	}
	json.Unmarshal([]byte(lines[1]), &m)
	if m["function_name"] != "fn" || m["suppressed"] != true {
		t.Errorf("lambda finding: %s", lines[1])
	}
}

func TestASFFFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "findings.asff.json")
	if err := WriteASFFFile(p, sample(), "", time.Now()); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(p)
	var doc struct{ Findings []ASFF }
	if err := json.Unmarshal(data, &doc); err != nil || len(doc.Findings) != 2 {
		t.Fatalf("%v %s", err, data)
	}
	a := doc.Findings[0]
	if a.SchemaVersion != "2018-10-08" || a.Severity.Label != "HIGH" || a.ProductARN != "arn:aws:securityhub:us-east-1:111111111111:product/111111111111/default" ||
		a.Network.SourceIPV4 != "192.0.2.66" || a.Process.Path != "/usr/bin/curl" || a.Resources[1].Type != "AwsEc2Instance" || a.Workflow.Status != "NEW" {
		t.Fatalf("%+v", a)
	}
	if b := doc.Findings[1]; b.Workflow.Status != "SUPPRESSED" || b.Network.SourceIPV6 != "2001:db8::1" || b.Resources[1].Type != "AwsLambdaFunction" {
		t.Fatalf("%+v", b)
	}
}

func TestWebhookRetries(t *testing.T) {
	var calls atomic.Int32
	var got detector.Finding
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) < 3 {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		json.NewDecoder(r.Body).Decode(&got)
	}))
	defer srv.Close()
	wh := &Webhook{URL: srv.URL, Retries: 3, Backoff: time.Millisecond, Log: zerolog.Nop()}
	if err := wh.Send(context.Background(), sample()[0]); err != nil {
		t.Fatal(err)
	}
	if calls.Load() != 3 || got.ID != "f1" || got.Processes[0].Exe != "/usr/bin/curl" {
		t.Fatalf("calls %d got %+v", calls.Load(), got)
	}
	// A refusal is not retried; spent retries are an error.
	calls.Store(-100)
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		http.Error(w, "no", http.StatusBadRequest)
	}))
	defer bad.Close()
	wh.URL = bad.URL
	if err := wh.Send(context.Background(), sample()[0]); err == nil || calls.Load() != -99 {
		t.Fatalf("err %v calls %d", err, calls.Load())
	}
}

func TestMetrics(t *testing.T) {
	var b bytes.Buffer
	if err := WriteMetrics(&b, "Security/imdsguard", CountFindings(sample()), time.Unix(1700000000, 0)); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), `"Namespace":"Security/imdsguard"`) || strings.Count(b.String(), "\n") != 2 {
		t.Fatal(b.String())
	}
}
