package correlator

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

// smallSetup writes ip-ranges.json and a config that points at it.
func smallSetup(t *testing.T) (dir, cfg string) {
	t.Helper()
	dir = t.TempDir()
	os.WriteFile(filepath.Join(dir, "ip-ranges.json"), []byte(ctcorpus.IPRangesJSON), 0o644)
	cfg = filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte("ip_ranges: "+filepath.Join(dir, "ip-ranges.json")+"\n"), 0o644)
	return dir, cfg
}

// instanceCall is a call with instance i-0a1a1a1a1a1a1a1a1's key, min minutes after 10:00.
func instanceCall(min int, src string) map[string]any {
	return map[string]any{"eventVersion": "1.09", "eventTime": time.Date(2026, 11, 20, 10, min, 0, 0, time.UTC).Format(time.RFC3339),
		"eventSource": "s3.amazonaws.com", "eventName": "ListBuckets", "awsRegion": "us-east-1", "sourceIPAddress": src, "recipientAccountId": "111111111111",
		"userIdentity": map[string]any{"type": "AssumedRole", "arn": "arn:aws:sts::111111111111:assumed-role/web/i-0a1a1a1a1a1a1a1a1", "accountId": "111111111111",
			"accessKeyId": "ASIACLIKEY", "sessionContext": map[string]any{"sessionIssuer": map[string]any{"type": "Role", "userName": "web"}, "ec2RoleDelivery": "2.0"}}}
}

func writeLines(t *testing.T, path string, recs ...map[string]any) {
	t.Helper()
	var b strings.Builder
	for _, r := range recs {
		j, _ := json.Marshal(r)
		b.Write(j)
		b.WriteByte('\n')
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestDetectInventoryFlag(t *testing.T) {
	dir, cfg := smallSetup(t)
	trail := filepath.Join(dir, "trail.jsonl")
	// The thief's AWS-hosted use first; then the host's own address and IPv6 address.
	writeLines(t, trail, instanceCall(1, "52.9.9.9"), instanceCall(5, "3.5.1.11"), instanceCall(6, "2600:1f18:aaaa:bbbb::11"))
	code, out, errs := runCmd(t, "", "detect", "--config", cfg, "--inventory", "inventory/testdata/network-interfaces.json",
		"--inventory", "inventory/testdata/vpc-endpoints.json", trail)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	fs := decodeFindings(t, out)
	if len(fs) != 1 || fs[0].SourceIP != "52.9.9.9" || fs[0].PlacedBy != detector.PlacedByInventory {
		t.Fatalf("findings: %s", out)
	}
	if !strings.Contains(errs, `"event":"inventory_loaded"`) {
		t.Fatalf("inventory not logged: %s", errs)
	}
	ranges := filepath.Join(dir, "ip-ranges.json")
	code, _, errs = runCmd(t, "", "detect", "--config", cfg, "--inventory", ranges, trail)
	if code != 1 || !strings.Contains(errs, "inventory "+ranges+": no NetworkInterfaces") {
		t.Fatalf("another JSON file given as inventory: exit %d: %s", code, errs)
	}
	code, out, _ = runCmd(t, "", "investigate", "--config", cfg, "--inventory", "inventory/testdata/network-interfaces.json", "--access-key", "ASIACLIKEY", "--format", "json", trail)
	if code != 0 || !strings.Contains(out, `"placed_by": "inventory"`) {
		t.Fatalf("investigate with --inventory: exit %d\n%s", code, out)
	}
}

func TestDetectReadsLogstashExportAndFailsOnUnreadableFile(t *testing.T) {
	dir, cfg := smallSetup(t)
	export := filepath.Join(dir, "logstash.jsonl")
	var recs []map[string]any
	for _, r := range []map[string]any{instanceCall(1, "3.5.1.11"), instanceCall(2, "192.0.2.66")} {
		r["@timestamp"] = r["eventTime"].(string)[:19] + ".000Z"
		r["@version"] = "1"
		delete(r, "eventTime")
		recs = append(recs, r)
	}
	writeLines(t, export, recs...)
	unreadable := filepath.Join(dir, "no-times.jsonl")
	writeLines(t, unreadable, map[string]any{"eventName": "ListBuckets"}, map[string]any{"eventName": "GetObject", "timestamp": "2026-11-20T10:00:00Z"})
	dropped := filepath.Join(dir, "dropped.jsonl")
	writeLines(t, dropped, instanceCall(3, ""), instanceCall(4, "not-an-address"))

	code, out, errs := runCmd(t, "", "detect", "--config", cfg, export, dropped)
	fs := decodeFindings(t, out)
	if code != 0 || len(fs) != 1 || fs[0].SourceIP != "192.0.2.66" || fs[0].Type != detector.TypeOutsideAWS {
		t.Fatalf("logstash export: exit %d\n%s\n%s", code, out, errs)
	}
	if strings.Count(errs, `"event":"records_dropped"`) != 2 || !strings.Contains(errs, `"dropped":2`) {
		t.Fatalf("dropped records not counted and logged once per cause: %s", errs)
	}
	code, out, errs = runCmd(t, "", "detect", "--config", cfg, unreadable, export)
	if code != 1 || !strings.Contains(errs, unreadable+": no record could be read (2 skipped)") || !strings.Contains(errs, "neither eventTime nor @timestamp") {
		t.Fatalf("unreadable file: exit %d: %s", code, errs)
	}
	if len(decodeFindings(t, out)) != 1 {
		t.Fatalf("the readable file after it was not read: %s", out)
	}
}
