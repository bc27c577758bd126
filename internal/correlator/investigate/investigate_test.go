package investigate

import (
	"bytes"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/cloudtrail"
	"github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/fpstore"
	"github.com/imdsguard/imdsguard/internal/correlator/ipranges"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

func TestStoryOfExfiltratedKey(t *testing.T) {
	c := ctcorpus.Labelled(1)
	cfg, _ := config.Parse([]byte(strings.Replace(c.Config, "IPRANGES", "/x", 1)))
	ranges, _ := ipranges.Parse(bytes.NewReader(c.IPRanges))
	fps := fpstore.NewMemory()
	for _, fp := range c.Fingerprints {
		fps.Add(fp)
	}
	opt := detector.OptionsFrom(cfg, ranges, fps, zerolog.Nop())
	opt.OnlyKey = ctcorpus.KeyA1
	d := detector.New(opt)
	doc, _ := ctcorpus.MarshalRecords(c.Records)
	cloudtrail.Read("c.json", bytes.NewReader(doc), func(r *cloudtrail.Record, _ cloudtrail.Pos) { d.Observe(r) }, nil)
	s := Build(d, ctcorpus.KeyA1)
	if s.Issued == nil || s.Issued.InstanceID != ctcorpus.InstA1 || s.Issued.IMDSVersion != "v1" || s.Issued.Processes[0].Exe != "/usr/bin/curl" {
		t.Fatalf("issued: %+v", s.Issued)
	}
	addrs := map[string]bool{}
	var total int64
	for _, src := range s.Sources {
		addrs[src.Address] = true
		total += src.Count
	}
	for _, want := range []string{"3.5.1.11", "2600:1f00::11", "10.0.1.11", "198.51.100.7", "cloudformation.amazonaws.com", "192.0.2.66"} {
		if !addrs[want] {
			t.Errorf("source %s missing: %v", want, addrs)
		}
	}
	if total != s.Records || s.Records != 20+8+8+6+8+8+5+3 {
		t.Errorf("records %d, sources add up to %d", s.Records, total)
	}
	if len(s.Findings) != 2 || len(s.Notable) == 0 {
		t.Errorf("findings %d notable %d", len(s.Findings), len(s.Notable))
	}
	var b bytes.Buffer
	if err := WriteText(&b, s); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"issued to", "pid 4242 /usr/bin/curl", "IMDSv1", "192.0.2.66", "!! reconnaissance: who am I", "InstanceCredentialExfiltration.OutsideAWS"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, b.String())
		}
	}
}

func TestWhy(t *testing.T) {
	for _, c := range []struct{ svc, name, want string }{
		{"iam", "CreateAccessKey", "IAM change"}, {"iam", "ListRoles", "IAM reconnaissance"},
		{"sts", "GetCallerIdentity", "reconnaissance: who am I"}, {"s3", "GetObject", "reading data"},
		{"logs", "PutLogEvents", ""},
	} {
		if got := Why(c.svc, c.name); got != c.want {
			t.Errorf("%s/%s: %q", c.svc, c.name, got)
		}
	}
}
