package correlator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
	"github.com/imdsguard/imdsguard/internal/correlator/intake"
	"github.com/imdsguard/imdsguard/internal/testing/syncbuf"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// TestServeIntakeFingerprintNamesProcess: a fingerprint posted to serve's intake (signed
// identity document) is what names the process in a finding that serve then raises from
// CloudTrail.
func readText(t *testing.T, p string) string {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestServeIntakeFingerprintNamesProcess(t *testing.T) {
	signer, err := iddoc.NewSigner()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	watched := filepath.Join(dir, "trail")
	os.MkdirAll(watched, 0o755)
	ranges := write("ip-ranges.json", `{"syncToken":"1","createDate":"2026-11-20-00-00-00","prefixes":[{"ip_prefix":"3.0.0.0/8","region":"us-east-1","service":"AMAZON","network_border_group":"us-east-1"}],"ipv6_prefixes":[]}`)
	awsCert := write("aws.pem", string(signer.CertPEM))
	cfg := write("c.yaml", fmt.Sprintf(`ip_ranges: %s
serve:
  directory: %s
  poll_interval: 100ms
intake:
  listen: 127.0.0.1:0
  plain_http: true
  aws_certificates: [%s]
  allowed_accounts: ["123456789012"]
  database: %s
`, ranges, watched, awsCert, filepath.Join(dir, "db", "fingerprints.db")))
	if code, out, errs := runCmd(t, "", "check-config", cfg); code != 0 || !strings.Contains(out, "plain_http: true") {
		t.Fatalf("check-config %d: %s %s", code, out, errs)
	}
	badCfg := write("bad.yaml", strings.Replace(readText(t, cfg), awsCert, filepath.Join(dir, "missing.pem"), 1))
	if code, _, errs := runCmd(t, "", "check-config", badCfg); code != 1 || !strings.Contains(errs, "intake.aws_certificates") {
		t.Fatalf("check-config with a missing certificate: %d %s", code, errs)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errb syncbuf.Buffer
	done := make(chan int, 1)
	go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &out, &errb) }()
	addrRE := regexp.MustCompile(`"event":"intake_listening","addr":"([^"]+)"`)
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for !cond() {
			select {
			case code := <-done:
				t.Fatalf("serve exited %d: %s", code, errb.String())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s; out:\n%s\nerr:\n%s", what, out.String(), errb.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor("the intake", func() bool { return addrRE.MatchString(errb.String()) })
	addr := addrRE.FindStringSubmatch(errb.String())[1]

	const key, inst = "ASIAINTAKEEXAMPLE001", "i-0feedface0000001"
	now := time.Now().UTC().Truncate(time.Second)
	doc := fmt.Sprintf("{\n  \"accountId\" : \"123456789012\",\n  \"instanceId\" : %q,\n  \"region\" : \"us-east-1\"\n}", inst)
	p7, err := signer.Sign([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(intake.Batch{Document: doc, PKCS7: p7, BatchID: "1", Fingerprints: []wire.Fingerprint{{
		ID: "fp-1", AccessKeyID: key, Role: "web", LastUpdated: now.Add(-time.Minute), Expiration: now.Add(6 * time.Hour),
		Instance:      wire.Instance{ID: inst, AccountID: "123456789012", Region: "us-east-1"},
		HostAddresses: []netip.Addr{netip.MustParseAddr("10.0.0.5")},
		Process:       wire.Process{PID: 777, Exe: "/usr/bin/python3", User: "app"}, IMDSVersion: "v1",
	}}})
	resp, err := http.Post("http://"+addr+"/v1/fingerprints", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var res intake.Result
	json.NewDecoder(resp.Body).Decode(&res)
	resp.Body.Close()
	if resp.StatusCode != 200 || res.Accepted != 1 {
		t.Fatalf("post: %d %+v", resp.StatusCode, res)
	}

	trail := filepath.Join(watched, "trail.json")
	os.WriteFile(trail, []byte(fmt.Sprintf(`{"Records":[{"eventVersion":"1.08","eventTime":%q,"eventSource":"s3.amazonaws.com","eventName":"ListBuckets","awsRegion":"us-east-1","sourceIPAddress":"198.51.100.23","userIdentity":{"type":"AssumedRole","arn":"arn:aws:sts::123456789012:assumed-role/web/%s","accountId":"123456789012","accessKeyId":%q},"eventID":"e1","eventType":"AwsApiCall"}]}`,
		now.Format(time.RFC3339), inst, key)), 0o644)
	past := time.Now().Add(-time.Minute)
	os.Chtimes(trail, past, past)
	waitFor("a finding", func() bool { return strings.Contains(out.String(), key) })
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("serve exit %d: %s", code, errb.String())
	}
	fs := decodeFindings(t, out.String())
	if len(fs) != 1 || fs[0].InstanceID != inst || fs[0].CredentialSource != "fingerprint" || len(fs[0].Processes) != 1 || fs[0].Processes[0].Exe != "/usr/bin/python3" {
		t.Fatalf("finding does not name the process from the intake: %s", out.String())
	}
}
