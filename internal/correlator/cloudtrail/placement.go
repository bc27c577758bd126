package cloudtrail

import (
	"encoding/json"
	"strings"
)

// The events in this file tell where instances and functions are: elastic IPs
// (allocated, associated by allocation id, disassociated, released), VPC endpoints
// and Lambda functions with their execution roles. Each parser returns ok=false for a
// record that is not its event, failed, or lacks what it needs.

// ElasticIP is what AllocateAddress, AssociateAddress, DisassociateAddress and
// ReleaseAddress say about an elastic IP. Which fields are set depends on the event:
// AllocateAddress gives PublicIP and AllocationID; AssociateAddress (in a VPC) gives
// AllocationID, the instance or network interface and the AssociationID from its
// response; the other two name the address by allocation id, association id or
// public IP (EC2-Classic).
type ElasticIP struct {
	Event              string // the event name
	PublicIP           string
	AllocationID       string
	AssociationID      string
	InstanceID         string
	NetworkInterfaceID string
}

// ParseElasticIP decodes an ec2 AllocateAddress, AssociateAddress,
// DisassociateAddress or ReleaseAddress record.
func ParseElasticIP(r *Record) (ElasticIP, bool) {
	if r.EventSource != "ec2.amazonaws.com" || r.ErrorCode != "" {
		return ElasticIP{}, false
	}
	switch r.EventName {
	case "AllocateAddress", "AssociateAddress", "DisassociateAddress", "ReleaseAddress":
	default:
		return ElasticIP{}, false
	}
	var req struct {
		PublicIP           string `json:"publicIp"`
		AllocationID       string `json:"allocationId"`
		AssociationID      string `json:"associationId"`
		InstanceID         string `json:"instanceId"`
		NetworkInterfaceID string `json:"networkInterfaceId"`
	}
	var resp struct {
		PublicIP      string `json:"publicIp"`
		AllocationID  string `json:"allocationId"`
		AssociationID string `json:"associationId"`
	}
	if len(r.RequestParameters) > 0 && json.Unmarshal(r.RequestParameters, &req) != nil {
		return ElasticIP{}, false
	}
	if len(r.ResponseElements) > 0 && json.Unmarshal(r.ResponseElements, &resp) != nil {
		return ElasticIP{}, false
	}
	e := ElasticIP{Event: r.EventName, PublicIP: first(req.PublicIP, resp.PublicIP), AllocationID: first(req.AllocationID, resp.AllocationID),
		AssociationID: first(req.AssociationID, resp.AssociationID), InstanceID: req.InstanceID, NetworkInterfaceID: req.NetworkInterfaceID}
	if e.PublicIP == "" && e.AllocationID == "" && e.AssociationID == "" {
		return ElasticIP{}, false
	}
	return e, true
}

func first(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// VPCEndpoint is an endpoint made by CreateVpcEndpoint and the account that owns it.
type VPCEndpoint struct {
	ID, OwnerID string
}

// ParseVPCEndpoint decodes an ec2 CreateVpcEndpoint record. The response is wrapped in
// CreateVpcEndpointResponse in the records AWS delivers; a bare one is accepted too. The
// owner is the response's ownerId, else the account the record was delivered to.
func ParseVPCEndpoint(r *Record) (VPCEndpoint, bool) {
	if r.EventSource != "ec2.amazonaws.com" || r.EventName != "CreateVpcEndpoint" || r.ErrorCode != "" {
		return VPCEndpoint{}, false
	}
	type endpoint struct {
		ID      string `json:"vpcEndpointId"`
		OwnerID string `json:"ownerId"`
	}
	var resp struct {
		Wrapped struct {
			Endpoint endpoint `json:"vpcEndpoint"`
		} `json:"CreateVpcEndpointResponse"`
		Endpoint endpoint `json:"vpcEndpoint"`
	}
	if json.Unmarshal(r.ResponseElements, &resp) != nil {
		return VPCEndpoint{}, false
	}
	ep := resp.Wrapped.Endpoint
	if ep.ID == "" {
		ep = resp.Endpoint
	}
	if ep.ID == "" {
		return VPCEndpoint{}, false
	}
	if ep.OwnerID == "" {
		ep.OwnerID = first(r.RecipientAccountID, r.UserIdentity.AccountID)
	}
	return VPCEndpoint(ep), ep.OwnerID != ""
}

// Function is a Lambda function and the execution role its credentials are issued to.
type Function struct {
	Name      string
	AccountID string
	RoleARN   string
}

// ParseFunction decodes a lambda CreateFunction or UpdateFunctionConfiguration record
// (CloudTrail names them with an API version suffix: CreateFunction20150331,
// UpdateFunctionConfiguration20150331v2). ok is false when the record names no role.
func ParseFunction(r *Record) (Function, bool) {
	if r.EventSource != "lambda.amazonaws.com" || r.ErrorCode != "" ||
		!strings.HasPrefix(r.EventName, "CreateFunction") && !strings.HasPrefix(r.EventName, "UpdateFunctionConfiguration") {
		return Function{}, false
	}
	var req, resp struct {
		FunctionName string `json:"functionName"`
		FunctionARN  string `json:"functionArn"`
		Role         string `json:"role"`
	}
	if len(r.RequestParameters) > 0 && json.Unmarshal(r.RequestParameters, &req) != nil {
		return Function{}, false
	}
	if len(r.ResponseElements) > 0 && json.Unmarshal(r.ResponseElements, &resp) != nil {
		return Function{}, false
	}
	f := Function{Name: first(resp.FunctionName, req.FunctionName), RoleARN: first(resp.Role, req.Role)}
	f.AccountID, f.Name = functionAccountAndName(first(resp.FunctionARN, f.Name))
	if f.AccountID == "" {
		f.AccountID = first(r.RecipientAccountID, r.UserIdentity.AccountID)
	}
	return f, f.Name != "" && f.RoleARN != ""
}

// functionAccountAndName takes a function name, or its ARN
// (arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]), and returns its account
// ("" for a bare name) and bare name. The name is the role session name of the
// function's credentials.
func functionAccountAndName(s string) (account, name string) {
	parts := strings.Split(s, ":")
	if len(parts) >= 7 && parts[0] == "arn" && parts[5] == "function" {
		return parts[4], parts[6]
	}
	return "", s
}
