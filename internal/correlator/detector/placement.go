package detector

import (
	"net/netip"
	"slices"

	"github.com/imdsguard/imdsguard/internal/correlator/cloudtrail"
	"github.com/imdsguard/imdsguard/internal/correlator/inventory"
)

// Evidence that placed an instance at its addresses, strongest first; a finding's
// PlacedBy says which one the judgement rested on.
const (
	PlacedByFingerprint = "fingerprint" // the agent on the host reported its addresses
	PlacedByInventory   = "inventory"   // the EC2 API (an --inventory file or the poller)
	PlacedByTrail       = "trail"       // an event in the trail (AssociateAddress, AttachNetworkInterface, …)
	PlacedByGuess       = "guess"       // the first AWS address the key was used from: the last resort
	PlacedByNone        = "none"        // nothing places the instance
)

// evidence names the kind of evidence behind a claim.
func evidence(from string) string {
	switch from {
	case "fingerprint":
		return PlacedByFingerprint
	case "inventory":
		return PlacedByInventory
	}
	return PlacedByTrail
}

func evidenceRank(e string) int {
	switch e {
	case PlacedByFingerprint:
		return 3
	case PlacedByInventory:
		return 2
	case PlacedByTrail:
		return 1
	}
	return 0
}

// eipAssociation is an AssociateAddress that named an allocation id (or an address
// released or disassociated by id): its address is joined when judging, since the
// AllocateAddress record may come later.
type eipAssociation struct {
	allocation, association string
	claim                   claim // instance "" for a Disassociate or Release
	networkInterface        string
}

// session is who a key's calls said they were, kept for keys not (yet) tied to an
// instance or function.
type session struct{ account, role, name string }

type fnKey struct{ account, name string }

// placement is what the detector knows of where things are beyond fingerprints and
// address claims: elastic IPs, VPC endpoints, NAT gateways, Lambda functions.
type placement struct {
	allocs       map[string]netip.Addr // allocation id → elastic IP
	assocs       map[string]string     // association id → allocation id
	eips         []eipAssociation      // associations and releases to join
	endpoints    map[string]string     // VPC endpoint id → owner account
	functions    map[fnKey]string      // (account, function name) → execution role name
	sessions     map[string]session    // access key → its session, until it is tied to an owner
	drops        map[string]map[string]int64
	loggedCauses map[string]bool
}

func newPlacement() placement {
	return placement{
		allocs: map[string]netip.Addr{}, assocs: map[string]string{},
		endpoints: map[string]string{}, functions: map[fnKey]string{},
		sessions: map[string]session{}, drops: map[string]map[string]int64{},
		loggedCauses: map[string]bool{},
	}
}

// inventoryIndex is what the EC2 and Lambda APIs said, kept apart from what the trail
// taught so that a newer inventory can replace it whole.
type inventoryIndex struct {
	claims     map[netip.Addr][]claim  // instance addresses
	egress     map[netip.Addr][]string // NAT gateway address → accounts behind it
	allocs     map[string]netip.Addr   // allocation id → elastic IP
	assocIPs   map[string]netip.Addr   // association id → elastic IP
	endpoints  map[string]string       // VPC endpoint id → owner account
	functions  map[fnKey]string        // (account, function name) → execution role name
	interfaces map[string]string       // network interface id → instance
}

func newInventoryIndex() inventoryIndex {
	return inventoryIndex{
		claims: map[netip.Addr][]claim{}, egress: map[netip.Addr][]string{}, allocs: map[string]netip.Addr{},
		assocIPs: map[string]netip.Addr{}, endpoints: map[string]string{}, functions: map[fnKey]string{},
		interfaces: map[string]string{},
	}
}

