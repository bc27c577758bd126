// Package inventory knows where an account's instances, VPC endpoints and Lambda
// functions are, from what the EC2 and Lambda APIs say about them: the JSON that
// `aws ec2 describe-network-interfaces`, `describe-addresses`, `describe-vpc-endpoints`
// and `aws lambda list-functions` print. The detector uses it before any guess, because
// an address taken from the API is evidence and the first address a key was used from is
// not.
package inventory

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"
)

// Address is an address an instance had.
type Address struct {
	Addr       netip.Addr
	InstanceID string
	AccountID  string // the network interface's owner; private addresses only match it
	// Since is when the address was seen on the instance (the interface's attach time);
	// zero when the API did not say.
	Since time.Time
	// From names what said so: "describe-network-interfaces eni-…" or "describe-addresses eipalloc-…".
	From string
}

// Egress is an address that all of an account's instances behind it may call from: a NAT
// gateway's.
type Egress struct {
	Addr      netip.Addr
	AccountID string
	From      string
}

// ElasticIP ties an allocation id (what AssociateAddress in a VPC names) to its address,
// and an association id (what DisassociateAddress names) to the same address.
type ElasticIP struct {
	AllocationID  string
	AssociationID string
	PublicIP      netip.Addr
}

// Endpoint is a VPC endpoint and the account that owns it.
type Endpoint struct{ ID, OwnerID string }

// Function is a Lambda function and its execution role; its credentials' role session
// name is the function's name.
type Function struct{ Name, AccountID, RoleARN string }

// Inventory is what one or more inventory files said.
type Inventory struct {
	Addresses  []Address
	Egress     []Egress
	ElasticIPs []ElasticIP
	Endpoints  []Endpoint
	Functions  []Function
	// Interfaces maps a network interface id to the instance it is attached to.
	Interfaces map[string]string
}

// Merge adds what o knows.
func (inv *Inventory) Merge(o *Inventory) {
	inv.Addresses = append(inv.Addresses, o.Addresses...)
	inv.Egress = append(inv.Egress, o.Egress...)
	inv.ElasticIPs = append(inv.ElasticIPs, o.ElasticIPs...)
	inv.Endpoints = append(inv.Endpoints, o.Endpoints...)
	inv.Functions = append(inv.Functions, o.Functions...)
	for k, v := range o.Interfaces {
		if inv.Interfaces == nil {
			inv.Interfaces = map[string]string{}
		}
		inv.Interfaces[k] = v
	}
}

// Load reads and merges inventory files.
func Load(paths ...string) (*Inventory, error) {
	inv := &Inventory{}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("read inventory: %w", err)
		}
		one, err := Parse(data)
		if err != nil {
			return nil, fmt.Errorf("inventory %s: %w", p, err)
		}
		inv.Merge(one)
	}
	return inv, nil
}

// The AWS CLI's output, with only the fields used. The CLI prints the API's names.
type (
	cliInterface struct {
		NetworkInterfaceID string `json:"NetworkInterfaceId"`
		OwnerID            string `json:"OwnerId"`
		InterfaceType      string `json:"InterfaceType"`
		Attachment         *struct {
			InstanceID string `json:"InstanceId"`
			AttachTime string `json:"AttachTime"`
		} `json:"Attachment"`
		PrivateIPAddress   string           `json:"PrivateIpAddress"`
		Association        *cliAssociation  `json:"Association"`
		PrivateIPAddresses []cliPrivateAddr `json:"PrivateIpAddresses"`
		IPv6Addresses      []struct {
			IPv6Address string `json:"Ipv6Address"`
		} `json:"Ipv6Addresses"`
	}
	cliAssociation struct {
		PublicIP      string `json:"PublicIp"`
		AllocationID  string `json:"AllocationId"`
		AssociationID string `json:"AssociationId"`
	}
	cliPrivateAddr struct {
		PrivateIPAddress string          `json:"PrivateIpAddress"`
		Association      *cliAssociation `json:"Association"`
	}
	cliAddress struct {
		PublicIP                string `json:"PublicIp"`
		AllocationID            string `json:"AllocationId"`
		AssociationID           string `json:"AssociationId"`
		InstanceID              string `json:"InstanceId"`
		NetworkInterfaceID      string `json:"NetworkInterfaceId"`
		NetworkInterfaceOwnerID string `json:"NetworkInterfaceOwnerId"`
		PrivateIPAddress        string `json:"PrivateIpAddress"`
	}
	cliEndpoint struct {
		VPCEndpointID string `json:"VpcEndpointId"`
		OwnerID       string `json:"OwnerId"`
	}
	cliFunction struct {
		FunctionName string `json:"FunctionName"`
		FunctionARN  string `json:"FunctionArn"`
		Role         string `json:"Role"`
	}
	cliOutput struct {
		NetworkInterfaces *[]cliInterface `json:"NetworkInterfaces"`
		Addresses         *[]cliAddress   `json:"Addresses"`
		VPCEndpoints      *[]cliEndpoint  `json:"VpcEndpoints"`
		Functions         *[]cliFunction  `json:"Functions"`
	}
)

