package detector

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// verdict is the judgement of one group.
type verdict struct {
	typ, severity, sourceAccount, reason string
	placedBy                             string // the evidence the judgement rested on
}

// judgeCtx holds what Findings computes once per call.
type judgeCtx struct {
	fpClaims   map[netip.Addr][]claim // from fingerprints and attached network interfaces
	hasClaims  map[string]bool        // instance id → some address is known
	firstInAWS map[string]netip.Addr  // instance id → its earliest AWS source (learnt)
	placedBy   map[string]string      // instance id → the strongest evidence of its addresses
	creds      map[string]Credential
}

// Findings judges every group seen so far and returns the findings, suppressed ones
// included (marked), ordered by first_seen.
func (d *Detector) Findings() []Finding {
	d.Dropped() // logs each cause of dropped records once
	jc := d.prepare()
	var out []Finding
	for _, g := range d.groups {
		c, ok := jc.creds[g.AccessKeyID]
		if !ok || g.Count == g.Expired {
			continue // not an instance or Lambda credential; or every call was refused as expired
		}
		v := d.judge(g, c, jc)
		if v.typ == "" {
			continue
		}
		out = append(out, d.finding(g, c, v))
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].FirstSeen.Equal(out[j].FirstSeen) {
			return out[i].FirstSeen.Before(out[j].FirstSeen)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

func (d *Detector) prepare() *judgeCtx {
	jc := &judgeCtx{fpClaims: map[netip.Addr][]claim{}, hasClaims: map[string]bool{}, firstInAWS: map[string]netip.Addr{},
		placedBy: map[string]string{}, creds: map[string]Credential{}}
	if d.opt.Fingerprints != nil {
		var firstUse map[string]time.Time
		d.opt.Fingerprints.All(func(fp wire.Fingerprint) {
			since := fp.LastUpdated
			if since.IsZero() {
				// The ECS and Pod Identity answers carry no LastUpdated. The host had
				// these addresses when the key was fetched, which was before its first
				// use: claiming them from the first use is late but never too early
				// (a claim from the zero time would outrank an older owner's).
				if firstUse == nil {
					firstUse = d.firstUses()
				}
				since = firstUse[fp.AccessKeyID]
			}
			for _, a := range fp.HostAddresses {
				jc.fpClaims[a.Unmap()] = append(jc.fpClaims[a.Unmap()], claim{instance: fp.Instance.ID, account: fp.Instance.AccountID, since: since, from: "fingerprint"})
				jc.hasClaims[fp.Instance.ID] = true
			}
		})
	}
	for eni, cs := range d.attaches {
		for _, c := range cs {
			for _, a := range d.enis[eni] {
				jc.fpClaims[a] = append(jc.fpClaims[a], c)
				jc.hasClaims[c.instance] = true
			}
		}
	}
	d.joinElasticIPs(jc.fpClaims)
	place := func(c claim) {
		if c.instance == "" {
			return // the end of a claim
		}
		jc.hasClaims[c.instance] = true
		if e := evidence(c.from); evidenceRank(e) > evidenceRank(jc.placedBy[c.instance]) {
			jc.placedBy[c.instance] = e
		}
	}
	for _, claims := range []map[netip.Addr][]claim{d.claims, d.inv.claims, jc.fpClaims} {
		for _, cs := range claims {
			for _, c := range cs {
				place(c)
			}
		}
	}
	first := map[string]time.Time{}
	for _, g := range d.groups {
		c, ok := jc.creds[g.AccessKeyID]
		if !ok {
			if c, ok = d.Credential(g.AccessKeyID); !ok {
				continue
			}
			jc.creds[g.AccessKeyID] = c
		}
		// An instance with no known address is taken to call from the AWS address it
		// used first (by event time, so the order of files does not matter).
		if c.Kind != "instance" || jc.hasClaims[c.InstanceID] || g.VPCEndpointID != "" {
			continue
		}
		src, err := netip.ParseAddr(g.Source)
		if err != nil || !d.opt.Ranges.Contains(src) || d.egress(src.Unmap()) || d.natEgress(src.Unmap(), c.AccountID) {
			continue
		}
		if t, ok := first[c.InstanceID]; !ok || g.First.Before(t) {
			first[c.InstanceID] = g.First
			jc.firstInAWS[c.InstanceID] = src.Unmap()
		}
	}
	return jc
}

// firstUses is the earliest call seen with each key.
func (d *Detector) firstUses() map[string]time.Time {
	out := map[string]time.Time{}
	for gk, g := range d.groups {
		if t, ok := out[gk.key]; !ok || g.First.Before(t) {
			out[gk.key] = g.First
		}
	}
	return out
}

func (d *Detector) egress(a netip.Addr) bool {
	for _, p := range d.opt.Egress {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// ownerAt says which instance held address a at time t: the latest claim made at or
// before t, else the earliest one. Private addresses repeat across networks, so they
// only match claims of the given account.
func (d *Detector) ownerAt(jc *judgeCtx, a netip.Addr, t time.Time, account string) (claim, bool) {
	private := a.IsPrivate() || !a.IsGlobalUnicast()
	var best, earliest claim
	var haveBest, haveEarliest bool
	for _, list := range [][]claim{d.claims[a], d.inv.claims[a], jc.fpClaims[a]} {
		for _, c := range list {
			if private && c.account != account {
				continue
			}
			if !c.since.After(t) && (!haveBest || c.since.After(best.since)) {
				best, haveBest = c, true
			}
			if c.instance != "" && (!haveEarliest || c.since.Before(earliest.since)) {
				earliest, haveEarliest = c, true
			}
		}
	}
	if haveBest {
		return best, best.instance != "" // an empty instance: released or disassociated by t
	}
	return earliest, haveEarliest
}

func (d *Detector) inside(account, reason string) verdict {
	sev := High
	if d.affiliates[account] {
		sev = Medium
		reason += " (an affiliate account)"
	}
	return verdict{typ: TypeInsideAWS, severity: sev, sourceAccount: account, reason: reason}
}

func (d *Detector) judge(g *Group, c Credential, jc *judgeCtx) verdict {
	src, err := netip.ParseAddr(g.Source)
	if err != nil {
		return verdict{} // an AWS service principal or an unparseable source
	}
	src = src.Unmap()
	instance := c.Kind == "instance"
	if g.VPCEndpointID != "" {
		owner, known := g.VPCEAccountID, g.VPCEAccountID != ""
		if !known {
			// Older records and some services leave vpcEndpointAccountId out: the
			// endpoint is the account's own only if the inventory or the trail says so.
			owner, known = d.endpointOwner(g.VPCEndpointID)
		}
		if !known {
			if !instance {
				return verdict{}
			}
			return verdict{typ: TypeInsideAWS, severity: Medium, placedBy: d.placedBy(jc, c),
				reason: fmt.Sprintf("VPC endpoint of unknown owner: called through %s, which the record (no vpcEndpointAccountId), the inventory and the trail do not tie to account %s", g.VPCEndpointID, c.AccountID)}
		}
		if owner != c.AccountID {
			if !instance {
				return verdict{}
			}
			v := d.inside(owner, fmt.Sprintf("called through VPC endpoint %s of account %s, not the credential's account %s", g.VPCEndpointID, owner, c.AccountID))
			v.placedBy = d.placedBy(jc, c)
			return v
		}
		if o, ok := d.ownerAt(jc, src, g.First, c.AccountID); ok && instance && o.instance != c.InstanceID {
			return verdict{typ: TypeOtherInstance, severity: High, placedBy: evidence(o.from), reason: fmt.Sprintf("called through the account's VPC endpoint %s from %s, an address of instance %s (from %s), not of %s", g.VPCEndpointID, src, o.instance, o.from, c.InstanceID)}
		}
		return verdict{} // the account's own VPC endpoint
	}
	if d.egress(src) || instance && d.natEgress(src, c.AccountID) {
		return verdict{}
	}
	if o, ok := d.ownerAt(jc, src, g.First, c.AccountID); ok {
		switch {
		case !instance, o.instance == c.InstanceID:
			return verdict{}
		case o.account == "" || o.account == c.AccountID:
			return verdict{typ: TypeOtherInstance, severity: High, placedBy: evidence(o.from), reason: fmt.Sprintf("%s is an address of instance %s (from %s), not of %s which the key was issued to", src, o.instance, o.from, c.InstanceID)}
		default:
			v := d.inside(o.account, fmt.Sprintf("%s is an address of instance %s in account %s", src, o.instance, o.account))
			v.placedBy = evidence(o.from)
			return v
		}
	}
	r, inAWS := d.opt.Ranges.Lookup(src)
	if !inAWS {
		if !instance {
			return verdict{typ: TypeResourceOutsideAWS, severity: High, reason: fmt.Sprintf("Lambda credentials of %s used from %s, outside AWS's published ranges", c.FunctionName, src)}
		}
		return verdict{typ: TypeOutsideAWS, severity: High, placedBy: d.placedBy(jc, c), reason: fmt.Sprintf("%s is outside AWS's published ranges and not an egress address", src)}
	}
	if !instance {
		return verdict{} // Lambda calls from AWS addresses
	}
	if !jc.hasClaims[c.InstanceID] && jc.firstInAWS[c.InstanceID] == src {
		return verdict{} // learnt: the instance's own address
	}
	v := d.inside("", fmt.Sprintf("%s is an AWS address (%s %s) that is not one of instance %s's", src, r.Service, r.Region, c.InstanceID))
	v.placedBy = d.placedBy(jc, c)
	return v
}

// placedBy names the evidence of where c's instance is: what its known addresses came
// from, else the first-address guess, else none.
func (d *Detector) placedBy(jc *judgeCtx, c Credential) string {
	if c.Kind != "instance" {
		return ""
	}
	if e := jc.placedBy[c.InstanceID]; e != "" {
		return e
	}
	if _, ok := jc.firstInAWS[c.InstanceID]; ok {
		return PlacedByGuess
	}
	return PlacedByNone
}

func (d *Detector) finding(g *Group, c Credential, v verdict) Finding {
	f := Finding{
		ID: findingID(g.AccessKeyID, g.Source+"|"+g.VPCEndpointID, v.typ, g.WindowStart), Type: v.typ, Severity: v.severity,
		AccessKeyID: g.AccessKeyID, SourceIP: g.Source, SourceAccountID: v.sourceAccount, VPCEndpointID: g.VPCEndpointID,
		InstanceID: c.InstanceID, FunctionName: c.FunctionName, AccountID: c.AccountID, Role: c.Role, Region: g.Region,
		IMDSVersion: c.IMDSVersion, Processes: c.Processes, Endpoint: c.Endpoint, CredentialSource: c.Source, WindowStart: g.WindowStart,
		FirstSeen: g.First, LastSeen: g.Last, Count: g.Count, Errors: g.Errors, Reason: v.reason, PlacedBy: v.placedBy,
	}
	if who := containerCredential(c); who != "" {
		f.Reason += "; " + who
	}
	if f.AccountID == "" {
		f.AccountID = g.Account
	}
	if f.Role == "" {
		f.Role = g.Role
	}
	if f.IMDSVersion == "" && g.Delivery != "" {
		f.IMDSVersion = deliveryVersion(g.Delivery)
	}
	for k, n := range g.Calls {
		f.APICalls = append(f.APICalls, Call{Service: k.Service, Name: k.Name, Count: n.Count, Errors: n.Errors})
	}
	sort.Slice(f.APICalls, func(i, j int) bool {
		a, b := f.APICalls[i], f.APICalls[j]
		if a.Count != b.Count {
			return a.Count > b.Count
		}
		return a.Service+a.Name < b.Service+b.Name
	})
	src, _ := netip.ParseAddr(g.Source)
	if src.IsValid() {
		for _, p := range d.opt.Trusted {
			if p.Contains(src.Unmap()) {
				f.Suppressed, f.SuppressedBy = true, "trusted_cidrs "+p.String()
				return f
			}
		}
	}
	for i, r := range d.opt.Suppress {
		if ruleMatches(r, f, src) {
			name := r.Name
			if name == "" {
				name = fmt.Sprintf("suppress[%d]", i)
			}
			f.Suppressed, f.SuppressedBy = true, name
			break
		}
	}
	return f
}

func ruleMatches(r config.Rule, f Finding, src netip.Addr) bool {
	if len(r.Types) > 0 && !anyOf(r.Types, func(t string) bool { return t == f.Type || t == ShortType(f.Type) }) {
		return false
	}
	if len(r.Roles) > 0 && !anyOf(r.Roles, func(s string) bool { return s == f.Role }) {
		return false
	}
	if len(r.Accounts) > 0 && !anyOf(r.Accounts, func(s string) bool { return s == f.AccountID || s == f.SourceAccountID }) {
		return false
	}
	if len(r.Prefixes) > 0 && (!src.IsValid() || !anyPrefix(r.Prefixes, src.Unmap())) {
		return false
	}
	return true
}

func anyOf(list []string, ok func(string) bool) bool {
	for _, s := range list {
		if ok(s) {
			return true
		}
	}
	return false
}

func anyPrefix(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// containerCredential names whose credentials a task or pod key is, from its
// fingerprints' processes: "credentials of ECS task ARN (family F, container C) on
// instance I". Empty for instance and Lambda credentials.
func containerCredential(c Credential) string {
	var whose string
	switch c.Endpoint {
	case "ecs":
		whose = "ECS task"
	case "pod_identity":
		whose = "EKS Pod Identity"
	default:
		return ""
	}
	var names []string
	seen := map[string]bool{}
	for _, p := range c.Processes {
		var n string
		switch {
		case p.ECSTask != nil:
			n = "ECS task " + p.ECSTask.ARN + describe("family", p.ECSTask.Family, "container", p.ECSTask.Container)
		case p.Pod != nil:
			n = "pod " + p.Pod.Namespace + "/" + p.Pod.Name + describe("service account", p.Pod.ServiceAccount, "container", p.Pod.Container)
		case p.ContainerID != "":
			n = "container " + p.ContainerID
		}
		if n != "" && !seen[n] {
			seen[n] = true
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return fmt.Sprintf("%s credentials fetched on instance %s", whose, c.InstanceID)
	}
	return fmt.Sprintf("%s credentials of %s on instance %s", whose, strings.Join(names, ", "), c.InstanceID)
}

// describe is " (k1 v1, k2 v2)" for the pairs whose value is set.
func describe(kv ...string) string {
	var parts []string
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] != "" {
			parts = append(parts, kv[i]+" "+kv[i+1])
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return " (" + strings.Join(parts, ", ") + ")"
}
