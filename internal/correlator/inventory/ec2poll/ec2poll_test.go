package ec2poll

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"

	"github.com/imdsguard/imdsguard/internal/correlator/inventory"
)

// standIn is EC2 and STS as the SDK sees them: it decodes the query-protocol forms the
// SDK posts and the SigV4 credential scope it signs with (access key, region, service),
// and answers in the APIs' XML. An assumed role's access key names its account, so each
// account in each region has its own listing.
type standIn struct {
	t  *testing.T
	mu sync.Mutex
	// listings: account/region → what it has.
	listings map[string]listing
	// failing: account/region whose calls are refused.
	failing map[string]bool
	calls   []string // "Action account/region" in order
}

var scopeRE = regexp.MustCompile(`Credential=([A-Z0-9]+)/\d{8}/([a-z0-9-]+)/([a-z0-9]+)/aws4_request`)

const ownKey = "AKIAOWNACCOUNTKEY1"

func (s *standIn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil || r.Method != http.MethodPost {
		http.Error(w, "not a query-protocol request", http.StatusBadRequest)
		return
	}
	m := scopeRE.FindStringSubmatch(r.Header.Get("Authorization"))
	if m == nil {
		http.Error(w, "unsigned", http.StatusForbidden)
		return
	}
	key, region, service := m[1], m[2], m[3]
	action := r.Form.Get("Action")
	s.mu.Lock()
	defer s.mu.Unlock()
	w.Header().Set("Content-Type", "text/xml")
	switch service {
	case "sts":
		if action != "AssumeRole" || r.Form.Get("Version") != "2011-06-15" || key != ownKey || r.Form.Get("RoleSessionName") != SessionName {
			http.Error(w, "unexpected STS call "+r.Form.Encode(), http.StatusBadRequest)
			return
		}
		account := strings.Split(r.Form.Get("RoleArn"), ":")[4]
		s.calls = append(s.calls, "AssumeRole "+account)
		fmt.Fprintf(w, `<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult>
<Credentials><AccessKeyId>ASIA%s</AccessKeyId><SecretAccessKey>secret</SecretAccessKey><SessionToken>token</SessionToken><Expiration>%s</Expiration></Credentials>
<AssumedRoleUser><Arn>%s/%s</Arn><AssumedRoleId>AROA:%s</AssumedRoleId></AssumedRoleUser></AssumeRoleResult>
<ResponseMetadata><RequestId>r1</RequestId></ResponseMetadata></AssumeRoleResponse>`,
			account, time.Now().Add(time.Hour).UTC().Format(time.RFC3339), r.Form.Get("RoleArn"), SessionName, SessionName)
	case "ec2":
		account := "111111111111"
		if key != ownKey {
			account = strings.TrimPrefix(key, "ASIA")
		}
		where := account + "/" + region
		s.calls = append(s.calls, action+" "+where)
		if r.Form.Get("Version") != "2016-11-15" {
			http.Error(w, "bad version", http.StatusBadRequest)
			return
		}
		if s.failing[where] {
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprint(w, `<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>not authorized</Message></Error></Errors><RequestID>r2</RequestID></Response>`)
			return
		}
		l := s.listings[where]
		switch action {
		case "DescribeNetworkInterfaces":
			// Two pages: the second only when the SDK sends the token back.
			page, next := strings.Join(l.interfaces[:len(l.interfaces)/2], ""), "<nextToken>page2</nextToken>"
			if r.Form.Get("NextToken") == "page2" {
				page, next = strings.Join(l.interfaces[len(l.interfaces)/2:], ""), ""
			}
			fmt.Fprintf(w, `<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r</requestId><networkInterfaceSet>%s</networkInterfaceSet>%s</DescribeNetworkInterfacesResponse>`, page, next)
		case "DescribeAddresses":
			fmt.Fprintf(w, `<DescribeAddressesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r</requestId><addressesSet>%s</addressesSet></DescribeAddressesResponse>`, l.addresses)
		case "DescribeVpcEndpoints":
			fmt.Fprintf(w, `<DescribeVpcEndpointsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r</requestId><vpcEndpointSet>%s</vpcEndpointSet></DescribeVpcEndpointsResponse>`, l.endpoints)
		default:
			http.Error(w, "unexpected EC2 action "+action, http.StatusBadRequest)
		}
	default:
		http.Error(w, "unexpected service "+service, http.StatusBadRequest)
	}
}