// Parse reads one file: the output of any of the four commands (or an object that
// holds several of their top-level keys). A bad address or time is an error that names
// the list, the index and the field.
func Parse(data []byte) (*Inventory, error) {
	var out cliOutput
	if err := json.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("not JSON output of the AWS CLI: %w", err)
	}
	if out.NetworkInterfaces == nil && out.Addresses == nil && out.VPCEndpoints == nil && out.Functions == nil {
		return nil, errors.New("no NetworkInterfaces, Addresses, VpcEndpoints or Functions: not the output of aws ec2 describe-network-interfaces, describe-addresses, describe-vpc-endpoints or aws lambda list-functions")
	}
	inv := &Inventory{Interfaces: map[string]string{}}
	if out.NetworkInterfaces != nil {
		for i, ni := range *out.NetworkInterfaces {
			if err := inv.addInterface(ni); err != nil {
				return nil, fmt.Errorf("NetworkInterfaces[%d]: %w", i, err)
			}
		}
	}
	if out.Addresses != nil {
		for i, a := range *out.Addresses {
			if err := inv.addAddress(a); err != nil {
				return nil, fmt.Errorf("Addresses[%d]: %w", i, err) //nolint:staticcheck // names the JSON key
			}
		}
	}
	if out.VPCEndpoints != nil {
		for i, ep := range *out.VPCEndpoints {
			if ep.VPCEndpointID == "" || ep.OwnerID == "" {
				return nil, fmt.Errorf("VpcEndpoints[%d]: VpcEndpointId and OwnerId are required", i)
			}
			inv.Endpoints = append(inv.Endpoints, Endpoint{ID: ep.VPCEndpointID, OwnerID: ep.OwnerID})
		}
	}
	if out.Functions != nil {
		for i, f := range *out.Functions {
			account, name := functionARN(f.FunctionARN)
			if name == "" {
				name = f.FunctionName
			}
			if name == "" || f.Role == "" {
				return nil, fmt.Errorf("Functions[%d]: FunctionName and Role are required", i) //nolint:staticcheck // names the JSON key
			}
			inv.Functions = append(inv.Functions, Function{Name: name, AccountID: account, RoleARN: f.Role})
		}
	}
	return inv, nil
}

