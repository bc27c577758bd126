package detector

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"time"

	"github.com/imdsguard/imdsguard/internal/wire"
)

// Finding types. The first, second and fourth are GuardDuty's names; OtherInstance is
// ours: the same account, an address of another instance.
const (
	TypeOutsideAWS         = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OutsideAWS"
	TypeInsideAWS          = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.InsideAWS"
	TypeOtherInstance      = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OtherInstance"
	TypeResourceOutsideAWS = "UnauthorizedAccess:IAMUser/ResourceCredentialExfiltration.OutsideAWS"
)

// Severities.
const (
	High   = "High"
	Medium = "Medium"
	Low    = "Low"
)

// Finding is one (access key, source, type, window): the JSON-lines schema is stable and
// documented in docs/findings.md (a test checks it).
type Finding struct {
	ID              string `json:"id"`
	Type            string `json:"type"`
	Severity        string `json:"severity"`
	AccessKeyID     string `json:"access_key_id"`
	SourceIP        string `json:"source_ip"`
	SourceAccountID string `json:"source_account_id,omitempty"`
	VPCEndpointID   string `json:"vpc_endpoint_id,omitempty"`
	InstanceID      string `json:"instance_id,omitempty"`
	FunctionName    string `json:"function_name,omitempty"`
	AccountID       string `json:"account_id"`
	Role            string `json:"role"`
	Region          string `json:"region,omitempty"`
	// IMDSVersion is "v1" or "v2" when known (fingerprint or ec2RoleDelivery).
	IMDSVersion string `json:"imds_version,omitempty"`
	// Processes that fetched the key on the host, from fingerprints.
	Processes []wire.Process `json:"processes,omitempty"`
	// Endpoint is where the host's process fetched the key, from its fingerprint:
	// "imds" (the instance role), "ecs" (a task role), "pod_identity" (a pod's role).
	Endpoint string `json:"endpoint,omitempty"`
	// CredentialSource says how the key was tied to its instance or function:
	// "fingerprint", "AssumeRole" or "userIdentity".
	CredentialSource string `json:"credential_source"`
	// PlacedBy says which evidence placed the instance at its addresses, strongest
	// first: "fingerprint", "inventory", "trail" (an address event in the trail),
	// "guess" (the first AWS address its key was used from), "none". For an
	// OtherInstance finding it is the evidence that the source is the other
	// instance's. Empty for Lambda findings.
	PlacedBy     string    `json:"placed_by,omitempty"`
	WindowStart  time.Time `json:"window_start"`
	FirstSeen    time.Time `json:"first_seen"`
	LastSeen     time.Time `json:"last_seen"`
	Count        int64     `json:"count"`
	Errors       int64     `json:"errors"`
	APICalls     []Call    `json:"api_calls"`
	Suppressed   bool      `json:"suppressed"`
	SuppressedBy string    `json:"suppressed_by,omitempty"`
	Reason       string    `json:"reason"`
}

// Call is one API, how often it was called and how often it failed.
type Call struct {
	Service string `json:"service"`
	Name    string `json:"name"`
	Count   int64  `json:"count"`
	Errors  int64  `json:"errors"`
}

// ShortType is the type without the GuardDuty prefix ("InstanceCredentialExfiltration.OutsideAWS").
func ShortType(t string) string {
	if i := strings.LastIndexByte(t, '/'); i >= 0 {
		return t[i+1:]
	}
	return t
}

func findingID(key, source, typ string, window time.Time) string {
	h := sha256.Sum256([]byte(key + "|" + source + "|" + typ + "|" + window.UTC().Format(time.RFC3339)))
	return hex.EncodeToString(h[:16])
}