// AddInventory adds what the EC2 and Lambda APIs said: instance addresses, NAT gateway
// egress, elastic IP allocations, VPC endpoints and functions, to what earlier calls
// added.
func (d *Detector) AddInventory(inv *inventory.Inventory) {
	ix := &d.inv
	for _, a := range inv.Addresses {
		c := claim{instance: a.InstanceID, account: a.AccountID, since: a.Since, from: "inventory"}
		if !slices.Contains(ix.claims[a.Addr.Unmap()], c) {
			ix.claims[a.Addr.Unmap()] = append(ix.claims[a.Addr.Unmap()], c)
		}
	}
	for _, e := range inv.Egress {
		ix.egress[e.Addr.Unmap()] = appendNew(ix.egress[e.Addr.Unmap()], e.AccountID)
	}
	for _, e := range inv.ElasticIPs {
		ix.allocs[e.AllocationID] = e.PublicIP.Unmap()
		if e.AssociationID != "" {
			ix.assocIPs[e.AssociationID] = e.PublicIP.Unmap()
		}
	}
	for _, ep := range inv.Endpoints {
		ix.endpoints[ep.ID] = ep.OwnerID
	}
	for _, f := range inv.Functions {
		account, role := roleFromARN(f.RoleARN)
		if f.AccountID != "" {
			account = f.AccountID
		}
		ix.functions[fnKey{account, f.Name}] = role
	}
	for eni, inst := range inv.Interfaces {
		ix.interfaces[eni] = inst
	}
}

// SetInventory replaces what AddInventory and SetInventory gave before with inv: an
// address the API no longer lists no longer places an instance. What the trail taught
// is kept.
func (d *Detector) SetInventory(inv *inventory.Inventory) {
	d.inv = newInventoryIndex()
	d.AddInventory(inv)
}

func appendNew(list []string, s string) []string {
	for _, x := range list {
		if x == s {
			return list
		}
	}
	return append(list, s)
}

// learnPlacement takes what a record says about where instances, endpoints and
// functions are.
func (d *Detector) learnPlacement(rec *cloudtrail.Record) {
	if rec.VPCEndpointID != "" && rec.VPCEndpointAccountID != "" {
		d.pl.endpoints[rec.VPCEndpointID] = rec.VPCEndpointAccountID
	}
	account := rec.RecipientAccountID
	if account == "" {
		account = rec.UserIdentity.AccountID
	}
	if e, ok := cloudtrail.ParseElasticIP(rec); ok {
		ip, _ := netip.ParseAddr(e.PublicIP)
		ip = ip.Unmap()
		switch e.Event {
		case "AllocateAddress":
			if ip.IsValid() && e.AllocationID != "" {
				d.pl.allocs[e.AllocationID] = ip
			}
		case "AssociateAddress":
			if e.AllocationID == "" || e.InstanceID == "" && e.NetworkInterfaceID == "" {
				return // EC2-Classic by public IP: ParseAddressChange took it
			}
			if e.AssociationID != "" {
				d.pl.assocs[e.AssociationID] = e.AllocationID
			}
			d.pl.eips = append(d.pl.eips, eipAssociation{allocation: e.AllocationID, association: e.AssociationID, networkInterface: e.NetworkInterfaceID,
				claim: claim{instance: e.InstanceID, account: account, since: rec.Time, from: rec.EventName}})
			d.stats.AddressInfo++
		case "DisassociateAddress", "ReleaseAddress":
			// From now on the address is nobody's until it is associated again.
			if ip.IsValid() {
				d.addClaim(ip, claim{account: account, since: rec.Time, from: rec.EventName})
			} else {
				d.pl.eips = append(d.pl.eips, eipAssociation{allocation: e.AllocationID, association: e.AssociationID,
					claim: claim{account: account, since: rec.Time, from: rec.EventName}})
			}
			d.stats.AddressInfo++
		}
		return
	}
	if ep, ok := cloudtrail.ParseVPCEndpoint(rec); ok {
		d.pl.endpoints[ep.ID] = ep.OwnerID
		return
	}
	if f, ok := cloudtrail.ParseFunction(rec); ok {
		_, role := roleFromARN(f.RoleARN)
		d.pl.functions[fnKey{f.AccountID, f.Name}] = role
	}
}

