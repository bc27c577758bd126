package detector

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"time"
)

// snapshotVersion changes when the snapshot's shape does; Restore refuses another.
const snapshotVersion = 2

// snapshot is what the detector learned and counted, in a form that outlives the
// process: credentials, address claims, network interfaces, windows and counts.
type snapshot struct {
	Version  int                     `json:"version"`
	Creds    []*Credential           `json:"credentials"`
	Claims   []snapClaim             `json:"claims"`
	ENIs     map[string][]netip.Addr `json:"network_interfaces"`
	Attaches map[string][]snapClaim  `json:"attachments"`
	Groups   []snapGroup             `json:"groups"`
	Stats    Stats                   `json:"stats"`
	// What the trail taught about where things are (the inventory is not kept: it is
	// read again from its files and the EC2 API).
	Placement snapPlacement `json:"placement"`
}

type snapPlacement struct {
	Allocs    map[string]netip.Addr       `json:"allocations"`
	Assocs    map[string]string           `json:"associations"`
	EIPs      []snapEIP                   `json:"eip_events"`
	Endpoints map[string]string           `json:"vpc_endpoints"`
	Functions []snapFunction              `json:"functions"`
	Sessions  map[string]snapSession      `json:"sessions"`
	Drops     map[string]map[string]int64 `json:"drops"`
}

type snapEIP struct {
	Allocation       string    `json:"allocation"`
	Association      string    `json:"association"`
	Claim            snapClaim `json:"claim"`
	NetworkInterface string    `json:"network_interface"`
}

type snapFunction struct {
	Account string `json:"account"`
	Name    string `json:"name"`
	Role    string `json:"role"`
}

type snapSession struct {
	Account string `json:"account"`
	Role    string `json:"role"`
	Name    string `json:"name"`
}

func (p *placement) snapshot() snapPlacement {
	s := snapPlacement{Allocs: p.allocs, Assocs: p.assocs, Endpoints: p.endpoints, Sessions: map[string]snapSession{}, Drops: p.drops}
	for _, e := range p.eips {
		s.EIPs = append(s.EIPs, snapEIP{Allocation: e.allocation, Association: e.association, Claim: toSnap(netip.Addr{}, e.claim), NetworkInterface: e.networkInterface})
	}
	for k, role := range p.functions {
		s.Functions = append(s.Functions, snapFunction{Account: k.account, Name: k.name, Role: role})
	}
	for key, se := range p.sessions {
		s.Sessions[key] = snapSession{Account: se.account, Role: se.role, Name: se.name}
	}
	return s
}

func (s snapPlacement) restore() placement {
	p := newPlacement()
	for k, v := range s.Allocs {
		p.allocs[k] = v
	}
	for k, v := range s.Assocs {
		p.assocs[k] = v
	}
	for _, e := range s.EIPs {
		p.eips = append(p.eips, eipAssociation{allocation: e.Allocation, association: e.Association, claim: e.Claim.claim(), networkInterface: e.NetworkInterface})
	}
	for k, v := range s.Endpoints {
		p.endpoints[k] = v
	}
	for _, f := range s.Functions {
		p.functions[fnKey{account: f.Account, name: f.Name}] = f.Role
	}
	for k, se := range s.Sessions {
		p.sessions[k] = session{account: se.Account, role: se.Role, name: se.Name}
	}
	for k, v := range s.Drops {
		p.drops[k] = v
	}
	return p
}

type snapClaim struct {
	Addr     netip.Addr `json:"addr,omitzero"`
	Instance string     `json:"instance"`
	Account  string     `json:"account"`
	Since    time.Time  `json:"since"`
	From     string     `json:"from"`
}

type snapGroup struct {
	Group
	Key         string `json:"key"`
	Source      string `json:"source"`
	VPCE        string `json:"vpce"`
	VPCEAccount string `json:"vpce_account"`
	Window      int64  `json:"window"`
	// Calls shadows Group.Calls, whose struct-keyed map JSON cannot hold.
	Calls []snapCall `json:"Calls"` // the same JSON name as Group.Calls, so it wins
}

type snapCall struct {
	CallKey
	CallCount
}

func toSnap(a netip.Addr, c claim) snapClaim {
	return snapClaim{Addr: a, Instance: c.instance, Account: c.account, Since: c.since, From: c.from}
}

func (s snapClaim) claim() claim {
	return claim{instance: s.Instance, account: s.Account, since: s.Since, from: s.From}
}

// Snapshot writes the detector's state (not its options) as JSON, for Restore in a
// later process: a restarted serve keeps its windows, counts and learned keys.
func (d *Detector) Snapshot(w io.Writer) error {
	s := snapshot{Version: snapshotVersion, ENIs: d.enis, Attaches: map[string][]snapClaim{}, Stats: d.stats,
		Placement: d.pl.snapshot()}
	for _, c := range d.creds {
		s.Creds = append(s.Creds, c)
	}
	for a, cs := range d.claims {
		for _, c := range cs {
			s.Claims = append(s.Claims, toSnap(a, c))
		}
	}
	for eni, cs := range d.attaches {
		for _, c := range cs {
			s.Attaches[eni] = append(s.Attaches[eni], toSnap(netip.Addr{}, c))
		}
	}
	for gk, g := range d.groups {
		sg := snapGroup{Group: *g, Key: gk.key, Source: gk.source, VPCE: gk.vpce, VPCEAccount: gk.vpceAccount, Window: gk.window}
		for k, c := range g.Calls {
			sg.Calls = append(sg.Calls, snapCall{k, *c})
		}
		s.Groups = append(s.Groups, sg)
	}
	if err := json.NewEncoder(w).Encode(&s); err != nil {
		return fmt.Errorf("write detector snapshot: %w", err)
	}
	return nil
}

// Restore replaces the detector's state with a snapshot's. The options stay those the
// detector was made with.
func (d *Detector) Restore(r io.Reader) error {
	var s snapshot
	if err := json.NewDecoder(r).Decode(&s); err != nil {
		return fmt.Errorf("read detector snapshot: %w", err)
	}
	if s.Version != snapshotVersion {
		return fmt.Errorf("detector snapshot version %d, this correlator reads %d", s.Version, snapshotVersion)
	}
	creds := map[string]*Credential{}
	for _, c := range s.Creds {
		creds[c.AccessKeyID] = c
	}
	claims := map[netip.Addr][]claim{}
	for _, c := range s.Claims {
		claims[c.Addr] = append(claims[c.Addr], c.claim())
	}
	attaches := map[string][]claim{}
	for eni, cs := range s.Attaches {
		for _, c := range cs {
			attaches[eni] = append(attaches[eni], c.claim())
		}
	}
	groups := map[groupKey]*Group{}
	for _, sg := range s.Groups {
		g := sg.Group
		g.Calls = map[CallKey]*CallCount{}
		for _, c := range sg.Calls {
			g.Calls[c.CallKey] = &CallCount{Count: c.Count, Errors: c.Errors}
		}
		groups[groupKey{key: sg.Key, source: sg.Source, vpce: sg.VPCE, vpceAccount: sg.VPCEAccount, window: sg.Window}] = &g
	}
	enis := s.ENIs
	if enis == nil {
		enis = map[string][]netip.Addr{}
	}
	d.creds, d.claims, d.attaches, d.groups, d.enis, d.stats = creds, claims, attaches, groups, enis, s.Stats
	d.pl = s.Placement.restore()
	return nil
}
