// Package ctcorpus generates labelled CloudTrail corpora: every finding type and the
// benign look-alikes that must not be flagged (an account's own VPC endpoint, NAT egress,
// service principal calls, an affiliate account, an on-premises trusted range, expired
// keys, IPv6 sources, an elastic IP moved by AssociateAddress), in the exact format AWS
// delivers, with the configuration, ip-ranges.json and fingerprints they assume. It also
// writes large files of realistic benign traffic for the benchmark.
package ctcorpus

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"net/netip"
	"time"

	"github.com/imdsguard/imdsguard/internal/wire"
)

// Accounts of the corpus.
const (
	Account   = "111111111111" // the instances' account
	Affiliate = "222222222222" // in affiliate_accounts
	Stranger  = "333333333333"
)

// Finding type names (kept here so this package does not depend on the detector).
const (
	OutsideAWS         = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OutsideAWS"
	InsideAWS          = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.InsideAWS"
	OtherInstance      = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OtherInstance"
	ResourceOutsideAWS = "UnauthorizedAccess:IAMUser/ResourceCredentialExfiltration.OutsideAWS"
)

// Label says what the detector must make of one record.
type Label struct {
	EventID     string    `json:"event_id"`
	Time        time.Time `json:"time"`
	AccessKeyID string    `json:"access_key_id"`
	SourceIP    string    `json:"source_ip"`
	// Type and Severity are set for positives; Benign names the look-alike otherwise.
	Type     string `json:"type,omitempty"`
	Severity string `json:"severity,omitempty"`
	// Suppressed positives must be found and marked suppressed (trusted ranges).
	Suppressed bool   `json:"suppressed,omitempty"`
	Benign     string `json:"benign,omitempty"`
}

// Corpus is a generated scenario.
type Corpus struct {
	Records      []map[string]any
	Labels       []Label
	Fingerprints []wire.Fingerprint
	IPRanges     []byte // ip-ranges.json
	// Config is the YAML the corpus assumes; IPRANGES stands for the ip-ranges.json path.
	Config string
	// Malformed are raw array elements that are not valid records (to be counted).
	Malformed []string
}

// Base is the corpus's first event time.
var Base = time.Date(2026, 11, 20, 8, 0, 0, 0, time.UTC)

// IPRangesJSON is the ip-ranges.json of the corpus: 3.0.0.0/8, 52.0.0.0/8 and
// 2600:1f00::/24 are AWS's.
const IPRangesJSON = `{
  "syncToken": "1763596800",
  "createDate": "2026-11-20-00-00-00",
  "prefixes": [
    {"ip_prefix": "3.0.0.0/8", "region": "us-east-1", "service": "AMAZON", "network_border_group": "us-east-1"},
    {"ip_prefix": "3.5.0.0/16", "region": "us-east-1", "service": "EC2", "network_border_group": "us-east-1"},
    {"ip_prefix": "52.0.0.0/8", "region": "us-west-2", "service": "AMAZON", "network_border_group": "us-west-2"}
  ],
  "ipv6_prefixes": [
    {"ipv6_prefix": "2600:1f00::/24", "region": "us-east-1", "service": "AMAZON", "network_border_group": "us-east-1"}
  ]
}
`

// ConfigYAML is the configuration the corpus assumes.
const ConfigYAML = `ip_ranges: IPRANGES
affiliate_accounts: ["222222222222"]
egress_cidrs: ["198.51.100.7/32", "3.5.200.7/32"]
trusted_cidrs: ["203.0.113.0/24"]
window: 1h
`

type gen struct {
	c   *Corpus
	rnd *rand.Rand
	n   int
}

func (g *gen) id() string {
	g.n++
	return fmt.Sprintf("00000000-0000-4000-8000-%012d", g.n)
}

// Instance identities of the corpus.
const (
	InstA1 = "i-0a1a1a1a1a1a1a1a1" // fingerprinted (process known), IPv4+IPv6
	InstA2 = "i-0a2a2a2a2a2a2a2a2" // AssumeRole + AssociateAddress
	InstA3 = "i-0a3a3a3a3a3a3a3a3" // userIdentity only; its elastic IP moves
	InstA4 = "i-0a4a4a4a4a4a4a4a4" // AssumeRole only, no address known: learnt from use
	InstA6 = "i-0a6a6a6a6a6a6a6a6" // expired key
	InstB1 = "i-0b1b1b1b1b1b1b1b1" // affiliate account, fingerprinted
	InstC1 = "i-0c1c1c1c1c1c1c1c1" // learnt from userIdentity; used via a stranger's endpoint
)

