package metrics

import (
	"strings"

	"github.com/imdsguard/imdsguard/internal/agent/containers"
)

// Host is the Container dimension value of processes in no container.
const Host = "host"

// ContainerValue is the Container dimension value of a process in container c (the zero
// Info: no container): the workload, not the ephemeral container, so that a restart or
// a rollout does not mint new CloudWatch metrics (docs/metrics.md says why each form):
//
//   - pod/<namespace>/<workload>/<container>: a Kubernetes pod, its name without the
//     suffixes the controllers add (a Deployment's pod-template-hash and random suffix,
//     a DaemonSet's or Job's random suffix, a CronJob's schedule time), and the
//     container's name in the pod spec when known;
//   - ecs/<task family>/<container>: an ECS task, the container's name in the task
//     definition when known;
//   - <runtime>/<name>: a container its runtime named (Docker, podman), else
//     <runtime>/<first 12 hex of the id>; "container" stands for an unknown runtime.
func ContainerValue(c containers.Info) string {
	switch {
	case c.Pod.Name != "":
		return join("pod", c.Pod.Namespace, Workload(c.Pod.Name), c.Pod.Container)
	case c.ECS.Family != "":
		return join("ecs", c.ECS.Family, c.ECS.Container)
	case c.ID == "":
		return Host
	}
	runtime := c.Runtime
	if runtime == "" {
		runtime = "container"
	}
	if c.Name != "" {
		return runtime + "/" + c.Name
	}
	return runtime + "/" + c.ID[:min(12, len(c.ID))]
}

// join joins the non-empty parts with "/", keeping a missing namespace's place so that
// the parts keep their positions.
func join(kind string, parts ...string) string {
	for len(parts) > 0 && parts[len(parts)-1] == "" {
		parts = parts[:len(parts)-1]
	}
	return kind + "/" + strings.Join(parts, "/")
}

// PodNamespace is the Kubernetes namespace of a ContainerValue, "" for one that is no
// pod's: Prometheus has it as a label of its own, to sum by.
func PodNamespace(value string) string {
	rest, ok := strings.CutPrefix(value, "pod/")
	if !ok {
		return ""
	}
	ns, _, _ := strings.Cut(rest, "/")
	return ns
}

// The alphabet of the random strings Kubernetes' controllers put in pod names
// (k8s.io/apimachinery/pkg/util/rand: no vowels, no 0, 1 or 3, so no words).
const kubeAlphabet = "bcdfghjklmnpqrstvwxz2456789"

func isKubeRandom(c byte) bool { return strings.IndexByte(kubeAlphabet, c) >= 0 }
func isDigit(c byte) bool      { return c >= '0' && c <= '9' }

// Workload is a pod's name without what its controller added to make it unique: the
// Deployment (or ReplicaSet), DaemonSet, Job or CronJob that made it, by the names those
// controllers give (<deployment>-<pod-template-hash>-<5 random>, <daemonset>-<5 random>,
// <cronjob>-<minutes since 1970>-<5 random>). A StatefulSet's <name>-<ordinal> and a pod
// named by hand are kept: they are stable. Only the pod's name is known on the host (the
// owner references are the API server's), so a hand-made name ending like a random
// suffix loses it; the events keep the full pod name. It runs for every observation of
// a pod's process, hence bytes rather than regular expressions.
func Workload(pod string) string {
	name, ok := cutSuffix(pod, 5, 5, isKubeRandom)
	if !ok {
		return pod
	}
	if n, ok := cutSuffix(name, 8, 20, isDigit); ok {
		return n
	}
	if n, ok := cutSuffix(name, 6, 10, isKubeRandom); ok {
		return n
	}
	return name
}

// cutSuffix cuts "-SUFFIX" off name when SUFFIX has lo to hi bytes, each of them in, and
// something is left before it.
func cutSuffix(name string, lo, hi int, in func(byte) bool) (string, bool) {
	i := strings.LastIndexByte(name, '-')
	if i < 1 {
		return name, false
	}
	suffix := name[i+1:]
	if len(suffix) < lo || len(suffix) > hi {
		return name, false
	}
	for j := range len(suffix) {
		if !in(suffix[j]) {
			return name, false
		}
	}
	return name[:i], true
}