// joinElasticIPs adds the claims of associations (and the ends of them) whose address
// is now known to claims.
func (d *Detector) joinElasticIPs(claims map[netip.Addr][]claim) {
	for _, e := range d.pl.eips {
		ip, ok := d.allocation(e.allocation)
		if !ok && e.association != "" {
			if ip, ok = d.inv.assocIPs[e.association]; !ok {
				ip, ok = d.allocation(d.pl.assocs[e.association])
			}
		}
		if !ok {
			continue
		}
		c := e.claim
		if c.from == "AssociateAddress" && c.instance == "" {
			if c.instance = d.inv.interfaces[e.networkInterface]; c.instance == "" {
				for _, a := range d.attaches[e.networkInterface] {
					c.instance = a.instance
				}
			}
			if c.instance == "" {
				continue
			}
		}
		claims[ip] = append(claims[ip], c)
	}
}

// allocation is the elastic IP of an allocation id, from the trail or the inventory.
func (d *Detector) allocation(id string) (netip.Addr, bool) {
	if ip, ok := d.pl.allocs[id]; ok {
		return ip, true
	}
	ip, ok := d.inv.allocs[id]
	return ip, ok
}

// endpointOwner is the account that owns a VPC endpoint, from the inventory or the trail.
func (d *Detector) endpointOwner(id string) (string, bool) {
	if owner, ok := d.inv.endpoints[id]; ok {
		return owner, true
	}
	owner, ok := d.pl.endpoints[id]
	return owner, ok
}

// natEgress reports whether a is a NAT gateway address of account.
func (d *Detector) natEgress(a netip.Addr, account string) bool {
	for _, acc := range d.inv.egress[a] {
		if acc == account {
			return true
		}
	}
	return false
}

// lambdaBySession ties a key to a Lambda function when its session is a known
// function's name and role (the function's credentials carry its name as session).
func (d *Detector) lambdaBySession(key string) (Credential, bool) {
	s, ok := d.pl.sessions[key]
	if !ok || s.name == "" {
		return Credential{}, false
	}
	role, ok := d.pl.functions[fnKey{s.account, s.name}]
	if !ok {
		role, ok = d.inv.functions[fnKey{s.account, s.name}]
	}
	if !ok || role != s.role {
		return Credential{}, false
	}
	return Credential{AccessKeyID: key, Kind: "lambda", FunctionName: s.name, AccountID: s.account, Role: role, Source: "function"}, true
}

// Causes of records on a key that cannot be judged.
const (
	DropNoSource  = "no sourceIPAddress"
	DropBadSource = "sourceIPAddress is neither an address nor an AWS service"
)

func (d *Detector) drop(key, cause string) {
	m := d.pl.drops[key]
	if m == nil {
		m = map[string]int64{}
		d.pl.drops[key] = m
	}
	m[cause]++
}

// Dropped counts, by cause, the records on instance and Lambda keys that could not be
// judged. Each cause is logged once, the first time it is counted here.
func (d *Detector) Dropped() map[string]int64 {
	out := map[string]int64{}
	example := map[string]string{}
	for key, causes := range d.pl.drops {
		c, ok := d.Credential(key)
		if !ok {
			continue
		}
		for cause, n := range causes {
			out[cause] += n
			if example[cause] == "" {
				example[cause] = key + " (" + c.Kind + ")"
			}
		}
	}
	for cause, n := range out {
		if !d.pl.loggedCauses[cause] {
			d.pl.loggedCauses[cause] = true
			d.opt.Log.Warn().Str("event", "records_dropped").Str("cause", cause).Int64("records", n).Str("example_key", example[cause]).
				Msg("records on instance or Lambda keys cannot be judged and were dropped")
		}
	}
	return out
}

// forgetPlacement drops per-key state of keys that have no group left.
func (d *Detector) forgetPlacement(live map[string]bool) {
	for k := range d.pl.drops {
		if !live[k] {
			delete(d.pl.drops, k)
		}
	}
	for k := range d.pl.sessions {
		if !live[k] {
			delete(d.pl.sessions, k)
		}
	}
}
