package correlator

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// publicDir holds real public CloudTrail; its README says where it is from and what the
// findings are, read from the records.
const publicDir = "../../testdata/cloudtrail/invictus-ir-aws_dataset"

const stolenKey = "ASIATFQR7NSC36DZQP7P"

func publicRecords(t *testing.T) []map[string]any {
	t.Helper()
	f, err := os.Open(filepath.Join(publicDir, "excerpt.json.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(gz)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct{ Records []map[string]any }
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Records) != 196 {
		t.Fatalf("%d records in the excerpt, want 196", len(doc.Records))
	}
	return doc.Records
}

func publicDetect(t *testing.T, trail string, extra ...string) []detector.Finding {
	t.Helper()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	ranges, _ := filepath.Abs(filepath.Join(publicDir, "ip-ranges.json"))
	os.WriteFile(cfg, []byte("ip_ranges: "+ranges+"\n"), 0o644)
	args := append([]string{"detect", "--config", cfg}, extra...)
	code, out, errs := runCmd(t, "", append(args, trail)...)
	if code != 0 {
		t.Fatalf("detect: exit %d: %s", code, errs)
	}
	return decodeFindings(t, out)
}

func writeDoc(t *testing.T, recs []map[string]any) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "trail.json")
	data, _ := json.Marshal(map[string]any{"Records": recs})
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func isStolen(r map[string]any) bool {
	ui, _ := r["userIdentity"].(map[string]any)
	return ui["accessKeyId"] == stolenKey
}

func only(t *testing.T, fs []detector.Finding, key, src, typ, sev, placedBy string) detector.Finding {
	t.Helper()
	var desc []string
	for _, f := range fs {
		desc = append(desc, f.AccessKeyID+" "+f.SourceIP+" "+detector.ShortType(f.Type)+" "+f.Severity+" "+f.PlacedBy+": "+f.Reason)
	}
	if len(fs) != 1 || fs[0].AccessKeyID != key || fs[0].SourceIP != src || fs[0].Type != typ || fs[0].Severity != sev || fs[0].PlacedBy != placedBy {
		t.Fatalf("findings:\n%s\nwant only %s %s %s %s placed by %s", strings.Join(desc, "\n"), key, src, detector.ShortType(typ), sev, placedBy)
	}
	return fs[0]
}

func TestPublicTrailAsDelivered(t *testing.T) {
	publicRecords(t)
	f := only(t, publicDetect(t, filepath.Join(publicDir, "excerpt.json.gz")), stolenKey, "192.168.10.20", detector.TypeOutsideAWS, detector.High, detector.PlacedByGuess)
	if f.InstanceID != "i-0dbc91f429e48eeed" || f.Count != 2 || f.CredentialSource != "AssumeRole" || f.IMDSVersion != "v1" {
		t.Fatalf("finding: %+v", f)
	}
}

func TestPublicTrailAsLogstashExport(t *testing.T) {
	var b bytes.Buffer
	for _, r := range publicRecords(t) {
		r["@timestamp"] = r["eventTime"]
		r["@version"] = "1"
		delete(r, "eventTime")
		line, _ := json.Marshal(r)
		b.Write(line)
		b.WriteByte('\n')
	}
	p := filepath.Join(t.TempDir(), "logstash.jsonl")
	os.WriteFile(p, b.Bytes(), 0o644)
	only(t, publicDetect(t, p), stolenKey, "192.168.10.20", detector.TypeOutsideAWS, detector.High, detector.PlacedByGuess)
}

func TestPublicTrailWithInventory(t *testing.T) {
	only(t, publicDetect(t, filepath.Join(publicDir, "excerpt.json.gz"), "--inventory", filepath.Join(publicDir, "inventory-network-interfaces.json")),
		stolenKey, "192.168.10.20", detector.TypeOutsideAWS, detector.High, detector.PlacedByInventory)
}

func TestPublicTrailThroughUnknownVPCEndpoint(t *testing.T) {
	recs := publicRecords(t)
	for _, r := range recs {
		if isStolen(r) {
			r["vpcEndpointId"] = "vpce-0d0d0d0d0d0d0d0d0"
		}
	}
	f := only(t, publicDetect(t, writeDoc(t, recs)), stolenKey, "192.168.10.20", detector.TypeInsideAWS, detector.Medium, detector.PlacedByGuess)
	if !strings.HasPrefix(f.Reason, "VPC endpoint of unknown owner") {
		t.Fatalf("reason: %s", f.Reason)
	}
}

func TestPublicTrailThiefFirst(t *testing.T) {
	recs := publicRecords(t)
	for _, r := range recs {
		if isStolen(r) {
			r["eventTime"] = "2023-07-10T11:55:30Z"
			r["sourceIPAddress"] = "54.204.150.149"
		}
	}
	trail := writeDoc(t, recs)
	// The guess goes wrong: the thief's address is taken as the host's.
	guessed := publicDetect(t, trail)
	if len(guessed) == 0 {
		t.Fatal("without the inventory the host's own address was expected to be flagged")
	}
	for _, f := range guessed {
		if f.AccessKeyID != "ASIATFQR7NSCSHSEVYP5" || f.SourceIP != "3.225.16.109" || f.PlacedBy != detector.PlacedByGuess {
			t.Fatalf("without the inventory: %+v", f)
		}
	}
	// The inventory puts it right.
	only(t, publicDetect(t, trail, "--inventory", filepath.Join(publicDir, "inventory-network-interfaces.json")),
		stolenKey, "54.204.150.149", detector.TypeInsideAWS, detector.High, detector.PlacedByInventory)
}
