package config

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/yamlfile"

	"gopkg.in/yaml.v3"
)

// Rule is one allowlist rule. Its criteria are ANDed; rules are tried in order and the
// first that matches decides. Names and meanings are a contract with operators.
type Rule struct {
	Name      string `yaml:"name"`
	User      string `yaml:"user"`
	UID       *int   `yaml:"uid"`
	Group     string `yaml:"group"`
	GID       *int   `yaml:"gid"`
	Exe       string `yaml:"exe"`
	Unit      string `yaml:"unit"`
	Cgroup    string `yaml:"cgroup"`
	Container string `yaml:"container"`
	// Matched against what the container runtimes' state says of the process's
	// container (package containers): a Kubernetes pod's namespace, name and service
	// account, an ECS task's family.
	PodNamespace   string `yaml:"pod_namespace"`
	Pod            string `yaml:"pod"`
	ServiceAccount string `yaml:"service_account"`
	ECSTaskFamily  string `yaml:"ecs_task_family"`
	Action         Action `yaml:"action"` // allow | deny
	IMDSv2         IMDSv2 `yaml:"imdsv2"` // optional | required
}

// Broker configures the local HTTP broker that allowed IMDS connections are redirected
// to, where IMDSv2 is enforced per process.
type Broker struct {
	Enabled         bool          `yaml:"enabled"`
	Port            int           `yaml:"port"`             // on 127.0.0.1 and [::1]
	Mark            int           `yaml:"mark"`             // SO_MARK of the broker's own sockets to IMDS
	MaxHeaderBytes  int           `yaml:"max_header_bytes"` // larger: 431
	MaxBodyBytes    int64         `yaml:"max_body_bytes"`   // larger: 413
	ReadTimeout     time.Duration `yaml:"read_timeout"`     // a request's headers and body
	IdleTimeout     time.Duration `yaml:"idle_timeout"`     // keep-alive connections
	UpstreamTimeout time.Duration `yaml:"upstream_timeout"` // one request to IMDS
	// Open client connections, idle keep-alive ones included: over a cap a new
	// connection is reset at once, so that no user can grow the agent's memory.
	MaxConnections           int `yaml:"max_connections"`             // all clients together
	MaxConnectionsPerUID     int `yaml:"max_connections_per_uid"`     // one user's processes
	MaxConnectionsPerProcess int `yaml:"max_connections_per_process"` // one process (tgid)
}

// DefaultBrokerPort is privileged (below 1024): no unprivileged process can bind it
// first and receive the connections the kernel redirects (issue 11).
const DefaultBrokerPort = 254

func defaultBroker() Broker {
	return Broker{Enabled: true, Port: DefaultBrokerPort, Mark: 0x1d5, MaxHeaderBytes: 8 << 10, MaxBodyBytes: 4 << 10,
		ReadTimeout: 5 * time.Second, IdleTimeout: 60 * time.Second, UpstreamTimeout: 5 * time.Second,
		MaxConnections: 1024, MaxConnectionsPerUID: 256, MaxConnectionsPerProcess: 64}
}

// MaxRules is the kernel's limit: one bit per rule.
const MaxRules = hook.MaxRules

var containerIDPattern = regexp.MustCompile(`^[0-9a-f]{12,64}$`)

