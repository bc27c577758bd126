package fpstore

import (
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/wire"
)

func TestLoadIdempotentByID(t *testing.T) {
	in := `{"id":"f1","access_key_id":"ASIA1","role":"web","instance":{"id":"i-1","account_id":"111111111111"},"host_addresses":["10.0.0.5","54.1.2.3"],"process":{"pid":42,"exe":"/usr/bin/curl","user":"root"},"imds_version":"v1"}

{"id":"f1","access_key_id":"ASIA1","role":"web"}
{"id":"f2","access_key_id":"ASIA1","process":{"pid":43}}
`
	m := NewMemory()
	if err := m.Load("fp.jsonl", strings.NewReader(in)); err != nil {
		t.Fatal(err)
	}
	if m.Len() != 2 {
		t.Fatalf("len = %d, want 2", m.Len())
	}
	fps := m.ByAccessKey("ASIA1")
	if len(fps) != 2 || fps[0].Process.Exe != "/usr/bin/curl" || fps[0].HostAddresses[1].String() != "54.1.2.3" {
		t.Fatalf("got %+v", fps)
	}
}

func TestLoadBadLineNamesLine(t *testing.T) {
	err := NewMemory().Load("fp.jsonl", strings.NewReader("{\"access_key_id\":\"A\"}\n{oops\n"))
	if err == nil || !strings.Contains(err.Error(), "fp.jsonl:2:") {
		t.Fatalf("err = %v", err)
	}
}

func TestUnionCountsAnIDOnce(t *testing.T) {
	a, b := NewMemory(), NewMemory()
	a.Add(wire.Fingerprint{ID: "1", AccessKeyID: "K"})
	b.Add(wire.Fingerprint{ID: "1", AccessKeyID: "K"})
	b.Add(wire.Fingerprint{ID: "2", AccessKeyID: "K"})
	u := Union{a, b}
	if got := u.ByAccessKey("K"); len(got) != 2 {
		t.Fatalf("ByAccessKey: %v", got)
	}
	n := 0
	u.All(func(wire.Fingerprint) { n++ })
	if n != 2 {
		t.Fatalf("All gave %d", n)
	}
}
