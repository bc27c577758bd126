// Package containers names the container behind a cgroup: its runtime's full id and
// name (Docker, containerd, CRI-O, podman), and where present the Kubernetes pod and the
// ECS task it belongs to.
//
// Only what root's runtimes wrote is believed: the container's cgroup must be at the
// place the runtime itself makes it (a process can name its own cgroup anything in a
// delegated subtree), and the labels come from the runtime's state on the host (the OCI
// config.json and its annotations, Docker's config.v2.json) and from the ECS agent's
// introspection API, never from anything inside the container.
package containers

import (
	"regexp"
	"strings"
)

// Runtime names, as events and rules give them.
const (
	Docker     = "docker"
	Containerd = "containerd"
	CRIO       = "cri-o"
	Podman     = "podman"
)

// Info is what is known of one container. Empty fields are unknown.
type Info struct {
	ID      string // full 64-hex id
	Runtime string // Docker, Containerd, CRIO, Podman; "" when only the cgroup names it
	Name    string // the runtime's name of the container (Docker's, podman's)
	Pod     Pod
	ECS     ECSTask
}

// Pod is the Kubernetes pod a container belongs to, from the CRI's annotations.
type Pod struct {
	Namespace      string
	Name           string
	UID            string
	Container      string // the container's name in the pod spec
	ServiceAccount string
}

// ECSTask is the ECS task a container belongs to.
type ECSTask struct {
	ARN       string
	Family    string
	Container string // the container's name in the task definition
	// CredentialsID is the id the ECS agent handed the container's task for its task
	// credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/<id> in the
	// container's environment, as the runtime's state holds it). Whoever holds it can
	// fetch the task's credentials: it is a secret, never written out.
	CredentialsID string
}

// runtimeCgroup is a place where a runtime puts a container's cgroup, with the
// container's full 64-hex id in it.
type runtimeCgroup struct {
	re      *regexp.Regexp
	runtime func(m []string) string // "" when the path does not say
}

func fixed(name string) func([]string) string { return func([]string) string { return name } }

// runtimeCgroups: Docker (systemd and cgroupfs drivers), podman (root), Kubernetes
// runtimes (containerd, CRI-O, Docker; systemd and cgroupfs drivers), ECS.
var runtimeCgroups = []runtimeCgroup{
	{regexp.MustCompile(`^/system\.slice/docker-([0-9a-f]{64})\.scope$`), fixed(Docker)},
	{regexp.MustCompile(`^/docker/([0-9a-f]{64})$`), fixed(Docker)},
	{regexp.MustCompile(`^/machine\.slice/libpod-([0-9a-f]{64})\.scope$`), fixed(Podman)},
	{regexp.MustCompile(`^/kubepods\.slice/(?:[a-z0-9_.-]+\.slice/)*(cri-containerd|crio|docker)-([0-9a-f]{64})\.scope$`), func(m []string) string {
		return map[string]string{"cri-containerd": Containerd, "crio": CRIO, "docker": Docker}[m[1]]
	}},
	{regexp.MustCompile(`^/kubepods/(?:[a-z0-9_-]+/)*([0-9a-f]{64})$`), fixed("")},
	{regexp.MustCompile(`^/ecs/[0-9a-f]{32}/([0-9a-f]{64})$`), fixed("")},
}

// FromCgroup returns the full container id, and the runtime when the path names it, of
// the cgroup at rel (below the cgroup2 root, leading "/") when a container runtime made
// it at its own place; "" otherwise. A cgroup that merely has a container-like name
// (docker-0123456789abcdef.scope) names no container.
func FromCgroup(rel string) (id, runtime string) {
	for _, rc := range runtimeCgroups {
		if m := rc.re.FindStringSubmatch(rel); m != nil {
			return m[len(m)-1], rc.runtime(m)
		}
	}
	return "", ""
}

// ContainerOf returns the container whose cgroup is rel or an ancestor of rel: the
// topmost one, since only that one is the runtime's (a container may make cgroups below
// its own, with any names). The second result is the container's cgroup.
func ContainerOf(rel string) (id, runtime, cgroup string) {
	if rel == "" || rel == "/" {
		return "", "", ""
	}
	parts := strings.Split(strings.TrimPrefix(rel, "/"), "/")
	for i := 1; i <= len(parts); i++ {
		p := "/" + strings.Join(parts[:i], "/")
		if id, rt := FromCgroup(p); id != "" {
			return id, rt, p
		}
	}
	return "", "", ""
}
