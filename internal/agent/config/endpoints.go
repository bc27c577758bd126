package config

import (
	"fmt"
	"net/netip"

	"gopkg.in/yaml.v3"

	"github.com/imdsguard/imdsguard/internal/yamlfile"
)

// EndpointKind names a credential endpoint the agent guards.
type EndpointKind string

const (
	// EndpointIMDS is the Instance Metadata Service, at the addresses of the imds keys.
	EndpointIMDS EndpointKind = "imds"
	// EndpointECS is the ECS agent's task credential endpoint
	// (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI, GET /v2/credentials/<id>).
	EndpointECS EndpointKind = "ecs"
	// EndpointPodIdentity is the EKS Pod Identity agent
	// (AWS_CONTAINER_CREDENTIALS_FULL_URI with an Authorization token).
	EndpointPodIdentity EndpointKind = "pod_identity"
)

// defaultEndpointAddrs are where AWS puts each endpoint other than IMDS.
var defaultEndpointAddrs = map[EndpointKind][]string{
	EndpointECS:         {"169.254.170.2"},
	EndpointPodIdentity: {"169.254.170.23", "fd00:ec2::23"},
}

// Endpoint is one guarded credential endpoint. An imds entry takes its addresses from
// the imds keys and may not give its own; ecs and pod_identity entries default to the
// addresses AWS gives them.
type Endpoint struct {
	Kind      EndpointKind `yaml:"kind"`
	Addresses []string     `yaml:"addresses"`
	Port      int          `yaml:"port"`

	Addrs []netip.Addr `yaml:"-"` // Addresses, parsed (for imds: imds.ipv4 and imds.ipv6)
}

// defaultEndpoints guards IMDS alone: the other endpoints are opt-in (see
// docs/agent-configuration.md for why).
func defaultEndpoints() []Endpoint { return []Endpoint{{Kind: EndpointIMDS}} }

// GuardedAddr is one (address, port) the kernel guards and redirects, with the index of
// its endpoint in Config.Endpoints.
type GuardedAddr struct {
	AddrPort netip.AddrPort
	Endpoint int
	Kind     EndpointKind
}

// GuardedAddrs lists every (address, port) of every endpoint, IMDS first: what the
// kernel's table of guarded destinations holds.
func (c *Config) GuardedAddrs() []GuardedAddr {
	var out []GuardedAddr
	for i, e := range c.Endpoints {
		for _, a := range e.Addrs {
			out = append(out, GuardedAddr{AddrPort: netip.AddrPortFrom(a, uint16(e.Port)), Endpoint: i, Kind: e.Kind})
		}
	}
	return out
}

// validateEndpoints checks the endpoints list and fills in each entry's defaults. It
// runs after the imds keys are parsed: the imds entry is those.
func (c *Config) validateEndpoints(root *yaml.Node) error {
	bad := func(key, format string, args ...any) error {
		return yamlfile.Errorf(root, key, format, args...)
	}
	if len(c.Endpoints) == 0 {
		return bad("endpoints", "must list at least the imds endpoint (- kind: imds)")
	}
	seen := map[EndpointKind]int{}
	owner := map[netip.AddrPort]int{}
	haveIMDS := false
	for i := range c.Endpoints {
		e := &c.Endpoints[i]
		key := func(k string) string { return fmt.Sprintf("endpoints[%d].%s", i, k) }
		if j, dup := seen[e.Kind]; dup {
			return bad(key("kind"), "%q already listed as endpoints[%d]", e.Kind, j)
		}
		seen[e.Kind] = i
		switch e.Kind {
		case EndpointIMDS:
			haveIMDS = true
			if len(e.Addresses) > 0 || e.Port != 0 {
				return bad(fmt.Sprintf("endpoints[%d]", i), "the imds entry takes its addresses from imds.ipv4, imds.ipv6 and imds.port: set those instead")
			}
			e.Addresses = []string{c.IMDS.IPv4, c.IMDS.IPv6}
			e.Port = c.IMDS.Port
		case EndpointECS, EndpointPodIdentity:
			if len(e.Addresses) == 0 {
				e.Addresses = append([]string(nil), defaultEndpointAddrs[e.Kind]...)
			}
			if e.Port == 0 {
				e.Port = 80
			}
		case "":
			return bad(fmt.Sprintf("endpoints[%d]", i), "needs a kind: imds, ecs or pod_identity")
		default:
			return bad(key("kind"), "must be imds, ecs or pod_identity, got %q", e.Kind)
		}
		if e.Port < 1 || e.Port > 65535 {
			return bad(key("port"), "must be 1-65535, got %d", e.Port)
		}
		e.Addrs = nil
		for j, s := range e.Addresses {
			a, err := netip.ParseAddr(s)
			// IMDS's addresses were checked as imds.ipv4 and imds.ipv6 (tests put it on
			// loopback); the others must be addresses a client could be sent to.
			if e.Kind != EndpointIMDS && (err != nil || a.Is4In6() || a.Zone() != "" || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast()) {
				return bad(fmt.Sprintf("endpoints[%d].addresses[%d]", i, j), "not a unicast IPv4 or IPv6 address: %q", s)
			}
			ap := netip.AddrPortFrom(a, uint16(e.Port))
			if k, dup := owner[ap]; dup {
				return bad(fmt.Sprintf("endpoints[%d].addresses[%d]", i, j), "%s is already endpoints[%d]'s", ap, k)
			}
			owner[ap] = i
			e.Addrs = append(e.Addrs, a)
		}
	}
	if !haveIMDS {
		return bad("endpoints", "must list the imds endpoint (- kind: imds): IMDS is always guarded")
	}
	return nil
}
