package broker

import (
	"net/netip"
	"strings"

	"github.com/imdsguard/imdsguard/internal/agent/hook"
)

// The broker serves the other endpoints that hand credentials to containers as it
// serves IMDS: the ECS agent's task credential endpoint and the EKS Pod Identity agent.
// The kernel's record of a redirected connection carries where the client connected
// (Redirect.Dst); that address says which endpoint the client wanted, and the broker
// forwards to that address and no other. Only IMDS has a token protocol, so the IMDSv2
// rules apply to IMDS alone.

// EndpointKind names a credential endpoint.
type EndpointKind string

const (
	EndpointIMDS        EndpointKind = "imds"
	EndpointECS         EndpointKind = "ecs"          // GET /v2/credentials/<id>
	EndpointPodIdentity EndpointKind = "pod_identity" // GET /v1/credentials, Authorization
)

// Endpoint is a guarded endpoint other than IMDS (whose addresses are IMDS4, IMDS6 and
// IMDSPort).
type Endpoint struct {
	Kind  EndpointKind
	Addrs []netip.Addr
	Port  int
}

// CredentialsOwner says whose ECS credentials id is: the task it was handed to ("" when
// the agent does not know), and whether the connection's process is outside that task.
// It must not block: it runs before the request is forwarded.
type CredentialsOwner func(conn hook.Redirect, id string) (task string, foreign bool)

// RefusedForeignTask is the Refused (enforce) or WouldRefuse (audit) reason of an ECS
// credential request for an id handed to another task.
const RefusedForeignTask = "foreign_task_credentials"

// endpointOf finds the endpoint the client connected to. A destination that is none of
// the other endpoints' is IMDS: the kernel redirects nothing else.
func (b *Broker) endpointOf(dst netip.AddrPort) (EndpointKind, netip.AddrPort, bool) {
	a := dst.Addr().Unmap()
	for _, e := range b.cfg.Endpoints {
		if int(dst.Port()) != e.Port {
			continue
		}
		for _, ea := range e.Addrs {
			if ea == a {
				return e.Kind, netip.AddrPortFrom(a, dst.Port()), true
			}
		}
	}
	return EndpointIMDS, netip.AddrPort{}, false
}

// ecsCredentialsID returns the credentials id an ECS request names, "" when it is no
// credential request: GET /v2/credentials/<id> (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI)
// or the older /v1/credentials?id=<id>.
func ecsCredentialsID(path, query string) string {
	segs := Segments(path)
	switch {
	case len(segs) == 3 && segs[0] == "v2" && segs[1] == "credentials":
		return segs[2]
	case len(segs) == 2 && segs[0] == "v1" && segs[1] == "credentials":
		for kv := range strings.SplitSeq(query, "&") {
			if id, ok := strings.CutPrefix(kv, "id="); ok && id != "" {
				return id
			}
		}
	}
	return ""
}

// isPodIdentityCredentialPath reports whether p is the Pod Identity agent's credential
// path (AWS_CONTAINER_CREDENTIALS_FULL_URI's http://169.254.170.23/v1/credentials).
func isPodIdentityCredentialPath(p string) bool {
	segs := Segments(p)
	return len(segs) == 2 && segs[0] == "v1" && segs[1] == "credentials"
}

// redactedPath is the path as events and logs give it: an ECS credentials id is a
// bearer secret (whoever reaches the endpoint with it gets the task's credentials), so
// every segment after "credentials" is replaced, in the canonical form of the path.
// The query, where the v1 path carries the id, is never recorded.
func redactedPath(kind EndpointKind, p string) string {
	if kind != EndpointECS {
		return p
	}
	segs := Segments(p)
	after := false
	for i, seg := range segs {
		if after {
			segs[i] = redacted
		}
		after = after || strings.EqualFold(seg, "credentials")
	}
	return "/" + strings.Join(segs, "/")
}

const redacted = "REDACTED"
