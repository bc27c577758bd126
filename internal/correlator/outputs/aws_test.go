package outputs

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/eventbridge"
	"github.com/aws/aws-sdk-go-v2/service/securityhub"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// signedJSON checks what every SDK request must carry and decodes its JSON body.
func signedJSON(t *testing.T, r *http.Request, v any) bool {
	t.Helper()
	if !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 Credential=AKIDTEST/") {
		t.Errorf("unsigned request: %q", r.Header.Get("Authorization"))
		return false
	}
	body, _ := io.ReadAll(r.Body)
	if err := json.Unmarshal(body, v); err != nil {
		t.Errorf("body %s: %v", body, err)
		return false
	}
	return true
}

// eventBridgeStandIn decodes PutEvents (AWS JSON 1.1, X-Amz-Target AWSEvents.PutEvents)
// and refuses the first entry of the first call, as a throttled bus does.
type eventBridgeStandIn struct {
	t       *testing.T
	mu      sync.Mutex
	calls   int
	entries []map[string]any
}

func (s *eventBridgeStandIn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.Method != http.MethodPost || r.Header.Get("X-Amz-Target") != "AWSEvents.PutEvents" ||
		r.Header.Get("Content-Type") != "application/x-amz-json-1.1" {
		s.t.Errorf("unexpected request %s %s target %q type %q", r.Method, r.URL.Path, r.Header.Get("X-Amz-Target"), r.Header.Get("Content-Type"))
		http.Error(w, "unexpected", http.StatusBadRequest)
		return
	}
	var in struct{ Entries []map[string]any }
	if !signedJSON(s.t, r, &in) {
		http.Error(w, "bad", http.StatusBadRequest)
		return
	}
	s.calls++
	type result struct {
		EventId      string `json:",omitempty"`
		ErrorCode    string `json:",omitempty"`
		ErrorMessage string `json:",omitempty"`
	}
	var out struct {
		FailedEntryCount int
		Entries          []result
	}
	for i, e := range in.Entries {
		if s.calls == 1 && i == 0 {
			out.FailedEntryCount++
			out.Entries = append(out.Entries, result{ErrorCode: "ThrottlingException", ErrorMessage: "slow down"})
			continue
		}
		s.entries = append(s.entries, e)
		out.Entries = append(out.Entries, result{EventId: "ev-" + e["Detail"].(string)[:8]})
	}
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	json.NewEncoder(w).Encode(out)
}

func testBatch(fs []detector.Finding) *Batch {
	return &Batch{Changed: fs, All: fs, Counts: CountFindings(fs), Time: time.Date(2026, 11, 20, 11, 0, 0, 0, time.UTC)}
}

func TestEventBridgePutEventsGuardDutyShape(t *testing.T) {
	stand := &eventBridgeStandIn{t: t}
	srv := httptest.NewServer(stand)
	defer srv.Close()
	client := eventbridge.New(eventbridge.Options{Region: "eu-west-1", BaseEndpoint: aws.String(srv.URL),
		Credentials: credentials.NewStaticCredentialsProvider("AKIDTEST", "secret", "")})
	eb := &EventBridge{Client: client, Bus: "default", Source: "imdsguard", Retry: Retry{Retries: 2, Backoff: time.Millisecond}, Log: zerolog.Nop()}
	// 12 unsuppressed findings: two calls of at most 10, and the suppressed one is not sent.
	var fs []detector.Finding
	for i := range 12 {
		f := sample()[0]
		f.ID = f.ID + "-" + string(rune('a'+i))
		fs = append(fs, f)
	}
	fs = append(fs, sample()[1])
	if err := eb.Deliver(context.Background(), testBatch(fs)); err != nil {
		t.Fatal(err)
	}
	stand.mu.Lock()
	defer stand.mu.Unlock()
	// 10 + the refused one again + 2.
	if stand.calls != 3 || len(stand.entries) != 12 {
		t.Fatalf("%d calls, %d entries", stand.calls, len(stand.entries))
	}
	seen := map[string]int{}
	for _, e := range stand.entries {
		if e["Source"] != "imdsguard" || e["DetailType"] != "GuardDuty Finding" || e["EventBusName"] != "default" {
			t.Fatalf("entry %v", e)
		}
		var d map[string]any
		if err := json.Unmarshal([]byte(e["Detail"].(string)), &d); err != nil {
			t.Fatal(err)
		}
		seen[d["id"].(string)]++
		if d["type"] != detector.TypeOutsideAWS || d["severity"] != 8.0 || d["schemaVersion"] != "2.0" || d["accountId"] != "111111111111" {
			t.Fatalf("detail %v", d)
		}
		res := d["resource"].(map[string]any)
		if res["accessKeyDetails"].(map[string]any)["accessKeyId"] != "ASIA1" || res["instanceDetails"].(map[string]any)["instanceId"] != "i-0123456789abcdef0" {
			t.Fatalf("resource %v", res)
		}
		act := d["service"].(map[string]any)["action"].(map[string]any)["awsApiCallAction"].(map[string]any)
		if act["remoteIpDetails"].(map[string]any)["ipAddressV4"] != "192.0.2.66" {
			t.Fatalf("action %v", act)
		}
		if procs := d["service"].(map[string]any)["additionalInfo"].(map[string]any)["processes"].([]any); procs[0].(map[string]any)["exe"] != "/usr/bin/curl" {
			t.Fatalf("processes %v", procs)
		}
		if r := e["Resources"].([]any); r[0] != "arn:aws:ec2:us-east-1:111111111111:instance/i-0123456789abcdef0" {
			t.Fatalf("resources %v", r)
		}
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("%s put %d times", id, n)
		}
	}
}

