package detector

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

// A detector restored from a snapshot judges as the one that took it, and keeps
// counting where it left off.
func TestSnapshotRestore(t *testing.T) {
	c := ctcorpus.Labelled(1)
	a := corpusDetector(t, c)
	feed(t, a, c)
	var snap bytes.Buffer
	if err := a.Snapshot(&snap); err != nil {
		t.Fatal(err)
	}
	b := corpusDetector(t, c)
	if err := b.Restore(bytes.NewReader(snap.Bytes())); err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(a.Findings())
	got, _ := json.Marshal(b.Findings())
	if len(a.Findings()) == 0 || !bytes.Equal(want, got) {
		t.Fatalf("restored findings differ:\n%s\n%s", want, got)
	}
	if a.Stats() != b.Stats() {
		t.Fatalf("stats %+v, restored %+v", a.Stats(), b.Stats())
	}
	// Both see the same records again: counts go on from the snapshot's.
	feed(t, a, c)
	feed(t, b, c)
	want, _ = json.Marshal(a.Findings())
	got, _ = json.Marshal(b.Findings())
	if !bytes.Equal(want, got) {
		t.Fatal("after more records, restored findings differ")
	}
	if err := b.Restore(strings.NewReader(`{"version":99}`)); err == nil || !strings.Contains(err.Error(), "version 99") {
		t.Fatalf("other version: %v", err)
	}
}
