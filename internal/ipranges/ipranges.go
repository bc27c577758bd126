// Package ipranges answers "is this address AWS's, and whose service is it?" from the
// ip-ranges.json file AWS publishes, loaded from a file the operator supplies.
package ipranges

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sort"
)

// file is ip-ranges.json as AWS publishes it.
type file struct {
	SyncToken  string `json:"syncToken"`
	CreateDate string `json:"createDate"`
	Prefixes   []struct {
		IPPrefix string `json:"ip_prefix"`
		Region   string `json:"region"`
		Service  string `json:"service"`
	} `json:"prefixes"`
	IPv6Prefixes []struct {
		IPv6Prefix string `json:"ipv6_prefix"`
		Region     string `json:"region"`
		Service    string `json:"service"`
	} `json:"ipv6_prefixes"`
}

// Range is one published prefix.
type Range struct {
	Prefix  netip.Prefix
	Region  string
	Service string
}

// Set is a loaded ip-ranges.json. The zero value (and nil) contains nothing.
type Set struct {
	SyncToken  string
	CreateDate string
	ranges     []Range
}

// Load reads an ip-ranges.json file.
func Load(path string) (*Set, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open ip ranges: %w", err)
	}
	defer f.Close()
	s, err := Parse(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

// Parse decodes ip-ranges.json. A file without any prefix is refused: an empty set would
// make every address look like it is outside AWS.
func Parse(r io.Reader) (*Set, error) {
	var f file
	if err := json.NewDecoder(r).Decode(&f); err != nil {
		return nil, fmt.Errorf("decode ip ranges: %w", err)
	}
	s := &Set{SyncToken: f.SyncToken, CreateDate: f.CreateDate}
	for i, p := range f.Prefixes {
		pfx, err := netip.ParsePrefix(p.IPPrefix)
		if err != nil || !pfx.Addr().Is4() {
			return nil, fmt.Errorf("prefixes[%d]: bad ip_prefix %q", i, p.IPPrefix)
		}
		s.ranges = append(s.ranges, Range{Prefix: pfx.Masked(), Region: p.Region, Service: p.Service})
	}
	for i, p := range f.IPv6Prefixes {
		pfx, err := netip.ParsePrefix(p.IPv6Prefix)
		if err != nil || !pfx.Addr().Is6() {
			return nil, fmt.Errorf("ipv6_prefixes[%d]: bad ipv6_prefix %q", i, p.IPv6Prefix)
		}
		s.ranges = append(s.ranges, Range{Prefix: pfx.Masked(), Region: p.Region, Service: p.Service})
	}
	if len(s.ranges) == 0 {
		return nil, fmt.Errorf("no prefixes")
	}
	// Longest prefixes first, so Lookup returns the most specific range (the file lists
	// every address under "AMAZON" and again under its service).
	sort.SliceStable(s.ranges, func(i, j int) bool { return s.ranges[i].Prefix.Bits() > s.ranges[j].Prefix.Bits() })
	return s, nil
}

// Len is the number of prefixes.
func (s *Set) Len() int {
	if s == nil {
		return 0
	}
	return len(s.ranges)
}

// Lookup returns the most specific published range holding a, if any.
func (s *Set) Lookup(a netip.Addr) (Range, bool) {
	if s == nil {
		return Range{}, false
	}
	a = a.Unmap()
	for _, r := range s.ranges {
		if r.Prefix.Contains(a) {
			return r, true
		}
	}
	return Range{}, false
}

// Contains reports whether a is in any published range.
func (s *Set) Contains(a netip.Addr) bool {
	_, ok := s.Lookup(a)
	return ok
}