// Keys of the corpus.
const (
	KeyA1     = "ASIAA1EXAMPLE0000001"
	KeyA2     = "ASIAA2EXAMPLE0000002"
	KeyA3     = "ASIAA3EXAMPLE0000003"
	KeyA4     = "ASIAA4EXAMPLE0000004"
	KeyA6     = "ASIAA6EXAMPLE0000006"
	KeyB1     = "ASIAB1EXAMPLE0000011"
	KeyC1     = "ASIAC1EXAMPLE0000012"
	KeyLambda = "ASIALAMBDAEXAMPLE005"
	KeyHuman  = "ASIAHUMANEXAMPLE0007"
	KeyUser   = "AKIAUSEREXAMPLE00008"
)

// Labelled generates the labelled corpus (deterministic for a seed).
func Labelled(seed int64) *Corpus {
	g := &gen{c: &Corpus{IPRanges: []byte(IPRangesJSON), Config: ConfigYAML}, rnd: rand.New(rand.NewSource(seed))}
	t := func(min int) time.Time { return Base.Add(time.Duration(min) * time.Minute) }

	// Fingerprints: A1 (curl over IMDSv1) and B1 in the affiliate account.
	g.c.Fingerprints = []wire.Fingerprint{
		{ID: "fp-a1", AccessKeyID: KeyA1, Role: "web", InstanceProfileARN: "arn:aws:iam::111111111111:instance-profile/web",
			LastUpdated: t(0), Expiration: t(360), Instance: wire.Instance{ID: InstA1, AccountID: Account, Region: "us-east-1", AvailabilityZone: "us-east-1a"},
			HostAddresses: addrs("10.0.1.11", "3.5.1.11", "2600:1f00::11"), IMDSVersion: "v1",
			Process: wire.Process{PID: 4242, Exe: "/usr/bin/curl", User: "www-data", Unit: "webapp.service"}},
		{ID: "fp-b1", AccessKeyID: KeyB1, Role: "batch", LastUpdated: t(0), Expiration: t(360),
			Instance:      wire.Instance{ID: InstB1, AccountID: Affiliate, Region: "us-west-2", AvailabilityZone: "us-west-2b"},
			HostAddresses: addrs("172.31.5.5", "52.20.0.5"), IMDSVersion: "v2", Process: wire.Process{PID: 77, Exe: "/opt/batch/bin/worker", User: "batch"}},
	}

	// Issuance seen in CloudTrail.
	g.assumeRole(t(1), "ec2.amazonaws.com", "web2", InstA2, KeyA2, t(361))
	g.assumeRole(t(2), "ec2.amazonaws.com", "web4", InstA4, KeyA4, t(362))
	g.assumeRole(t(3), "ec2.amazonaws.com", "web6", InstA6, KeyA6, t(60))
	g.assumeRole(t(4), "lambda.amazonaws.com", "billing-role", "billing-fn", KeyLambda, t(364))
	g.associate(t(5), InstA2, "3.5.2.22")
	g.associate(t(6), InstA3, "3.5.3.33")
	g.associate(t(180), InstA3, "3.5.3.34") // the elastic IP moves
	g.attachENI(t(100), InstA2, "eni-0a2a2a2a2a2a2a2a7", "10.0.7.7", "2600:1f00::77")

	inst := func(key, inst, role, delivery string) identity {
		return identity{key: key, account: Account, role: role, session: inst, delivery: delivery}
	}
	a1 := inst(KeyA1, InstA1, "web", "1.0")
	a2 := inst(KeyA2, InstA2, "web2", "2.0")
	a3 := inst(KeyA3, InstA3, "web3", "2.0")
	a4 := inst(KeyA4, InstA4, "web4", "2.0")
	a6 := inst(KeyA6, InstA6, "web6", "2.0")
	b1 := identity{key: KeyB1, account: Affiliate, role: "batch", session: InstB1, delivery: "2.0"}
	c1 := identity{key: KeyC1, account: Account, role: "web5", session: "i-0c1c1c1c1c1c1c1c1", delivery: "2.0"}
	lam := identity{key: KeyLambda, account: Account, role: "billing-role", session: "billing-fn"}
	human := identity{key: KeyHuman, account: Account, role: "admin", session: "alice@example.com"}

	benign := func(n int, id identity, src, why string, at int, opts ...func(map[string]any)) {
		for i := 0; i < n; i++ {
			r := g.call(t(at+i), id, src, opts...)
			g.label(r, Label{Benign: why})
		}
	}
	positive := func(n int, id identity, src, typ, sev string, at int, opts ...func(map[string]any)) {
		for i := 0; i < n; i++ {
			r := g.call(t(at+i), id, src, opts...)
			g.label(r, Label{Type: typ, Severity: sev})
		}
	}

	// Benign look-alikes.
	benign(20, a1, "3.5.1.11", "own public address (fingerprint)", 10)
	benign(8, a1, "2600:1f00::11", "own IPv6 address (fingerprint)", 40)
	benign(8, a1, "10.0.1.11", "own VPC endpoint", 50, vpce("vpce-0aaa", Account))
	benign(6, a1, "10.0.9.9", "own VPC endpoint, unfingerprinted private address", 60, vpce("vpce-0aaa", ""))
	benign(8, a1, "198.51.100.7", "NAT egress", 70)
	benign(8, a1, "cloudformation.amazonaws.com", "service principal", 80, invokedBy("cloudformation.amazonaws.com"))
	benign(10, a2, "3.5.2.22", "elastic IP from AssociateAddress", 20)
	benign(6, a2, "3.5.200.7", "egress CIDR inside AWS", 30)
	benign(6, a2, "2600:1f00::77", "IPv6 address of a network interface attached by AttachNetworkInterface", 110)
	benign(10, a3, "3.5.3.33", "elastic IP before the move", 100)
	benign(10, a3, "3.5.3.34", "elastic IP moved by AssociateAddress", 200)
	benign(10, a4, "3.5.4.44", "address learnt from first use", 15)
	benign(5, a6, "3.5.6.66", "address learnt from first use", 10)
	benign(4, a6, "192.0.2.77", "expired key refused", 90, errorCode("ExpiredToken"))
	benign(10, lam, "3.6.0.9", "Lambda inside AWS", 25)
	benign(6, b1, "52.20.0.5", "affiliate instance on its own address", 30)
	benign(6, human, "192.0.2.200", "a person's role session, not an instance's", 30)
	benign(6, identity{key: KeyUser, account: Account, user: "deploy"}, "192.0.2.201", "IAM user key", 35)
	benign(5, c1, "3.5.12.12", "address learnt from first use", 5)
	// Suppressed: on-premises egress through the trusted range.
	for i := 0; i < 6; i++ {
		r := g.call(t(120+i), a2, "203.0.113.40")
		g.label(r, Label{Type: OutsideAWS, Severity: "High", Suppressed: true})
	}

	// Positives.
	positive(5, a1, "192.0.2.66", OutsideAWS, "High", 130)
	positive(3, a1, "10.0.2.2", InsideAWS, "Medium", 140, vpce("vpce-0bbb", Affiliate))
	positive(3, c1, "10.8.0.8", InsideAWS, "High", 145, vpce("vpce-0ccc", Stranger))
	positive(4, a2, "3.5.1.11", OtherInstance, "High", 150)
	positive(4, a2, "52.20.0.5", InsideAWS, "Medium", 155)
	positive(4, a2, "10.0.1.11", OtherInstance, "High", 157, vpce("vpce-0aaa", Account))
	positive(4, a3, "52.10.0.99", InsideAWS, "High", 160)
	positive(3, a3, "3.5.3.33", OtherInstance, "High", 240) // after the move: A2 now holds it
	g.associate(t(230), InstA2, "3.5.3.33")
	positive(4, a4, "2001:db8::66", OutsideAWS, "High", 170)
	positive(3, a4, "52.44.0.1", InsideAWS, "High", 175)
	positive(5, lam, "198.51.100.23", ResourceOutsideAWS, "High", 180)
	positive(3, a6, "192.0.2.78", OutsideAWS, "High", 30) // before expiry: a real use

	g.c.Malformed = []string{`5`, `{"eventTime":"yesterday"}`, `{"userIdentity":"nobody","eventTime":"2026-11-20T10:00:00Z"}`}
	g.rnd.Shuffle(len(g.c.Records), func(i, j int) {
		g.c.Records[i], g.c.Records[j] = g.c.Records[j], g.c.Records[i]
		g.c.Labels[i], g.c.Labels[j] = g.c.Labels[j], g.c.Labels[i]
	})
	return g.c
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

type identity struct {
	key, account, role, session, delivery string
	user                                  string // IAM user (long-term key)
}

func (g *gen) label(r map[string]any, l Label) {
	l.EventID = r["eventID"].(string)
	l.Time, _ = time.Parse(time.RFC3339, r["eventTime"].(string))
	l.SourceIP = r["sourceIPAddress"].(string)
	l.AccessKeyID = r["userIdentity"].(map[string]any)["accessKeyId"].(string)
	g.c.Labels = append(g.c.Labels, l)
}

var apis = []struct{ source, name string }{
	{"s3.amazonaws.com", "ListBuckets"}, {"s3.amazonaws.com", "GetObject"}, {"sts.amazonaws.com", "GetCallerIdentity"},
	{"ec2.amazonaws.com", "DescribeInstances"}, {"secretsmanager.amazonaws.com", "GetSecretValue"},
	{"ssm.amazonaws.com", "GetParameter"}, {"iam.amazonaws.com", "ListRoles"}, {"kms.amazonaws.com", "Decrypt"},
	{"dynamodb.amazonaws.com", "GetItem"}, {"logs.amazonaws.com", "PutLogEvents"},
}

func vpce(id, account string) func(map[string]any) {
	return func(r map[string]any) {
		r["vpcEndpointId"] = id
		if account != "" {
			r["vpcEndpointAccountId"] = account
		}
	}
}

func invokedBy(svc string) func(map[string]any) {
	return func(r map[string]any) { r["userIdentity"].(map[string]any)["invokedBy"] = svc; r["userAgent"] = svc }
}

func errorCode(code string) func(map[string]any) {
	return func(r map[string]any) {
		r["errorCode"] = code
		r["errorMessage"] = "The security token included in the request is expired"
	}
}

// call makes an API call record by id from src.
func (g *gen) call(at time.Time, id identity, src string, opts ...func(map[string]any)) map[string]any {
	api := apis[g.rnd.Intn(len(apis))]
	r := g.base(at, api.source, api.name, src)
	r["userIdentity"] = id.userIdentity(at)
	r["requestParameters"] = map[string]any{"bucketName": "corp-data", "Host": api.source}
	r["readOnly"] = true
	for _, o := range opts {
		o(r)
	}
	g.c.Records = append(g.c.Records, r)
	return r
}

func (id identity) userIdentity(at time.Time) map[string]any {
	if id.user != "" {
		return map[string]any{"type": "IAMUser", "principalId": "AIDAEXAMPLE", "arn": "arn:aws:iam::" + id.account + ":user/" + id.user,
			"accountId": id.account, "accessKeyId": id.key, "userName": id.user}
	}
	sc := map[string]any{
		"sessionIssuer": map[string]any{"type": "Role", "principalId": "AROAEXAMPLE" + id.role, "arn": "arn:aws:iam::" + id.account + ":role/" + id.role,
			"accountId": id.account, "userName": id.role},
		"attributes": map[string]any{"creationDate": at.Add(-time.Hour).Format(time.RFC3339), "mfaAuthenticated": "false"},
	}
	if id.delivery != "" {
		sc["ec2RoleDelivery"] = id.delivery
	}
	return map[string]any{"type": "AssumedRole", "principalId": "AROAEXAMPLE" + id.role + ":" + id.session,
		"arn": "arn:aws:sts::" + id.account + ":assumed-role/" + id.role + "/" + id.session, "accountId": id.account,
		"accessKeyId": id.key, "sessionContext": sc}
}

func (g *gen) base(at time.Time, source, name, src string) map[string]any {
	return map[string]any{
		"eventVersion": "1.09", "eventTime": at.Format(time.RFC3339), "eventSource": source, "eventName": name,
		"awsRegion": "us-east-1", "sourceIPAddress": src, "userAgent": "aws-sdk-go-v2/1.30.0 os/linux lang/go#1.26",
		"requestID": fmt.Sprintf("%08X-REQ", g.n+1), "eventID": g.id(), "eventType": "AwsApiCall", "managementEvent": true,
		"recipientAccountId": Account, "eventCategory": "Management",
		"tlsDetails": map[string]any{"tlsVersion": "TLSv1.3", "cipherSuite": "TLS_AES_128_GCM_SHA256", "clientProvidedHostHeader": source},
	}
}

func (g *gen) assumeRole(at time.Time, principal, role, session, key string, exp time.Time) {
	r := g.base(at, "sts.amazonaws.com", "AssumeRole", principal)
	r["userIdentity"] = map[string]any{"type": "AWSService", "invokedBy": principal}
	r["userAgent"] = principal
	r["requestParameters"] = map[string]any{"roleArn": "arn:aws:iam::" + Account + ":role/" + role, "roleSessionName": session}
	r["responseElements"] = map[string]any{
		"credentials":     map[string]any{"accessKeyId": key, "sessionToken": "IQoJb3JpZ2luX2VjEXAMPLE", "expiration": exp.Format("Jan 2, 2006, 3:04:05 PM")},
		"assumedRoleUser": map[string]any{"assumedRoleId": "AROAEXAMPLE:" + session, "arn": "arn:aws:sts::" + Account + ":assumed-role/" + role + "/" + session},
	}
	r["resources"] = []any{map[string]any{"accountId": Account, "type": "AWS::IAM::Role", "ARN": "arn:aws:iam::" + Account + ":role/" + role}}
	g.c.Records = append(g.c.Records, r)
	g.c.Labels = append(g.c.Labels, Label{EventID: r["eventID"].(string), SourceIP: principal, Benign: "AssumeRole by " + principal})
}

func (g *gen) associate(at time.Time, inst, ip string) {
	r := g.base(at, "ec2.amazonaws.com", "AssociateAddress", "192.0.2.250")
	r["userIdentity"] = map[string]any{"type": "IAMUser", "accountId": Account, "arn": "arn:aws:iam::" + Account + ":user/ops", "accessKeyId": "AKIAOPSEXAMPLE000001"}
	r["requestParameters"] = map[string]any{"instanceId": inst, "publicIp": ip, "allowReassociation": true}
	r["responseElements"] = map[string]any{"requestId": "x", "_return": true, "associationId": "eipassoc-" + ip}
	g.c.Records = append(g.c.Records, r)
	g.c.Labels = append(g.c.Labels, Label{EventID: r["eventID"].(string), SourceIP: "192.0.2.250", Benign: "AssociateAddress"})
}

// attachENI records CreateNetworkInterface (after the attach in file order, on purpose)
// and AttachNetworkInterface of the interface to inst.
func (g *gen) attachENI(at time.Time, inst, eni, private, v6 string) {
	r := g.base(at, "ec2.amazonaws.com", "AttachNetworkInterface", "192.0.2.250")
	r["userIdentity"] = map[string]any{"type": "IAMUser", "accountId": Account, "arn": "arn:aws:iam::" + Account + ":user/ops", "accessKeyId": "AKIAOPSEXAMPLE000001"}
	r["requestParameters"] = map[string]any{"networkInterfaceId": eni, "instanceId": inst, "deviceIndex": 1}
	r["responseElements"] = map[string]any{"requestId": "x", "attachmentId": "eni-attach-0001"}
	g.c.Records = append(g.c.Records, r)
	g.c.Labels = append(g.c.Labels, Label{EventID: r["eventID"].(string), SourceIP: "192.0.2.250", Benign: "AttachNetworkInterface"})
	c := g.base(at.Add(-time.Minute), "ec2.amazonaws.com", "CreateNetworkInterface", "192.0.2.250")
	c["userIdentity"] = r["userIdentity"]
	c["requestParameters"] = map[string]any{"subnetId": "subnet-0a", "ipv6AddressCount": 1}
	c["responseElements"] = map[string]any{"requestId": "y", "networkInterface": map[string]any{
		"networkInterfaceId": eni, "subnetId": "subnet-0a", "privateIpAddress": private,
		"privateIpAddressesSet": map[string]any{"item": []any{map[string]any{"privateIpAddress": private, "primary": true}}},
		"ipv6AddressesSet":      map[string]any{"item": []any{map[string]any{"ipv6Address": v6}}},
	}}
	g.c.Records = append(g.c.Records, c)
	g.c.Labels = append(g.c.Labels, Label{EventID: c["eventID"].(string), SourceIP: "192.0.2.250", Benign: "CreateNetworkInterface"})
}

// MarshalRecords renders records as a CloudTrail log file body ({"Records":[...]}), with
// extra raw elements appended (for malformed ones).
func MarshalRecords(recs []map[string]any, extra ...string) ([]byte, error) {
	out := []byte(`{"Records":[`)
	for i, r := range recs {
		if i > 0 {
			out = append(out, ',')
		}
		b, err := json.Marshal(r)
		if err != nil {
			return nil, fmt.Errorf("marshal record: %w", err)
		}
		out = append(out, b...)
	}
	for _, e := range extra {
		if len(out) > len(`{"Records":[`) {
			out = append(out, ',')
		}
		out = append(out, e...)
	}
	return append(out, "]}\n"...), nil
}
