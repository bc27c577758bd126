package detector

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/cloudtrail"
	"github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/correlator/fpstore"
	"github.com/imdsguard/imdsguard/internal/correlator/ipranges"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

func corpusDetector(t *testing.T, c *ctcorpus.Corpus) *Detector {
	t.Helper()
	cfg, err := config.Parse([]byte(strings.Replace(c.Config, "IPRANGES", "/x/ip-ranges.json", 1)))
	if err != nil {
		t.Fatal(err)
	}
	ranges, err := ipranges.Parse(bytes.NewReader(c.IPRanges))
	if err != nil {
		t.Fatal(err)
	}
	fps := fpstore.NewMemory()
	for _, fp := range c.Fingerprints {
		fps.Add(fp)
	}
	return New(OptionsFrom(cfg, ranges, fps, zerolog.Nop()))
}

// feed splits the records over a gzip log file, a JSON-lines file and a plain file, in
// the corpus's shuffled order, and reads them back through the cloudtrail reader.
func feed(t *testing.T, d *Detector, c *ctcorpus.Corpus) cloudtrail.Stats {
	t.Helper()
	n := len(c.Records)
	parts := [][]map[string]any{c.Records[:n/3], c.Records[n/3 : 2*n/3], c.Records[2*n/3:]}
	var st cloudtrail.Stats
	doc, err := ctcorpus.MarshalRecords(parts[0], c.Malformed...)
	if err != nil {
		t.Fatal(err)
	}
	st.Add(cloudtrail.Read("part1.json", bytes.NewReader(doc), func(r *cloudtrail.Record, _ cloudtrail.Pos) { d.Observe(r) }, nil))
	var lines bytes.Buffer
	for _, r := range parts[1] {
		b, _ := json.Marshal(r)
		lines.Write(b)
		lines.WriteByte('\n')
	}
	st.Add(cloudtrail.Read("part2.jsonl", &lines, func(r *cloudtrail.Record, _ cloudtrail.Pos) { d.Observe(r) }, nil))
	doc, _ = ctcorpus.MarshalRecords(parts[2])
	st.Add(cloudtrail.Read("part3.json", bytes.NewReader(doc), func(r *cloudtrail.Record, _ cloudtrail.Pos) { d.Observe(r) }, nil))
	return st
}

type fkey struct{ key, src, typ string }

func TestCorpusEveryPositiveFoundNoBenignFlagged(t *testing.T) {
	for _, seed := range []int64{1, 2, 3} {
		c := ctcorpus.Labelled(seed)
		d := corpusDetector(t, c)
		st := feed(t, d, c)
		if st.Records != int64(len(c.Records)) || st.Malformed != int64(len(c.Malformed)) {
			t.Fatalf("seed %d: stats %+v, want %d records and %d malformed", seed, st, len(c.Records), len(c.Malformed))
		}
		found := map[fkey]Finding{}
		flagged := map[fkey]Finding{} // by key, source and window
		for _, f := range d.Findings() {
			found[fkey{f.AccessKeyID, f.SourceIP, f.Type}] = f
			if !f.Suppressed {
				flagged[fkey{f.AccessKeyID, f.SourceIP, f.WindowStart.Format(time.RFC3339)}] = f
			}
		}
		positives := 0
		for _, l := range c.Labels {
			if l.Type == "" {
				if f, ok := flagged[fkey{l.AccessKeyID, l.SourceIP, l.Time.Truncate(time.Hour).Format(time.RFC3339)}]; ok {
					t.Errorf("seed %d: benign record %s (%s from %s: %s) flagged as %s %s: %s", seed, l.EventID, l.AccessKeyID, l.SourceIP, l.Benign, ShortType(f.Type), f.Severity, f.Reason)
				}
				continue
			}
			positives++
			f, ok := found[fkey{l.AccessKeyID, l.SourceIP, l.Type}]
			switch {
			case !ok:
				t.Errorf("seed %d: positive %s (%s from %s) not found as %s", seed, l.EventID, l.AccessKeyID, l.SourceIP, ShortType(l.Type))
			case f.Severity != l.Severity || f.Suppressed != l.Suppressed:
				t.Errorf("seed %d: %s from %s: severity %s suppressed %v, want %s %v", seed, l.AccessKeyID, l.SourceIP, f.Severity, f.Suppressed, l.Severity, l.Suppressed)
			}
		}
		if positives < 40 {
			t.Fatalf("corpus has only %d positive records", positives)
		}
	}
}

func TestFindingNamesProcessAndAggregates(t *testing.T) {
	c := ctcorpus.Labelled(1)
	d := corpusDetector(t, c)
	feed(t, d, c)
	var f *Finding
	all := d.Findings()
	for i := range all {
		if all[i].AccessKeyID == ctcorpus.KeyA1 && all[i].SourceIP == "192.0.2.66" {
			if f != nil {
				t.Fatal("more than one finding for one key, source, type and window")
			}
			f = &all[i]
		}
	}
	if f == nil {
		t.Fatal("no finding for the exfiltrated fingerprinted key")
	}
	if f.Count != 5 || f.InstanceID != ctcorpus.InstA1 || f.Role != "web" || f.AccountID != ctcorpus.Account || f.IMDSVersion != "v1" ||
		len(f.Processes) != 1 || f.Processes[0].Exe != "/usr/bin/curl" || f.Processes[0].PID != 4242 || f.CredentialSource != "fingerprint" ||
		f.Endpoint != "imds" {
		t.Fatalf("finding: %+v", f)
	}
	if !f.FirstSeen.Before(f.LastSeen) || len(f.APICalls) == 0 || f.ID == "" {
		t.Fatalf("finding: %+v", f)
	}
	for _, g := range all {
		if g.AccessKeyID == ctcorpus.KeyLambda && g.FunctionName != "billing-fn" {
			t.Fatalf("lambda finding: %+v", g)
		}
	}
}

func TestSuppressionRules(t *testing.T) {
	c := ctcorpus.Labelled(1)
	cfg, err := config.Parse([]byte("suppress:\n  - name: lambda ok\n    types: [ResourceCredentialExfiltration.OutsideAWS]\n  - roles: [web4]\n    cidrs: [2001:db8::/32]\n"))
	if err != nil {
		t.Fatal(err)
	}
	ranges, _ := ipranges.Parse(bytes.NewReader(c.IPRanges))
	d := New(OptionsFrom(cfg, ranges, nil, zerolog.Nop()))
	feed(t, d, c)
	by := map[string]string{}
	for _, f := range d.Findings() {
		if f.Suppressed {
			by[f.AccessKeyID+" "+f.SourceIP] = f.SuppressedBy
		}
	}
	if by[ctcorpus.KeyLambda+" 198.51.100.23"] != "lambda ok" || by[ctcorpus.KeyA4+" 2001:db8::66"] != "suppress[1]" {
		t.Fatalf("suppressed: %v", by)
	}
	if _, ok := by[ctcorpus.KeyA4+" 52.44.0.1"]; ok {
		t.Fatal("rule with cidrs suppressed a source outside them")
	}
}

func TestForgetBoundsMemory(t *testing.T) {
	c := ctcorpus.Labelled(1)
	d := corpusDetector(t, c)
	feed(t, d, c)
	if d.Stats().Groups == 0 {
		t.Fatal("no groups")
	}
	d.Forget(ctcorpus.Base.Add(48 * 3600e9))
	if d.Stats().Groups != 0 || len(d.Findings()) != 0 {
		t.Fatalf("after Forget: %+v", d.Stats())
	}
}
