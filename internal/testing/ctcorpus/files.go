package ctcorpus

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// WriteDir writes the labelled corpus as files (see tools/gen-corpus) and prints a
// summary line to report (which may be nil).
func WriteDir(dir string, seed int64, report io.Writer) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("resolve output directory: %w", err)
	}
	ct := filepath.Join(abs, "cloudtrail", "AWSLogs", Account, "CloudTrail", "us-east-1", "2026", "11", "20")
	if err := os.MkdirAll(ct, 0o755); err != nil {
		return fmt.Errorf("create output directory: %w", err)
	}
	c := Labelled(seed)
	cfg := strings.Replace(c.Config, "IPRANGES", filepath.Join(abs, "ip-ranges.json"), 1) + "fingerprints: " + filepath.Join(abs, "fingerprints.jsonl") + "\n"
	files := map[string][]byte{"config.yaml": []byte(cfg), "ip-ranges.json": c.IPRanges}
	var fps, labels bytes.Buffer
	for _, fp := range c.Fingerprints {
		b, _ := json.Marshal(fp)
		fps.Write(append(b, '\n'))
	}
	for _, l := range c.Labels {
		b, _ := json.Marshal(l)
		labels.Write(append(b, '\n'))
	}
	files["fingerprints.jsonl"], files["labels.jsonl"] = fps.Bytes(), labels.Bytes()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(abs, name), data, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	n := len(c.Records)
	for i := 0; i < 4; i++ {
		part := c.Records[i*n/5 : (i+1)*n/5]
		var extra []string
		if i == 0 {
			extra = c.Malformed
		}
		doc, err := MarshalRecords(part, extra...)
		if err != nil {
			return err
		}
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		zw.Write(doc)
		zw.Close()
		name := fmt.Sprintf("%s_CloudTrail_us-east-1_20261120T%02d00Z_part%d.json.gz", Account, 8+i, i)
		if err := os.WriteFile(filepath.Join(ct, name), gz.Bytes(), 0o644); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	var lines bytes.Buffer
	for _, r := range c.Records[4*n/5:] {
		b, _ := json.Marshal(r)
		lines.Write(append(b, '\n'))
	}
	if err := os.WriteFile(filepath.Join(abs, "cloudtrail", "lake-export.jsonl"), lines.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write lake export: %w", err)
	}
	if report != nil {
		fmt.Fprintf(report, "%s: %d records, %d labels, %d fingerprints, %d malformed\n", abs, n, len(c.Labels), len(c.Fingerprints), len(c.Malformed))
	}
	return nil
}
