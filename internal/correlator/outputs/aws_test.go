package outputs

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/eventbridge"
	"github.com/aws/aws-sdk-go-v2/service/securityhub"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/outputs/outputstest"
)

func testBatch(fs []detector.Finding) *Batch {
	return &Batch{Changed: fs, All: fs, Counts: CountFindings(fs), Time: time.Date(2026, 11, 20, 11, 0, 0, 0, time.UTC)}
}

func TestEventBridgePutEventsGuardDutyShape(t *testing.T) {
	stand := &outputstest.EventBridge{FailFirstEntry: true}
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
	// 10 + the refused one again + 2.
	if stand.Calls() != 3 || len(stand.Entries()) != 12 || len(stand.Refused()) != 0 {
		t.Fatalf("%d calls, %d entries, refused %v", stand.Calls(), len(stand.Entries()), stand.Refused())
	}
	seen := map[string]int{}
	for _, e := range stand.Entries() {
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

func TestSecurityHubBatchImportFindings(t *testing.T) {
	stand := &outputstest.SecurityHub{FailFirstFinding: true}
	srv := httptest.NewServer(stand)
	defer srv.Close()
	client := securityhub.New(securityhub.Options{Region: "us-east-1", BaseEndpoint: aws.String(srv.URL),
		Credentials: credentials.NewStaticCredentialsProvider("AKIDTEST", "secret", "")})
	sh := &SecurityHub{Client: client, Retry: Retry{Retries: 2, Backoff: time.Millisecond}, Log: zerolog.Nop()}
	if err := sh.Deliver(context.Background(), testBatch(sample())); err != nil {
		t.Fatal(err)
	}
	if stand.Calls() != 2 || len(stand.Findings()) != 2 || len(stand.Refused()) != 0 {
		t.Fatalf("%d calls, %d findings, refused %v", stand.Calls(), len(stand.Findings()), stand.Refused())
	}
	byID := map[string]map[string]any{}
	for _, f := range stand.Findings() {
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