func (inv *Inventory) addInterface(ni cliInterface) error {
	if ni.NetworkInterfaceID == "" {
		return errors.New("NetworkInterfaceId is required")
	}
	from := "describe-network-interfaces " + ni.NetworkInterfaceID
	var addrs []netip.Addr
	seen, seenAlloc := map[netip.Addr]bool{}, map[string]bool{}
	add := func(field, s string) error {
		if s == "" {
			return nil
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("%s: %w", field, err)
		}
		if a = a.Unmap(); !seen[a] {
			seen[a] = true
			addrs = append(addrs, a)
		}
		return nil
	}
	assoc := func(field string, as *cliAssociation) error {
		if as == nil {
			return nil
		}
		if err := add(field+".PublicIp", as.PublicIP); err != nil {
			return err
		}
		if as.AllocationID != "" && as.PublicIP != "" && !seenAlloc[as.AllocationID] {
			seenAlloc[as.AllocationID] = true
			ip, _ := netip.ParseAddr(as.PublicIP)
			inv.ElasticIPs = append(inv.ElasticIPs, ElasticIP{AllocationID: as.AllocationID, AssociationID: as.AssociationID, PublicIP: ip.Unmap()})
		}
		return nil
	}
	if err := add("PrivateIpAddress", ni.PrivateIPAddress); err != nil {
		return err
	}
	if err := assoc("Association", ni.Association); err != nil {
		return err
	}
	for j, p := range ni.PrivateIPAddresses {
		if err := add(fmt.Sprintf("PrivateIpAddresses[%d].PrivateIpAddress", j), p.PrivateIPAddress); err != nil {
			return err
		}
		if err := assoc(fmt.Sprintf("PrivateIpAddresses[%d].Association", j), p.Association); err != nil {
			return err
		}
	}
	for j, p := range ni.IPv6Addresses {
		if err := add(fmt.Sprintf("Ipv6Addresses[%d].Ipv6Address", j), p.IPv6Address); err != nil {
			return err
		}
	}
	if ni.Attachment == nil || ni.Attachment.InstanceID == "" {
		// Not an instance's. A NAT gateway's public address is the egress of every
		// instance routed through it.
		if ni.InterfaceType == "nat_gateway" {
			for _, a := range addrs {
				if a.IsGlobalUnicast() && !a.IsPrivate() {
					inv.Egress = append(inv.Egress, Egress{Addr: a, AccountID: ni.OwnerID, From: from})
				}
			}
		}
		return nil
	}
	var since time.Time
	if s := ni.Attachment.AttachTime; s != "" {
		t, err := time.Parse(time.RFC3339, s)
		if err != nil {
			return fmt.Errorf("Attachment.AttachTime: %w", err)
		}
		since = t
	}
	inv.Interfaces[ni.NetworkInterfaceID] = ni.Attachment.InstanceID
	for _, a := range addrs {
		inv.Addresses = append(inv.Addresses, Address{Addr: a, InstanceID: ni.Attachment.InstanceID, AccountID: ni.OwnerID, Since: since, From: from})
	}
	return nil
}

func (inv *Inventory) addAddress(a cliAddress) error {
	ip, err := netip.ParseAddr(a.PublicIP)
	if err != nil {
		return fmt.Errorf("PublicIp: %w", err)
	}
	ip = ip.Unmap()
	if a.AllocationID != "" {
		inv.ElasticIPs = append(inv.ElasticIPs, ElasticIP{AllocationID: a.AllocationID, AssociationID: a.AssociationID, PublicIP: ip})
	}
	if a.InstanceID == "" {
		return nil
	}
	from := "describe-addresses " + a.PublicIP
	if a.AllocationID != "" {
		from = "describe-addresses " + a.AllocationID
	}
	inv.Addresses = append(inv.Addresses, Address{Addr: ip, InstanceID: a.InstanceID, AccountID: a.NetworkInterfaceOwnerID, From: from})
	if a.PrivateIPAddress != "" {
		p, err := netip.ParseAddr(a.PrivateIPAddress)
		if err != nil {
			return fmt.Errorf("PrivateIpAddress: %w", err)
		}
		inv.Addresses = append(inv.Addresses, Address{Addr: p.Unmap(), InstanceID: a.InstanceID, AccountID: a.NetworkInterfaceOwnerID, From: from})
	}
	if a.NetworkInterfaceID != "" {
		inv.Interfaces[a.NetworkInterfaceID] = a.InstanceID
	}
	return nil
}

// functionARN splits arn:aws:lambda:REGION:ACCOUNT:function:NAME.
func functionARN(arn string) (account, name string) {
	parts := strings.Split(arn, ":")
	if len(parts) >= 7 && parts[0] == "arn" && parts[5] == "function" {
		return parts[4], parts[6]
	}
	return "", ""
}
