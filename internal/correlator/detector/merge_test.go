package detector

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/imdsguard/imdsguard/internal/correlator/cloudtrail"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

// The corpus's records dealt out to three detectors (as SQS deals log files to
// replicas), each one's snapshot merged into a fourth: it judges as one detector that
// read every record.
func TestMergeJudgesAsOne(t *testing.T) {
	c := ctcorpus.Labelled(1)
	whole := corpusDetector(t, c)
	feed(t, whole, c)
	merged := corpusDetector(t, c)
	parts := make([]*Detector, 3)
	for i := range parts {
		parts[i] = corpusDetector(t, c)
	}
	for i, r := range c.Records {
		doc, err := ctcorpus.MarshalRecords([]map[string]any{r})
		if err != nil {
			t.Fatal(err)
		}
		d := parts[i%len(parts)]
		cloudtrail.Read("r.json", bytes.NewReader(doc), func(r *cloudtrail.Record, _ cloudtrail.Pos) { d.Observe(r) }, nil)
	}
	for _, p := range parts {
		// Through a snapshot, as the delta travels between replicas.
		var snap bytes.Buffer
		if err := p.Snapshot(&snap); err != nil {
			t.Fatal(err)
		}
		delta := corpusDetector(t, c)
		if err := delta.Restore(&snap); err != nil {
			t.Fatal(err)
		}
		merged.Merge(delta)
	}
	// A single part misses findings that need another part's evidence.
	if len(parts[0].Findings()) >= len(whole.Findings()) {
		t.Fatalf("a third of the records gave %d findings of %d: the test proves nothing", len(parts[0].Findings()), len(whole.Findings()))
	}
	want, _ := json.Marshal(whole.Findings())
	got, _ := json.Marshal(merged.Findings())
	if len(whole.Findings()) == 0 || !bytes.Equal(want, got) {
		t.Fatalf("merged findings differ:\n%s\n%s", want, got)
	}
	if whole.Stats().Records != merged.Stats().Records || whole.Stats().Groups != merged.Stats().Groups {
		t.Fatalf("stats %+v, merged %+v", whole.Stats(), merged.Stats())
	}
}
