// Package detector decides, from CloudTrail records, host fingerprints and the operator's
// address sets, which uses of instance and Lambda credentials came from somewhere they
// should not, and explains each as a Finding. It learns which credentials belong where as
// records arrive (in any order) and judges only when asked, so facts that arrive late
// still count; memory grows with distinct (key, source, window) groups, not records.
package detector

import (
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/cloudtrail"
	"github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/correlator/fpstore"
	"github.com/imdsguard/imdsguard/internal/correlator/ipranges"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// Options configure a Detector.
type Options struct {
	Ranges       *ipranges.Set
	Affiliates   []string
	Egress       []netip.Prefix
	Trusted      []netip.Prefix
	Suppress     []config.Rule
	Window       time.Duration
	Fingerprints fpstore.Store // may be nil
	// OnlyKey, when set, makes the detector track that access key alone, from every
	// source including AWS service principals (for investigate).
	OnlyKey string
	Log     zerolog.Logger
}

// OptionsFrom builds Options from a loaded configuration.
func OptionsFrom(cfg config.Config, ranges *ipranges.Set, fps fpstore.Store, log zerolog.Logger) Options {
	return Options{
		Ranges: ranges, Affiliates: cfg.AffiliateAccounts, Egress: cfg.Egress, Trusted: cfg.Trusted,
		Suppress: cfg.Suppress, Window: cfg.Window, Fingerprints: fps, Log: log,
	}
}

// Credential is what is known of a temporary credential's owner.
type Credential struct {
	AccessKeyID  string    `json:"access_key_id"`
	Kind         string    `json:"kind"` // "instance" or "lambda"
	InstanceID   string    `json:"instance_id,omitempty"`
	FunctionName string    `json:"function_name,omitempty"`
	AccountID    string    `json:"account_id"`
	Role         string    `json:"role"`
	Issued       time.Time `json:"issued,omitempty"`
	Expiration   time.Time `json:"expiration,omitempty"`
	IMDSVersion  string    `json:"imds_version,omitempty"`
	// Source: "fingerprint", "AssumeRole", "userIdentity" or "function" (a Lambda key
	// known by its session: the name and role of a function from the inventory or the
	// trail's CreateFunction/UpdateFunctionConfiguration).
	Source    string         `json:"source"`
	Processes []wire.Process `json:"processes,omitempty"`
	// Endpoint is where a fingerprinted key was fetched: imds, ecs or pod_identity.
	Endpoint string `json:"endpoint,omitempty"`
	// HostAddresses are the instance's addresses from its fingerprints.
	HostAddresses []netip.Addr `json:"host_addresses,omitempty"`
}

// Group is the use of one access key from one source in one window.
type Group struct {
	AccessKeyID   string
	Source        string // sourceIPAddress as logged
	VPCEndpointID string
	VPCEAccountID string
	WindowStart   time.Time
	First, Last   time.Time
	Count         int64
	Errors        int64
	// Expired counts calls refused because the credential had expired.
	Expired   int64
	Region    string
	Account   string // userIdentity.accountId
	Role      string
	Session   string
	Delivery  string // ec2RoleDelivery
	UserAgent string
	Calls     map[CallKey]*CallCount
}

// CallKey names an API.
type CallKey struct{ Service, Name string }

// CallCount counts one API's calls.
type CallCount struct{ Count, Errors int64 }

// maxCallsPerGroup bounds the distinct APIs kept per group; the rest are lumped together.
const maxCallsPerGroup = 200

type groupKey struct {
	key, source, vpce, vpceAccount string
	window                         int64
}

// claim says an address belonged to an instance from a time on.
type claim struct {
	instance, account string
	since             time.Time
	from              string // "fingerprint", "inventory", "AssociateAddress", "AttachNetworkInterface", …
	// An empty instance ends the claims before it: the address was disassociated or
	// released at since.
}

// Stats count what the detector saw.
type Stats struct {
	Records     int64 `json:"records"`
	Learned     int64 `json:"credentials_learned"`
	AddressInfo int64 `json:"address_changes"`
	Groups      int   `json:"groups"`
}

// Detector learns and judges. It is not safe for concurrent use.
type Detector struct {
	opt        Options
	affiliates map[string]bool
	creds      map[string]*Credential
	claims     map[netip.Addr][]claim
	groups     map[groupKey]*Group
	enis       map[string][]netip.Addr // network interface id → its addresses
	attaches   map[string][]claim      // network interface id → instances it was attached to
	pl         placement
	inv        inventoryIndex
	stats      Stats
}

// New returns a Detector.
func New(opt Options) *Detector {
	if opt.Window <= 0 {
		opt.Window = time.Hour
	}
	d := &Detector{
		opt:        opt,
		affiliates: map[string]bool{},
		creds:      map[string]*Credential{},
		claims:     map[netip.Addr][]claim{},
		groups:     map[groupKey]*Group{},
		enis:       map[string][]netip.Addr{},
		attaches:   map[string][]claim{},
		pl:         newPlacement(),
		inv:        newInventoryIndex(),
	}
	for _, a := range opt.Affiliates {
		d.affiliates[a] = true
	}
	return d
}

// Stats returns the counters so far.
func (d *Detector) Stats() Stats {
	s := d.stats
	s.Groups = len(d.groups)
	return s
}

// Observe takes one record. It does not keep rec.
func (d *Detector) Observe(rec *cloudtrail.Record) {
	d.stats.Records++
	d.learn(rec)
	d.learnPlacement(rec)
	d.use(rec)
}

func (d *Detector) learn(rec *cloudtrail.Record) {
	if a, ok := cloudtrail.ParseAssumeRole(rec); ok {
		principal := rec.SourceIPAddress
		if principal == "" || !cloudtrail.IsServicePrincipal(principal) {
			principal = rec.UserIdentity.InvokedBy
		}
		account, role := roleFromARN(a.RoleARN)
		c := &Credential{AccessKeyID: a.AccessKeyID, AccountID: account, Role: role, Issued: rec.Time, Expiration: a.Expiration, Source: "AssumeRole"}
		switch principal {
		case "ec2.amazonaws.com":
			c.Kind, c.InstanceID = "instance", a.RoleSessionName
		case "lambda.amazonaws.com":
			c.Kind, c.FunctionName = "lambda", a.RoleSessionName
		default:
			return
		}
		if old, ok := d.creds[c.AccessKeyID]; !ok || old.Source == "userIdentity" {
			d.creds[c.AccessKeyID] = c
			d.stats.Learned++
			d.opt.Log.Debug().Str("event", "credential_learned").Str("access_key_id", c.AccessKeyID).Str("kind", c.Kind).
				Str("instance_id", c.InstanceID).Str("function_name", c.FunctionName).Str("role", c.Role).Msg("learnt a credential from AssumeRole")
		}
		return
	}
	if ni, ok := cloudtrail.ParseNetworkInterface(rec); ok {
		for _, s := range ni.Addresses {
			if a, err := netip.ParseAddr(s); err == nil {
				d.enis[ni.ID] = append(d.enis[ni.ID], a.Unmap())
			}
		}
		return
	}
	if ch, ok := cloudtrail.ParseAddressChange(rec); ok {
		account := rec.RecipientAccountID
		if account == "" {
			account = rec.UserIdentity.AccountID
		}
		if ch.NetworkInterfaceID != "" && rec.EventName == "AttachNetworkInterface" {
			// Its addresses may come later (records arrive in any order): joined when judging.
			d.attaches[ch.NetworkInterfaceID] = append(d.attaches[ch.NetworkInterfaceID], claim{instance: ch.InstanceID, account: account, since: rec.Time, from: rec.EventName})
			d.stats.AddressInfo++
		}
		addrs := append([]string{ch.PublicIP}, ch.PrivateIPs...)
		for _, s := range addrs {
			if a, err := netip.ParseAddr(s); err == nil {
				d.addClaim(a.Unmap(), claim{instance: ch.InstanceID, account: account, since: rec.Time, from: rec.EventName})
				d.stats.AddressInfo++
			}
		}
	}
}

func (d *Detector) addClaim(a netip.Addr, c claim) {
	for _, old := range d.claims[a] {
		if old == c {
			return
		}
	}
	d.claims[a] = append(d.claims[a], c)
}

// roleFromARN splits arn:aws:iam::ACCOUNT:role/path/NAME.
func roleFromARN(arn string) (account, role string) {
	parts := strings.SplitN(arn, ":", 6)
	if len(parts) == 6 {
		account = parts[4]
		role = parts[5][strings.LastIndexByte(parts[5], '/')+1:]
	}
	return account, role
}

func (d *Detector) use(rec *cloudtrail.Record) {
	id := &rec.UserIdentity
	key := id.AccessKeyID
	if key == "" {
		return
	}
	if d.opt.OnlyKey != "" {
		if key != d.opt.OnlyKey {
			return
		}
	} else if !strings.HasPrefix(key, "ASIA") || cloudtrail.IsServicePrincipal(rec.SourceIPAddress) {
		// Long-term keys are no instance's; calls made by AWS services on the
		// principal's behalf come from AWS, not from wherever the key is.
		return
	}
	// Instance credentials recognised without their AssumeRole record.
	if _, ok := d.creds[key]; !ok && id.SessionContext.EC2RoleDelivery != "" && cloudtrail.IsInstanceID(id.SessionName()) {
		d.creds[key] = &Credential{AccessKeyID: key, Kind: "instance", InstanceID: id.SessionName(), AccountID: id.AccountID,
			Role: id.RoleName(), IMDSVersion: deliveryVersion(id.SessionContext.EC2RoleDelivery), Source: "userIdentity"}
		d.stats.Learned++
	}
	if _, ok := d.creds[key]; !ok {
		if _, ok := d.pl.sessions[key]; !ok {
			d.pl.sessions[key] = session{account: id.AccountID, role: id.RoleName(), name: id.SessionName()}
		}
	}
	// A record whose source is no address cannot be judged: counted by cause (and
	// reported for the keys that turn out to be instances' or functions').
	if rec.SourceIPAddress == "" {
		d.drop(key, DropNoSource)
		if d.opt.OnlyKey == "" {
			return
		}
	}
	if rec.SourceIPAddress != "" && !cloudtrail.IsServicePrincipal(rec.SourceIPAddress) {
		if _, err := netip.ParseAddr(rec.SourceIPAddress); err != nil {
			d.drop(key, DropBadSource)
			if d.opt.OnlyKey == "" {
				return
			}
		}
	}
	gk := groupKey{key: key, source: rec.SourceIPAddress, vpce: rec.VPCEndpointID, vpceAccount: rec.VPCEndpointAccountID,
		window: rec.Time.Truncate(d.opt.Window).Unix()}
	g := d.groups[gk]
	if g == nil {
		g = &Group{AccessKeyID: key, Source: rec.SourceIPAddress, VPCEndpointID: rec.VPCEndpointID, VPCEAccountID: rec.VPCEndpointAccountID,
			WindowStart: time.Unix(gk.window, 0).UTC(), First: rec.Time, Last: rec.Time, Region: rec.AWSRegion, Account: id.AccountID,
			Role: id.RoleName(), Session: id.SessionName(), Delivery: id.SessionContext.EC2RoleDelivery, UserAgent: rec.UserAgent,
			Calls: map[CallKey]*CallCount{}}
		d.groups[gk] = g
	}
	g.Count++
	if rec.Time.Before(g.First) {
		g.First = rec.Time
	}
	if rec.Time.After(g.Last) {
		g.Last = rec.Time
	}
	failed := rec.ErrorCode != ""
	if failed {
		g.Errors++
		if strings.HasPrefix(rec.ErrorCode, "ExpiredToken") {
			g.Expired++
		}
	}
	ck := CallKey{Service: strings.TrimSuffix(rec.EventSource, ".amazonaws.com"), Name: rec.EventName}
	c := g.Calls[ck]
	if c == nil {
		if len(g.Calls) >= maxCallsPerGroup {
			ck = CallKey{Service: "(other)", Name: "(other)"}
			c = g.Calls[ck]
		}
		if c == nil {
			c = &CallCount{}
			g.Calls[ck] = c
		}
	}
	c.Count++
	if failed {
		c.Errors++
	}
}

func deliveryVersion(s string) string {
	switch {
	case strings.HasPrefix(s, "1."):
		return "v1"
	case strings.HasPrefix(s, "2."):
		return "v2"
	}
	return s
}

// Credential returns what is known of key's owner, with fingerprints taking precedence.
func (d *Detector) Credential(key string) (Credential, bool) {
	var c Credential
	learnt, ok := d.creds[key]
	if ok {
		c = *learnt
	} else {
		c, ok = d.lambdaBySession(key)
	}
	if d.opt.Fingerprints == nil {
		return c, ok
	}
	fps := d.opt.Fingerprints.ByAccessKey(key)
	if len(fps) == 0 {
		return c, ok
	}
	fp := fps[0]
	c.AccessKeyID, c.Kind, c.InstanceID, c.AccountID = key, "instance", fp.Instance.ID, fp.Instance.AccountID
	c.Role, c.Issued, c.Expiration, c.Source = fp.Role, fp.LastUpdated, fp.Expiration, "fingerprint"
	c.IMDSVersion = fp.IMDSVersion
	c.Endpoint = fp.Endpoint
	if c.Endpoint == "" {
		c.Endpoint = "imds" // agents before the field fetched from IMDS alone
	}
	if c.Role == "" {
		// The Pod Identity agent's answer names no role: the trail's session does.
		if s, ok := d.pl.sessions[key]; ok {
			c.Role = s.role
		}
	}
	c.Processes, c.HostAddresses = nil, nil
	seen := map[netip.Addr]bool{}
	for _, f := range fps {
		c.Processes = append(c.Processes, f.Process)
		if f.IMDSVersion == "v1" {
			c.IMDSVersion = "v1" // the weaker one matters
		}
		for _, a := range f.HostAddresses {
			if !seen[a] {
				seen[a] = true
				c.HostAddresses = append(c.HostAddresses, a)
			}
		}
	}
	return c, true
}

// Groups returns the use groups of key, oldest first.
func (d *Detector) Groups(key string) []*Group {
	var out []*Group
	for gk, g := range d.groups {
		if gk.key == key {
			out = append(out, g)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].First.Before(out[j].First) })
	return out
}

// Forget drops groups whose window ended before t and credentials that expired before
// t, so a long-running serve keeps bounded memory.
func (d *Detector) Forget(t time.Time) {
	live := map[string]bool{}
	for gk, g := range d.groups {
		if g.WindowStart.Add(d.opt.Window).Before(t) {
			delete(d.groups, gk)
		} else {
			live[gk.key] = true
		}
	}
	d.forgetPlacement(live)
	for k, c := range d.creds {
		if !c.Expiration.IsZero() && c.Expiration.Before(t) {
			delete(d.creds, k)
		}
	}
}

// SetRanges swaps AWS's published ranges (after a refresh of ip-ranges.json).
func (d *Detector) SetRanges(r *ipranges.Set) { d.opt.Ranges = r }
