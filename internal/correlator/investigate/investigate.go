// Package investigate tells one access key's story: where it was issued (instance,
// process, IMDSv1 or v2), every address it was used from, its API calls by service with
// error counts, the calls that matter most, and the findings it raised.
package investigate

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// Story is the investigation of one key; its JSON is what `--format json` prints.
type Story struct {
	AccessKeyID string               `json:"access_key_id"`
	Issued      *detector.Credential `json:"issued"`
	Records     int64                `json:"records"`
	FirstSeen   time.Time            `json:"first_seen"`
	LastSeen    time.Time            `json:"last_seen"`
	Sources     []Source             `json:"sources"`
	Services    []Service            `json:"services"`
	Notable     []Notable            `json:"notable"`
	Findings    []detector.Finding   `json:"findings"`
}

// Source is one address (or service principal) the key was used from.
type Source struct {
	Address       string    `json:"address"`
	VPCEndpointID string    `json:"vpc_endpoint_id,omitempty"`
	VPCEAccountID string    `json:"vpc_endpoint_account_id,omitempty"`
	FirstSeen     time.Time `json:"first_seen"`
	LastSeen      time.Time `json:"last_seen"`
	Count         int64     `json:"count"`
	Errors        int64     `json:"errors"`
	UserAgent     string    `json:"user_agent,omitempty"`
}

// Service groups the calls made to one service.
type Service struct {
	Service string          `json:"service"`
	Count   int64           `json:"count"`
	Errors  int64           `json:"errors"`
	Calls   []detector.Call `json:"calls"`
}

// Notable is a call worth a look, and why.
type Notable struct {
	detector.Call
	Why string `json:"why"`
}

// Build assembles the story of key from a detector that was fed the records (ideally
// with Options.OnlyKey set to key, so that service principal calls count too).
func Build(d *detector.Detector, key string) Story {
	s := Story{AccessKeyID: key, Sources: []Source{}, Services: []Service{}, Notable: []Notable{}, Findings: []detector.Finding{}}
	if c, ok := d.Credential(key); ok {
		s.Issued = &c
	}
	sources := map[[3]string]*Source{}
	calls := map[detector.CallKey]*detector.Call{}
	for _, g := range d.Groups(key) {
		s.Records += g.Count
		if s.FirstSeen.IsZero() || g.First.Before(s.FirstSeen) {
			s.FirstSeen = g.First
		}
		if g.Last.After(s.LastSeen) {
			s.LastSeen = g.Last
		}
		sk := [3]string{g.Source, g.VPCEndpointID, g.VPCEAccountID}
		src := sources[sk]
		if src == nil {
			src = &Source{Address: g.Source, VPCEndpointID: g.VPCEndpointID, VPCEAccountID: g.VPCEAccountID, FirstSeen: g.First, LastSeen: g.Last, UserAgent: g.UserAgent}
			sources[sk] = src
		}
		src.Count += g.Count
		src.Errors += g.Errors
		if g.First.Before(src.FirstSeen) {
			src.FirstSeen = g.First
		}
		if g.Last.After(src.LastSeen) {
			src.LastSeen = g.Last
		}
		for k, n := range g.Calls {
			c := calls[k]
			if c == nil {
				c = &detector.Call{Service: k.Service, Name: k.Name}
				calls[k] = c
			}
			c.Count += n.Count
			c.Errors += n.Errors
		}
	}
	for _, src := range sources {
		s.Sources = append(s.Sources, *src)
	}
	sort.Slice(s.Sources, func(i, j int) bool { return s.Sources[i].FirstSeen.Before(s.Sources[j].FirstSeen) })
	bySvc := map[string]*Service{}
	for _, c := range calls {
		svc := bySvc[c.Service]
		if svc == nil {
			svc = &Service{Service: c.Service}
			bySvc[c.Service] = svc
		}
		svc.Count += c.Count
		svc.Errors += c.Errors
		svc.Calls = append(svc.Calls, *c)
		if why := Why(c.Service, c.Name); why != "" {
			s.Notable = append(s.Notable, Notable{Call: *c, Why: why})
		}
	}
	for _, svc := range bySvc {
		sort.Slice(svc.Calls, func(i, j int) bool {
			if svc.Calls[i].Count != svc.Calls[j].Count {
				return svc.Calls[i].Count > svc.Calls[j].Count
			}
			return svc.Calls[i].Name < svc.Calls[j].Name
		})
		s.Services = append(s.Services, *svc)
	}
	sort.Slice(s.Services, func(i, j int) bool {
		if s.Services[i].Count != s.Services[j].Count {
			return s.Services[i].Count > s.Services[j].Count
		}
		return s.Services[i].Service < s.Services[j].Service
	})
	sort.Slice(s.Notable, func(i, j int) bool {
		if s.Notable[i].Service != s.Notable[j].Service {
			return s.Notable[i].Service < s.Notable[j].Service
		}
		return s.Notable[i].Name < s.Notable[j].Name
	})
	for _, f := range d.Findings() {
		if f.AccessKeyID == key {
			s.Findings = append(s.Findings, f)
		}
	}
	return s
}

