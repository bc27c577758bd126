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

// Set is a loaded ip-ranges.json. The zero value (and nil) contains nothing. Lookups
// cost one map probe per distinct prefix length, not one compare per prefix (the file
// has thousands).
type Set struct {
	SyncToken  string
	CreateDate string
	ranges     []Range
	byPrefix   map[netip.Prefix]Range
	lens4      []int // distinct IPv4 prefix lengths, longest first
	lens6      []int
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
	// every address under "AMAZON" and again under its service); the first entry of a
	// prefix listed twice wins, unless a later one names a service.
	s.byPrefix = make(map[netip.Prefix]Range, len(s.ranges))
	seen4, seen6 := map[int]bool{}, map[int]bool{}
	for _, r := range s.ranges {
		if old, ok := s.byPrefix[r.Prefix]; !ok || old.Service == "AMAZON" {
			s.byPrefix[r.Prefix] = r
		}
		bits := r.Prefix.Bits()
		if r.Prefix.Addr().Is4() && !seen4[bits] {
			seen4[bits] = true
			s.lens4 = append(s.lens4, bits)
		} else if r.Prefix.Addr().Is6() && !seen6[bits] {
			seen6[bits] = true
			s.lens6 = append(s.lens6, bits)
		}
	}
	sort.Sort(sort.Reverse(sort.IntSlice(s.lens4)))
	sort.Sort(sort.Reverse(sort.IntSlice(s.lens6)))
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
	lens := s.lens6
	if a.Is4() {
		lens = s.lens4
	}
	for _, bits := range lens {
		p, err := a.Prefix(bits)
		if err != nil {
			continue
		}
		if r, ok := s.byPrefix[p]; ok {
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
