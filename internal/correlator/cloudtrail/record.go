// Package cloudtrail reads CloudTrail records, streaming, from the formats they come in:
// log files as AWS delivers them to S3 (gzip JSON {"Records":[...]}), plain JSON, a JSON
// array, and JSON lines (CloudTrail Lake and EventBridge exports, one record or one
// EventBridge event per line). Bad records are counted and skipped with their position;
// a truncated file is reported; nothing aborts the run.
package cloudtrail

import (
	"encoding/json"
	"strings"
	"time"
)

// Record is the part of a CloudTrail record the correlator uses. The request parameters
// and response elements are kept raw and decoded only for the few events that matter.
type Record struct {
	EventVersion         string          `json:"eventVersion"`
	UserIdentity         UserIdentity    `json:"userIdentity"`
	EventTime            string          `json:"eventTime"`
	EventSource          string          `json:"eventSource"`
	EventName            string          `json:"eventName"`
	AWSRegion            string          `json:"awsRegion"`
	SourceIPAddress      string          `json:"sourceIPAddress"`
	UserAgent            string          `json:"userAgent"`
	ErrorCode            string          `json:"errorCode"`
	RequestParameters    json.RawMessage `json:"requestParameters"`
	ResponseElements     json.RawMessage `json:"responseElements"`
	EventID              string          `json:"eventID"`
	RecipientAccountID   string          `json:"recipientAccountId"`
	VPCEndpointID        string          `json:"vpcEndpointId"`
	VPCEndpointAccountID string          `json:"vpcEndpointAccountId"`
	// Timestamp is what log pipelines (Logstash, Elastic) put in place of eventTime;
	// the reader uses it only when eventTime is absent.
	Timestamp string `json:"@timestamp"`

	// Time is EventTime (or Timestamp) parsed; set by the reader.
	Time time.Time `json:"-"`
}

// UserIdentity is who made the call.
type UserIdentity struct {
	Type           string         `json:"type"`
	PrincipalID    string         `json:"principalId"`
	ARN            string         `json:"arn"`
	AccountID      string         `json:"accountId"`
	AccessKeyID    string         `json:"accessKeyId"`
	InvokedBy      string         `json:"invokedBy"`
	SessionContext SessionContext `json:"sessionContext"`
}

// SessionContext describes the role session behind temporary credentials.
type SessionContext struct {
	SessionIssuer struct {
		Type      string `json:"type"`
		ARN       string `json:"arn"`
		AccountID string `json:"accountId"`
		UserName  string `json:"userName"`
	} `json:"sessionIssuer"`
	// EC2RoleDelivery is set for credentials an instance got from IMDS: "1.0" when they
	// were fetched with IMDSv1, "2.0" with IMDSv2.
	EC2RoleDelivery string `json:"ec2RoleDelivery"`
}

// SessionName is the role session name of an assumed-role identity
// (arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION), "" otherwise.
func (u *UserIdentity) SessionName() string {
	_, rest, ok := strings.Cut(u.ARN, ":assumed-role/")
	if !ok {
		return ""
	}
	_, session, ok := strings.Cut(rest, "/")
	if !ok {
		return ""
	}
	return session
}

// RoleName is the role of an assumed-role identity, from the session issuer or the ARN.
func (u *UserIdentity) RoleName() string {
	if u.SessionContext.SessionIssuer.UserName != "" {
		return u.SessionContext.SessionIssuer.UserName
	}
	_, rest, ok := strings.Cut(u.ARN, ":assumed-role/")
	if !ok {
		return ""
	}
	role, _, _ := strings.Cut(rest, "/")
	return role
}

// IsServicePrincipal reports whether a sourceIPAddress names an AWS service rather than
// an address ("ec2.amazonaws.com", "AWS Internal").
func IsServicePrincipal(source string) bool {
	return strings.HasSuffix(source, ".amazonaws.com") || source == "AWS Internal"
}

// AssumeRole is what the correlator takes from an AssumeRole record.
type AssumeRole struct {
	RoleARN         string
	RoleSessionName string
	AccessKeyID     string
	Expiration      time.Time
}