// securityHubStandIn decodes BatchImportFindings (REST JSON, POST /findings/import) and
// fails the first finding of the first call.
type securityHubStandIn struct {
	t        *testing.T
	mu       sync.Mutex
	calls    int
	findings []map[string]any
}

func (s *securityHubStandIn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.Method != http.MethodPost || r.URL.Path != "/findings/import" {
		s.t.Errorf("unexpected request %s %s", r.Method, r.URL.Path)
		http.Error(w, "unexpected", http.StatusNotFound)
		return
	}
	var in struct{ Findings []map[string]any }
	if !signedJSON(s.t, r, &in) {
		http.Error(w, "bad", http.StatusBadRequest)
		return
	}
	s.calls++
	type failed struct{ Id, ErrorCode, ErrorMessage string }
	out := struct {
		FailedCount, SuccessCount int
		FailedFindings            []failed
	}{FailedFindings: []failed{}}
	for i, f := range in.Findings {
		if s.calls == 1 && i == 0 {
			out.FailedCount++
			out.FailedFindings = append(out.FailedFindings, failed{Id: f["Id"].(string), ErrorCode: "InternalFailure", ErrorMessage: "try again"})
			continue
		}
		out.SuccessCount++
		s.findings = append(s.findings, f)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

func TestSecurityHubBatchImportFindings(t *testing.T) {
	stand := &securityHubStandIn{t: t}
	srv := httptest.NewServer(stand)
	defer srv.Close()
	client := securityhub.New(securityhub.Options{Region: "us-east-1", BaseEndpoint: aws.String(srv.URL),
		Credentials: credentials.NewStaticCredentialsProvider("AKIDTEST", "secret", "")})
	sh := &SecurityHub{Client: client, Retry: Retry{Retries: 2, Backoff: time.Millisecond}, Log: zerolog.Nop()}
	if err := sh.Deliver(context.Background(), testBatch(sample())); err != nil {
		t.Fatal(err)
	}
	stand.mu.Lock()
	defer stand.mu.Unlock()
	if stand.calls != 2 || len(stand.findings) != 2 {
		t.Fatalf("%d calls, %d findings", stand.calls, len(stand.findings))
	}
	byID := map[string]map[string]any{}
	for _, f := range stand.findings {
		byID[f["Id"].(string)] = f
	}
	a, b := byID["f1"], byID["f2"]
	if a == nil || b == nil {
		t.Fatalf("%v", byID)
	}
	if a["SchemaVersion"] != "2018-10-08" || a["ProductArn"] != "arn:aws:securityhub:us-east-1:111111111111:product/111111111111/default" ||
		a["Severity"].(map[string]any)["Label"] != "HIGH" || a["Network"].(map[string]any)["SourceIpV4"] != "192.0.2.66" ||
		a["Process"].(map[string]any)["Pid"] != 42.0 || a["Resources"].([]any)[1].(map[string]any)["Type"] != "AwsEc2Instance" ||
		a["Workflow"].(map[string]any)["Status"] != "NEW" || a["RecordState"] != "ACTIVE" {
		t.Fatalf("f1: %v", a)
	}
	if b["Workflow"].(map[string]any)["Status"] != "SUPPRESSED" || b["Network"].(map[string]any)["SourceIpV6"] != "2001:db8::1" {
		t.Fatalf("f2: %v", b)
	}
}
