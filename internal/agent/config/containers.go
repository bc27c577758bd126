package config

import (
	"gopkg.in/yaml.v3"

	"github.com/imdsguard/imdsguard/internal/yamlfile"
)

// Containers configures the broker in containers' network namespaces (issue 12). The
// key names are a contract: fallback, max_namespaces.
type Containers struct {
	// Fallback is what the kernel does with an allowed IMDS connection from a network
	// namespace that has no broker endpoint (not served yet, refused over
	// MaxNamespaces, or its port taken by a process there): "direct" (straight to IMDS,
	// as before the agent knew containers) or "deny" (EPERM). A connection whose rule
	// requires IMDSv2 is never sent direct.
	Fallback Fallback `yaml:"fallback"`
	// MaxNamespaces caps the network namespaces served at once; 0 serves none.
	MaxNamespaces int `yaml:"max_namespaces"`
}

// Fallback is what happens to a container's connection that cannot be brokered.
type Fallback string

const (
	FallbackDirect Fallback = "direct" // straight to IMDS, unbrokered (L4 allowlist only)
	FallbackDeny   Fallback = "deny"   // EPERM at connect()
)

// Denies reports whether such connections are refused.
func (f Fallback) Denies() bool { return f == FallbackDeny }

func defaultContainers() Containers {
	return Containers{Fallback: FallbackDirect, MaxNamespaces: 1024}
}

func validateContainers(c *Containers, root *yaml.Node) error {
	if err := oneOf(c.Fallback, FallbackDirect, FallbackDeny); err != nil {
		return yamlfile.Errorf(root, "containers.fallback", "%v", err)
	}
	if c.MaxNamespaces < 0 || c.MaxNamespaces > 65536 {
		return yamlfile.Errorf(root, "containers.max_namespaces", "must be 0-65536, got %d", c.MaxNamespaces)
	}
	return nil
}