// ParseAssumeRole decodes the parameters of an sts AssumeRole record; ok is false when
// the record is not one or carries no credentials.
func ParseAssumeRole(r *Record) (AssumeRole, bool) {
	if r.EventName != "AssumeRole" || r.EventSource != "sts.amazonaws.com" {
		return AssumeRole{}, false
	}
	var req struct {
		RoleARN         string `json:"roleArn"`
		RoleSessionName string `json:"roleSessionName"`
	}
	var resp struct {
		Credentials struct {
			AccessKeyID string `json:"accessKeyId"`
			Expiration  string `json:"expiration"`
		} `json:"credentials"`
	}
	if json.Unmarshal(r.RequestParameters, &req) != nil || json.Unmarshal(r.ResponseElements, &resp) != nil {
		return AssumeRole{}, false
	}
	if resp.Credentials.AccessKeyID == "" {
		return AssumeRole{}, false
	}
	a := AssumeRole{RoleARN: req.RoleARN, RoleSessionName: req.RoleSessionName, AccessKeyID: resp.Credentials.AccessKeyID}
	a.Expiration = parseExpiration(resp.Credentials.Expiration)
	return a, true
}

// parseExpiration accepts the forms CloudTrail uses: RFC 3339 and "Jan 2, 2006, 3:04:05 PM".
func parseExpiration(s string) time.Time {
	for _, layout := range []string{time.RFC3339, "Jan 2, 2006, 3:04:05 PM", "Jan 2, 2006 3:04:05 PM"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t
		}
	}
	return time.Time{}
}

// AddressChange is an address given to an instance by AssociateAddress (an elastic IP)
// or AttachNetworkInterface.
type AddressChange struct {
	InstanceID         string
	PublicIP           string
	NetworkInterfaceID string
	PrivateIPs         []string
}

// ParseAddressChange decodes an ec2 AssociateAddress or AttachNetworkInterface record.
func ParseAddressChange(r *Record) (AddressChange, bool) {
	if r.EventSource != "ec2.amazonaws.com" || r.ErrorCode != "" {
		return AddressChange{}, false
	}
	switch r.EventName {
	case "AssociateAddress", "AttachNetworkInterface":
	default:
		return AddressChange{}, false
	}
	var req struct {
		InstanceID         string `json:"instanceId"`
		PublicIP           string `json:"publicIp"`
		NetworkInterfaceID string `json:"networkInterfaceId"`
		PrivateIPAddress   string `json:"privateIpAddress"`
	}
	if json.Unmarshal(r.RequestParameters, &req) != nil || req.InstanceID == "" {
		return AddressChange{}, false
	}
	c := AddressChange{InstanceID: req.InstanceID, PublicIP: req.PublicIP, NetworkInterfaceID: req.NetworkInterfaceID}
	if req.PrivateIPAddress != "" {
		c.PrivateIPs = append(c.PrivateIPs, req.PrivateIPAddress)
	}
	return c, true
}

// IsInstanceID reports whether s looks like an EC2 instance id (i-0123456789abcdef0).
func IsInstanceID(s string) bool {
	if len(s) != 10 && len(s) != 19 || !strings.HasPrefix(s, "i-") {
		return false
	}
	for _, c := range s[2:] {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// NetworkInterface is the addresses of a network interface created by
// CreateNetworkInterface, for AttachNetworkInterface records that name only its id.
type NetworkInterface struct {
	ID        string
	Addresses []string
}

// ParseNetworkInterface decodes an ec2 CreateNetworkInterface record's response.
func ParseNetworkInterface(r *Record) (NetworkInterface, bool) {
	if r.EventSource != "ec2.amazonaws.com" || r.EventName != "CreateNetworkInterface" || r.ErrorCode != "" {
		return NetworkInterface{}, false
	}
	type item struct {
		PrivateIPAddress string `json:"privateIpAddress"`
		IPv6Address      string `json:"ipv6Address"`
	}
	var resp struct {
		NetworkInterface struct {
			ID               string `json:"networkInterfaceId"`
			PrivateIPAddress string `json:"privateIpAddress"`
			Association      struct {
				PublicIP string `json:"publicIp"`
			} `json:"association"`
			PrivateIPs struct {
				Items []item `json:"item"`
			} `json:"privateIpAddressesSet"`
			IPv6s struct {
				Items []item `json:"item"`
			} `json:"ipv6AddressesSet"`
		} `json:"networkInterface"`
	}
	if json.Unmarshal(r.ResponseElements, &resp) != nil || resp.NetworkInterface.ID == "" {
		return NetworkInterface{}, false
	}
	ni := resp.NetworkInterface
	out := NetworkInterface{ID: ni.ID}
	for _, a := range []string{ni.PrivateIPAddress, ni.Association.PublicIP} {
		if a != "" {
			out.Addresses = append(out.Addresses, a)
		}
	}
	for _, it := range append(ni.PrivateIPs.Items, ni.IPv6s.Items...) {
		for _, a := range []string{it.PrivateIPAddress, it.IPv6Address} {
			if a != "" && a != ni.PrivateIPAddress {
				out.Addresses = append(out.Addresses, a)
			}
		}
	}
	return out, true
}