var dataReads = map[string]string{
	"s3/GetObject": "reading data", "s3/ListBuckets": "listing data", "s3/ListObjects": "listing data", "s3/ListObjectsV2": "listing data",
	"secretsmanager/GetSecretValue": "reading secrets", "secretsmanager/ListSecrets": "listing secrets",
	"ssm/GetParameter": "reading parameters", "ssm/GetParameters": "reading parameters", "ssm/GetParametersByPath": "reading parameters",
	"kms/Decrypt": "decrypting data", "dynamodb/Scan": "reading data", "dynamodb/Query": "reading data", "dynamodb/GetItem": "reading data",
	"dynamodb/ListTables": "listing data", "rds/DescribeDBInstances": "listing data", "ec2/CreateSnapshot": "copying data",
	"ec2/GetPasswordData": "reading secrets", "lambda/GetFunction": "reading code", "ec2/DescribeInstances": "reconnaissance",
}

// Why says why a call matters most, "" when it does not stand out: IAM and STS changes,
// GetCallerIdentity reconnaissance, listing and reading data.
func Why(service, name string) string {
	switch service {
	case "iam":
		if isRead(name) {
			return "IAM reconnaissance"
		}
		return "IAM change"
	case "sts":
		if name == "GetCallerIdentity" {
			return "reconnaissance: who am I"
		}
		return "STS: new credentials or sessions"
	case "organizations":
		if !isRead(name) {
			return "organization change"
		}
	}
	return dataReads[service+"/"+name]
}

func isRead(name string) bool {
	for _, p := range []string{"Get", "List", "Describe", "Simulate", "Generate"} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// WriteText prints the story for a person.
func WriteText(w io.Writer, s Story) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format, args...) }
	p("Access key %s\n", s.AccessKeyID)
	if c := s.Issued; c != nil {
		who := "instance " + c.InstanceID
		if c.Kind == "lambda" {
			who = "Lambda function " + c.FunctionName
		}
		p("  issued to\t%s, account %s, role %s (learnt from %s)\n", who, c.AccountID, c.Role, c.Source)
		if !c.Issued.IsZero() || !c.Expiration.IsZero() {
			p("  valid\t%s .. %s\n", ts(c.Issued), ts(c.Expiration))
		}
		if c.IMDSVersion != "" {
			p("  fetched over\tIMDS%s\n", c.IMDSVersion)
		}
		for _, pr := range c.Processes {
			p("  fetched by\tpid %d %s (user %s%s%s)\n", pr.PID, pr.Exe, pr.User, opt(", unit ", pr.Unit), opt(", container ", pr.ContainerID))
		}
		if len(c.HostAddresses) > 0 {
			var as []string
			for _, a := range c.HostAddresses {
				as = append(as, a.String())
			}
			p("  host addresses\t%s\n", strings.Join(as, " "))
		}
	} else {
		p("  issued to\tunknown: no fingerprint, AssumeRole or ec2RoleDelivery record for this key\n")
	}
	p("  records\t%d, %s .. %s\n", s.Records, ts(s.FirstSeen), ts(s.LastSeen))
	p("\nSources\n  ADDRESS\tVIA\tFIRST SEEN\tLAST SEEN\tCALLS\tERRORS\n")
	for _, src := range s.Sources {
		via := "-"
		if src.VPCEndpointID != "" {
			via = src.VPCEndpointID + opt(" account ", src.VPCEAccountID)
		}
		p("  %s\t%s\t%s\t%s\t%d\t%d\n", src.Address, via, ts(src.FirstSeen), ts(src.LastSeen), src.Count, src.Errors)
	}
	p("\nAPI calls\n  SERVICE\tCALL\tCOUNT\tERRORS\tNOTE\n")
	for _, svc := range s.Services {
		for _, c := range svc.Calls {
			note := ""
			if why := Why(c.Service, c.Name); why != "" {
				note = "!! " + why
			}
			p("  %s\t%s\t%d\t%d\t%s\n", c.Service, c.Name, c.Count, c.Errors, note)
		}
	}
	p("\nFindings\n")
	if len(s.Findings) == 0 {
		p("  none\n")
	}
	for _, f := range s.Findings {
		sup := ""
		if f.Suppressed {
			sup = " (suppressed: " + f.SuppressedBy + ")"
		}
		p("  %s\t%s\tfrom %s\t%d calls %s .. %s%s\n", f.Severity, detector.ShortType(f.Type), f.SourceIP, f.Count, ts(f.FirstSeen), ts(f.LastSeen), sup)
		p("  \t%s\n", f.Reason)
	}
	return tw.Flush()
}

func ts(t time.Time) string {
	if t.IsZero() {
		return "?"
	}
	return t.UTC().Format(time.RFC3339)
}

func opt(label, v string) string {
	if v == "" {
		return ""
	}
	return label + v
}