// listing is one account's in one region, as XML items.
type listing struct {
	interfaces           []string
	addresses, endpoints string
}

func eni(id, owner, instance, private, public, ipv6 string) string {
	return fmt.Sprintf(`<item><networkInterfaceId>%s</networkInterfaceId><ownerId>%s</ownerId><interfaceType>interface</interfaceType>
<attachment><instanceId>%s</instanceId><attachTime>2026-11-20T09:00:00.000Z</attachTime><status>attached</status></attachment>
<privateIpAddress>%s</privateIpAddress><association><publicIp>%s</publicIp></association>
<privateIpAddressesSet><item><privateIpAddress>%s</privateIpAddress><primary>true</primary></item></privateIpAddressesSet>
<ipv6AddressesSet><item><ipv6Address>%s</ipv6Address></item></ipv6AddressesSet></item>`, id, owner, instance, private, public, private, ipv6)
}

func byAddr(inv *inventory.Inventory) map[string]string {
	out := map[string]string{}
	for _, a := range inv.Addresses {
		out[a.Addr.String()] = a.InstanceID + " " + a.AccountID
	}
	return out
}

func TestPollAccountsAndRegionsThroughRoles(t *testing.T) {
	s := &standIn{t: t, failing: map[string]bool{}, listings: map[string]listing{
		"222222222222/us-east-1": {
			[]string{eni("eni-1", "222222222222", "i-0aaaaaaaaaaaaaaa1", "10.0.0.5", "3.5.1.11", "2600:1f18::11"),
				eni("eni-2", "222222222222", "i-0aaaaaaaaaaaaaaa2", "10.0.0.6", "3.5.1.12", "2600:1f18::12")},
			`<item><publicIp>52.1.1.1</publicIp><allocationId>eipalloc-1</allocationId><associationId>eipassoc-1</associationId><domain>vpc</domain><instanceId>i-0aaaaaaaaaaaaaaa1</instanceId><networkInterfaceId>eni-1</networkInterfaceId><networkInterfaceOwnerId>222222222222</networkInterfaceOwnerId><privateIpAddress>10.0.0.5</privateIpAddress></item>`,
			`<item><vpcEndpointId>vpce-0222</vpcEndpointId><ownerId>222222222222</ownerId><serviceName>com.amazonaws.us-east-1.s3</serviceName></item>`,
		},
		"333333333333/eu-west-1": {interfaces: []string{eni("eni-3", "333333333333", "i-0bbbbbbbbbbbbbbb3", "10.1.0.7", "34.1.1.7", "2a05:d018::7")}},
	}}
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := &Poller{
		Regions:  []string{"us-east-1", "eu-west-1"},
		RoleARNs: []string{"arn:aws:iam::222222222222:role/inventory", "arn:aws:iam::333333333333:role/inventory"},
		Interval: time.Minute,
		AWS: aws.Config{Region: "us-east-1", Credentials: credentials.NewStaticCredentialsProvider(ownKey, "secret", ""),
			RetryMaxAttempts: 1},
		EC2Endpoint: srv.URL, STSEndpoint: srv.URL,
	}
	inv, err := p.Poll(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	got := byAddr(inv)
	for addr, want := range map[string]string{
		"10.0.0.5": "i-0aaaaaaaaaaaaaaa1 222222222222", "3.5.1.11": "i-0aaaaaaaaaaaaaaa1 222222222222", "2600:1f18::11": "i-0aaaaaaaaaaaaaaa1 222222222222",
		"52.1.1.1": "i-0aaaaaaaaaaaaaaa1 222222222222", "3.5.1.12": "i-0aaaaaaaaaaaaaaa2 222222222222", // the second page
		"34.1.1.7": "i-0bbbbbbbbbbbbbbb3 333333333333",
	} {
		if got[addr] != want {
			t.Errorf("%s: got %q, want %q (all: %v)", addr, got[addr], want, got)
		}
	}
	if len(inv.Endpoints) != 1 || inv.Endpoints[0] != (inventory.Endpoint{ID: "vpce-0222", OwnerID: "222222222222"}) {
		t.Errorf("endpoints %+v", inv.Endpoints)
	}
	if len(inv.ElasticIPs) != 1 || inv.ElasticIPs[0].AllocationID != "eipalloc-1" {
		t.Errorf("elastic IPs %+v", inv.ElasticIPs)
	}
	calls := strings.Join(s.calls, "\n")
	for _, want := range []string{"AssumeRole 222222222222", "AssumeRole 333333333333", "DescribeVpcEndpoints 333333333333/eu-west-1",
		"DescribeAddresses 222222222222/us-east-1", "DescribeNetworkInterfaces 333333333333/us-east-1"} {
		if !strings.Contains(calls, want) {
			t.Errorf("no %q in calls:\n%s", want, calls)
		}
	}
	if n := strings.Count(calls, "AssumeRole"); n != 2 {
		t.Errorf("%d AssumeRole calls, want one per role", n)
	}

	// The next round: one account and region fails and keeps its last listing, the
	// other changed and is replaced; roles are not assumed again.
	s.mu.Lock()
	s.failing["333333333333/eu-west-1"] = true
	s.listings["222222222222/us-east-1"] = listing{interfaces: []string{eni("eni-9", "222222222222", "i-0aaaaaaaaaaaaaaa9", "10.0.0.9", "3.5.1.19", "2600:1f18::19")}}
	s.calls = nil
	s.mu.Unlock()
	inv, err = p.Poll(context.Background())
	if err == nil || !strings.Contains(err.Error(), "arn:aws:iam::333333333333:role/inventory in eu-west-1") || !strings.Contains(err.Error(), "UnauthorizedOperation") {
		t.Fatalf("error %v", err)
	}
	got = byAddr(inv)
	if got["34.1.1.7"] != "i-0bbbbbbbbbbbbbbb3 333333333333" || got["3.5.1.19"] == "" || got["3.5.1.11"] != "" || len(inv.Endpoints) != 0 {
		t.Fatalf("second round: %v endpoints %v", got, inv.Endpoints)
	}
	if strings.Contains(strings.Join(s.calls, "\n"), "AssumeRole") {
		t.Errorf("roles assumed again: %v", s.calls)
	}
}

// TestRunPublishesEachRound checks Run's first round and that it stops with ctx.
func TestRunPublishesEachRound(t *testing.T) {
	s := &standIn{t: t, failing: map[string]bool{}, listings: map[string]listing{
		"111111111111/us-east-1": {interfaces: []string{eni("eni-1", "111111111111", "i-0ccccccccccccccc1", "10.2.0.5", "3.5.2.11", "2600:1f18::21")}},
	}}
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := &Poller{Regions: []string{"us-east-1"}, Interval: time.Hour, EC2Endpoint: srv.URL,
		AWS: aws.Config{Region: "us-east-1", Credentials: credentials.NewStaticCredentialsProvider(ownKey, "secret", "")}}
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan *inventory.Inventory, 1)
	done := make(chan struct{})
	go func() {
		p.Run(ctx, func(inv *inventory.Inventory) { got <- inv })
		close(done)
	}()
	select {
	case inv := <-got:
		if byAddr(inv)["3.5.2.11"] != "i-0ccccccccccccccc1 111111111111" {
			t.Fatalf("own account: %v", byAddr(inv))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no round published")
	}
	cancel()
	<-done
}