var (
	// Kubernetes' names: a namespace is a DNS label, pods and service accounts are DNS
	// subdomains.
	dnsLabel     = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	dnsSubdomain = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$`)
	// An ECS task definition family: up to 255 letters, digits, hyphens, underscores.
	ecsFamily = regexp.MustCompile(`^[A-Za-z0-9_-]{1,255}$`)
)

// ContainerCriteria says whether r names containers (container, pod_namespace, pod,
// service_account, ecs_task_family): such criteria resolve to container cgroups.
func (r Rule) ContainerCriteria() bool {
	return r.Container != "" || r.PodNamespace != "" || r.Pod != "" || r.ServiceAccount != "" || r.ECSTaskFamily != ""
}

func (c *Config) validatePolicy(root *yaml.Node) error {
	bad := func(key, format string, args ...any) error {
		return yamlfile.Errorf(root, key, format, args...)
	}
	if err := oneOf(c.Mode, ModeAudit, ModeEnforce); err != nil {
		return bad("mode", "%v", err)
	}
	if err := oneOf(c.FailureMode, FailOpen, FailClosed); err != nil {
		return bad("failure_mode", "%v", err)
	}
	if err := oneOf(c.DefaultAction, Allow, Deny); err != nil {
		return bad("default_action", "%v", err)
	}
	if c.PinPath != "" && !filepath.IsAbs(c.PinPath) {
		return bad("pin_path", "must be an absolute path (or \"\" to not pin), got %q", c.PinPath)
	}
	if len(c.Rules) > MaxRules {
		return bad("rules", "%d rules, at most %d", len(c.Rules), MaxRules)
	}
	names := map[string]int{}
	for i := range c.Rules {
		r := &c.Rules[i]
		key := func(k string) string { return fmt.Sprintf("rules[%d].%s", i, k) }
		if r.Name == "" {
			return bad(fmt.Sprintf("rules[%d]", i), "needs a name")
		}
		if j, dup := names[r.Name]; dup {
			return bad(key("name"), "%q already names rules[%d]", r.Name, j)
		}
		names[r.Name] = i
		if r.Action == "" {
			return bad(fmt.Sprintf("rules[%d]", i), "rule %q needs an action (allow or deny)", r.Name)
		}
		if err := oneOf(r.Action, Allow, Deny); err != nil {
			return bad(key("action"), "%v", err)
		}
		if r.IMDSv2 == "" {
			r.IMDSv2 = IMDSv2Optional
		}
		if err := oneOf(r.IMDSv2, IMDSv2Optional, IMDSv2Required); err != nil {
			return bad(key("imdsv2"), "%v", err)
		}
		if r.IMDSv2.Required() && r.Action == Deny {
			return bad(key("imdsv2"), "has no effect on a deny rule")
		}
		if r.User != "" && r.UID != nil {
			return bad(key("uid"), "give user or uid, not both")
		}
		if r.Group != "" && r.GID != nil {
			return bad(key("gid"), "give group or gid, not both")
		}
		if r.UID != nil && (*r.UID < 0 || *r.UID > 1<<32-2) {
			return bad(key("uid"), "not a uid: %d", *r.UID)
		}
		if r.GID != nil && (*r.GID < 0 || *r.GID > 1<<32-2) {
			return bad(key("gid"), "not a gid: %d", *r.GID)
		}
		if r.Exe != "" && !filepath.IsAbs(r.Exe) {
			return bad(key("exe"), "must be an absolute path, got %q", r.Exe)
		}
		if r.Cgroup != "" && !strings.HasPrefix(r.Cgroup, "/") {
			return bad(key("cgroup"), "must start with / (a path below the cgroup2 root, or under its mount), got %q", r.Cgroup)
		}
		if r.Unit != "" && (strings.Contains(r.Unit, "/") || !strings.Contains(r.Unit, ".")) {
			return bad(key("unit"), "must be a systemd unit name such as sshd.service, got %q", r.Unit)
		}
		if r.Container != "" && !containerIDPattern.MatchString(r.Container) {
			return bad(key("container"), "must be a container id (12 to 64 lowercase hex digits), got %q", r.Container)
		}
		for _, f := range []struct {
			key, value string
			re         *regexp.Regexp
			what       string
		}{
			{"pod_namespace", r.PodNamespace, dnsLabel, "a Kubernetes namespace (a DNS label)"},
			{"pod", r.Pod, dnsSubdomain, "a Kubernetes pod name"},
			{"service_account", r.ServiceAccount, dnsSubdomain, "a Kubernetes service account name"},
			{"ecs_task_family", r.ECSTaskFamily, ecsFamily, "an ECS task definition family (letters, digits, - and _)"},
		} {
			if f.value != "" && !f.re.MatchString(f.value) {
				return bad(key(f.key), "must be %s, got %q", f.what, f.value)
			}
		}
		if r.User == "" && r.UID == nil && r.Group == "" && r.GID == nil && r.Exe == "" && r.Unit == "" &&
			r.Cgroup == "" && !r.ContainerCriteria() {
			return bad(fmt.Sprintf("rules[%d]", i), "rule %q has no criteria (user, uid, group, gid, exe, unit, cgroup, container, pod_namespace, pod, service_account, ecs_task_family); use default_action for everything else", r.Name)
		}
		if nCgroup := btoi(r.Unit != "") + btoi(r.Cgroup != "") + btoi(r.ContainerCriteria()); nCgroup > 1 {
			return bad(fmt.Sprintf("rules[%d]", i), "give at most one of unit, cgroup, or container criteria (container, pod_namespace, pod, service_account, ecs_task_family) per rule")
		}
	}
	b := c.Broker
	if b.Port < 1 || b.Port > 65535 {
		return bad("broker.port", "must be 1-65535, got %d", b.Port)
	}
	if b.Mark <= 0 || b.Mark > 1<<32-1 {
		return bad("broker.mark", "must be a non-zero 32-bit value, got %d", b.Mark)
	}
	if b.MaxHeaderBytes < 1024 || b.MaxHeaderBytes > 1<<20 {
		return bad("broker.max_header_bytes", "must be 1024-1048576, got %d", b.MaxHeaderBytes)
	}
	if b.MaxBodyBytes < 0 || b.MaxBodyBytes > 1<<20 {
		return bad("broker.max_body_bytes", "must be 0-1048576, got %d", b.MaxBodyBytes)
	}
	for k, d := range map[string]time.Duration{"broker.read_timeout": b.ReadTimeout, "broker.idle_timeout": b.IdleTimeout, "broker.upstream_timeout": b.UpstreamTimeout} {
		if d < 100*time.Millisecond || d > 10*time.Minute {
			return bad(k, "must be 100ms-10m, got %s", d)
		}
	}
	for _, c := range []struct {
		key string
		n   int
	}{{"broker.max_connections", b.MaxConnections}, {"broker.max_connections_per_uid", b.MaxConnectionsPerUID},
		{"broker.max_connections_per_process", b.MaxConnectionsPerProcess}} {
		if c.n < 1 || c.n > 1<<20 {
			return bad(c.key, "must be 1-1048576, got %d", c.n)
		}
	}
	return nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
