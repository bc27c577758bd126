// Package wire is the only contract between the agent and the correlator: the
// fingerprint of one credential issuance on a host (which process fetched which
// AccessKeyId from IMDS, on which instance) and the batches the agent's forwarder posts to
// the correlator's intake. Neither program links the other's code; both speak this.
package wire

import (
	"net/netip"
	"time"
)

// Fingerprint says who on a host fetched a credential from IMDS. It never carries the
// secret access key or the session token: at most a keyed hash of the token.
type Fingerprint struct {
	ID                 string    `json:"id"`
	AccessKeyID        string    `json:"access_key_id"`
	Role               string    `json:"role"`
	InstanceProfileARN string    `json:"instance_profile_arn,omitempty"`
	LastUpdated        time.Time `json:"last_updated"`
	Expiration         time.Time `json:"expiration"`
	Instance           Instance  `json:"instance"`
	// HostAddresses are every local address of the host plus its public IPv4/IPv6 from
	// metadata, when the credential was fetched.
	HostAddresses []netip.Addr `json:"host_addresses"`
	Process       Process      `json:"process"`
	// IMDSVersion is "v1" or "v2".
	IMDSVersion string `json:"imds_version"`
	// TokenHMAC is HMAC-SHA256 (hex) of the session token under a per-host secret.
	TokenHMAC string `json:"token_hmac,omitempty"`
	// Endpoint is where the credential came from: "" or "imds" (IMDS, the instance's
	// role), "ecs" (an ECS task's role), "pod_identity" (an EKS pod's role). Agents
	// before it send none: IMDS.
	Endpoint string `json:"endpoint,omitempty"`
	// RoleARN is the role's ARN when the endpoint names it (ECS does; IMDS and Pod
	// Identity do not).
	RoleARN string `json:"role_arn,omitempty"`
}

// Instance is the EC2 identity the credential was issued to.
type Instance struct {
	ID               string `json:"id"`
	AccountID        string `json:"account_id"`
	Region           string `json:"region"`
	AvailabilityZone string `json:"availability_zone"`
}

// Process is the program that fetched the credential.
type Process struct {
	PID         int    `json:"pid"`
	Exe         string `json:"exe"`
	User        string `json:"user"`
	Unit        string `json:"unit,omitempty"`
	ContainerID string `json:"container_id,omitempty"`
	// ContainerRuntime, Pod and ECSTask are present when the process ran in a container
	// whose runtime's state names it (docker, containerd, cri-o, podman).
	ContainerRuntime string   `json:"container_runtime,omitempty"`
	Pod              *Pod     `json:"pod,omitempty"`
	ECSTask          *ECSTask `json:"ecs_task,omitempty"`
}

// Pod is the Kubernetes pod of the container that fetched a credential.
type Pod struct {
	Namespace      string `json:"namespace"`
	Name           string `json:"name"`
	UID            string `json:"uid,omitempty"`
	Container      string `json:"container,omitempty"` // its name in the pod spec
	ServiceAccount string `json:"service_account,omitempty"`
}

// ECSTask is the ECS task of the container that fetched a credential.
type ECSTask struct {
	ARN       string `json:"arn"`
	Family    string `json:"family,omitempty"`
	Container string `json:"container,omitempty"` // its name in the task definition
}
