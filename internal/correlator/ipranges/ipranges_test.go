package ipranges

import (
	"net/netip"
	"strings"
	"testing"
)

const sample = `{
  "syncToken": "1700000000",
  "createDate": "2026-11-20-00-00-00",
  "prefixes": [
    {"ip_prefix": "3.0.0.0/8", "region": "us-east-1", "service": "AMAZON", "network_border_group": "us-east-1"},
    {"ip_prefix": "3.5.0.0/16", "region": "us-east-1", "service": "AMAZON", "network_border_group": "us-east-1"},
    {"ip_prefix": "3.5.0.0/16", "region": "us-east-1", "service": "EC2", "network_border_group": "us-east-1"}
  ],
  "ipv6_prefixes": [
    {"ipv6_prefix": "2600:1f00::/24", "region": "us-east-1", "service": "AMAZON", "network_border_group": "us-east-1"}
  ]
}`

func TestLookup(t *testing.T) {
	s, err := Parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	if r, ok := s.Lookup(netip.MustParseAddr("3.5.1.2")); !ok || r.Service != "EC2" {
		t.Fatalf("3.5.1.2: %+v %v", r, ok)
	}
	if r, ok := s.Lookup(netip.MustParseAddr("3.6.1.2")); !ok || r.Service != "AMAZON" {
		t.Fatalf("3.6.1.2: %+v %v", r, ok)
	}
	if !s.Contains(netip.MustParseAddr("2600:1f00::1")) || s.Contains(netip.MustParseAddr("198.51.100.1")) {
		t.Fatal("contains")
	}
	if !s.Contains(netip.MustParseAddr("::ffff:3.1.1.1")) {
		t.Fatal("mapped v4")
	}
}

func TestParseRefusesBadOrEmpty(t *testing.T) {
	for _, in := range []string{`{"prefixes":[]}`, `{"prefixes":[{"ip_prefix":"nope"}]}`, `{`} {
		if _, err := Parse(strings.NewReader(in)); err == nil {
			t.Errorf("%s: no error", in)
		}
	}
}
