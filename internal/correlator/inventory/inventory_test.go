package inventory

import (
	"net/netip"
	"strings"
	"testing"
)

func TestLoadAllFour(t *testing.T) {
	inv, err := Load("testdata/network-interfaces.json", "testdata/addresses.json", "testdata/vpc-endpoints.json", "testdata/functions.json")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, a := range inv.Addresses {
		got[a.Addr.String()] = a.InstanceID + " " + a.AccountID
	}
	want := map[string]string{
		"10.0.1.11": "i-0a1a1a1a1a1a1a1a1 111111111111", "10.0.1.12": "i-0a1a1a1a1a1a1a1a1 111111111111",
		"3.5.1.11": "i-0a1a1a1a1a1a1a1a1 111111111111", "2600:1f18:aaaa:bbbb::11": "i-0a1a1a1a1a1a1a1a1 111111111111",
		"3.5.2.22": "i-0a2a2a2a2a2a2a2a2 111111111111", "10.0.2.22": "i-0a2a2a2a2a2a2a2a2 111111111111",
	}
	if len(got) != len(want) {
		t.Fatalf("addresses %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %q, want %q", k, got[k], v)
		}
	}
	if inv.Addresses[0].Since.IsZero() || inv.Addresses[0].From != "describe-network-interfaces eni-0a1a1a1a1a1a1a1a1" {
		t.Fatalf("first address: %+v", inv.Addresses[0])
	}
	if len(inv.Egress) != 1 || inv.Egress[0].Addr != netip.MustParseAddr("3.225.16.109") || inv.Egress[0].AccountID != "111111111111" {
		t.Fatalf("NAT gateway egress: %+v", inv.Egress)
	}
	allocs := map[string]string{}
	for _, e := range inv.ElasticIPs {
		allocs[e.AllocationID] = e.PublicIP.String()
	}
	if allocs["eipalloc-0a9a9a9a9a9a9a9a9"] != "3.5.9.99" || allocs["eipalloc-0a2a2a2a2a2a2a2a2"] != "3.5.2.22" || allocs["eipalloc-0feedfeedfeedfeed"] != "3.225.16.109" {
		t.Fatalf("elastic IPs: %v", allocs)
	}
	if len(inv.Endpoints) != 1 || inv.Endpoints[0] != (Endpoint{ID: "vpce-0aaa", OwnerID: "111111111111"}) {
		t.Fatalf("endpoints: %+v", inv.Endpoints)
	}
	if len(inv.Functions) != 1 || inv.Functions[0] != (Function{Name: "billing-fn", AccountID: "111111111111", RoleARN: "arn:aws:iam::111111111111:role/billing-role"}) {
		t.Fatalf("functions: %+v", inv.Functions)
	}
	if inv.Interfaces["eni-0a2a2a2a2a2a2a2a2"] != "i-0a2a2a2a2a2a2a2a2" || inv.Interfaces["eni-0a1a1a1a1a1a1a1a1"] != "i-0a1a1a1a1a1a1a1a1" {
		t.Fatalf("interfaces: %v", inv.Interfaces)
	}
}

func TestBadInput(t *testing.T) {
	cases := map[string]string{
		`{"Reservations":[]}`: "not the output of aws ec2 describe-network-interfaces",
		`[1,2]`:               "not JSON output",
		`{"NetworkInterfaces":[{"NetworkInterfaceId":"eni-1","PrivateIpAddress":"10.0.0.300"}]}`:                            "NetworkInterfaces[0]: PrivateIpAddress",
		`{"NetworkInterfaces":[{"NetworkInterfaceId":"eni-1","Ipv6Addresses":[{"Ipv6Address":"zz"}]}]}`:                     "NetworkInterfaces[0]: Ipv6Addresses[0].Ipv6Address",
		`{"NetworkInterfaces":[{"NetworkInterfaceId":"eni-1","Attachment":{"InstanceId":"i-1","AttachTime":"yesterday"}}]}`: "Attachment.AttachTime",
		`{"Addresses":[{"PublicIp":""}]}`:               "Addresses[0]: PublicIp",
		`{"VpcEndpoints":[{"VpcEndpointId":"vpce-1"}]}`: "VpcEndpoints[0]: VpcEndpointId and OwnerId are required",
		`{"Functions":[{"FunctionName":"f"}]}`:          "Functions[0]: FunctionName and Role are required",
	}
	for in, want := range cases {
		_, err := Parse([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want one containing %q", in, err, want)
		}
	}
	if _, err := Load("testdata/missing.json"); err == nil {
		t.Fatal("missing file loaded")
	}
}
