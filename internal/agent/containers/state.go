package containers

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Sources are where the runtimes keep their state. Tests point them at fixtures.
type Sources struct {
	// ContainerdTasks holds <namespace>/<id>/config.json, the OCI bundle of each running
	// task (containerd, and Docker 20+ in namespace "moby").
	ContainerdTasks string
	// ContainersStorage are the run and data roots of containers/storage (CRI-O, podman):
	// overlay-containers/<id>/userdata/config.json.
	ContainersStorage []string
	// DockerData holds containers/<id>/config.v2.json (name and labels, ECS's included).
	DockerData string
	// DockerContainerd holds <id>/config.json, the bundles of Docker before 20.10.
	DockerContainerd string
	// ECSAgent is the ECS agent's introspection API; "" to not ask it.
	ECSAgent string
}

// DefaultSources are the runtimes' standard places.
func DefaultSources() Sources {
	return Sources{
		ContainerdTasks:   "/run/containerd/io.containerd.runtime.v2.task",
		ContainersStorage: []string{"/run/containers/storage", "/var/lib/containers/storage"},
		DockerData:        "/var/lib/docker",
		DockerContainerd:  "/run/docker/containerd",
		ECSAgent:          "http://localhost:51678",
	}
}

// Resolver finds what the runtimes know of a container, caching what it found: a
// container's annotations and labels do not change while it exists.
type Resolver struct {
	src Sources
	ecs *ecsClient

	mu     sync.Mutex
	found  map[string]Info
	missed map[string]time.Time // when a look-up last found no state
}

// maxCached bounds the cache; a host runs far fewer containers at once.
const maxCached = 4096

// missRetry is how long a container without state is not looked up again: a cgroup may
// exist a moment before its runtime's state is written.
const missRetry = time.Second

// NewResolver reads the runtimes' state at src.
func NewResolver(src Sources) *Resolver {
	r := &Resolver{src: src, found: map[string]Info{}, missed: map[string]time.Time{}}
	if src.ECSAgent != "" {
		r.ecs = newECSClient(src.ECSAgent)
	}
	return r
}

// Lookup returns what is known of the container with full id and the runtime its
// cgroup path names ("" when the path does not say). ok is false when no runtime state
// was found; Info still carries id and runtime.
func (r *Resolver) Lookup(id, runtime string) (Info, bool) {
	if id == "" {
		return Info{}, false
	}
	r.mu.Lock()
	info, hit := r.found[id]
	missedAt, missed := r.missed[id]
	r.mu.Unlock()
	if hit {
		return info, true
	}
	if missed && time.Since(missedAt) < missRetry {
		return Info{ID: id, Runtime: runtime}, false
	}
	info, ok := r.read(id, runtime)
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.found)+len(r.missed) >= maxCached {
		// Crude but bounded: a cleared entry costs one read of the runtime's state.
		clear(r.found)
		clear(r.missed)
	}
	if ok {
		r.found[id] = info
		delete(r.missed, id)
	} else {
		r.missed[id] = time.Now()
	}
	return info, ok
}

// ECSTaskOfCredentials returns the task of a known container that was handed the ECS
// credentials id id.
func (r *Resolver) ECSTaskOfCredentials(id string) (ECSTask, bool) {
	if id == "" {
		return ECSTask{}, false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, info := range r.found {
		if info.ECS.CredentialsID == id {
			return info.ECS, true
		}
	}
	return ECSTask{}, false
}

// Forget drops what is cached of containers not in live, so that the cache follows the
// host's containers.
func (r *Resolver) Forget(live map[string]bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for id := range r.found {
		if !live[id] {
			delete(r.found, id)
		}
	}
	for id := range r.missed {
		if !live[id] {
			delete(r.missed, id)
		}
	}
}

func (r *Resolver) read(id, runtime string) (Info, bool) {
	info := Info{ID: id, Runtime: runtime}
	found := false
	// The OCI bundle: containerd (CRI or not, Docker 20+), then containers/storage
	// (CRI-O, podman), then Docker before 20.10.
	if spec, ns, ok := r.containerdSpec(id); ok {
		found = true
		if info.Runtime == "" {
			info.Runtime = Containerd
			if ns == "moby" {
				info.Runtime = Docker
			}
		}
		fromAnnotations(&info, spec)
	} else if spec, ok := r.storageSpec(id); ok {
		found = true
		if info.Runtime == "" {
			info.Runtime = Podman
			if spec.Annotations["io.kubernetes.cri-o.ContainerType"] != "" {
				info.Runtime = CRIO
			}
		}
		fromAnnotations(&info, spec)
	} else if spec, ok := readSpec(filepath.Join(r.src.DockerContainerd, id, "config.json")); ok {
		found = true
		if info.Runtime == "" {
			info.Runtime = Docker
		}
		fromAnnotations(&info, spec)
	}
	if name, labels, env, ok := r.dockerConfig(id); ok {
		if info.ECS.CredentialsID == "" {
			info.ECS.CredentialsID = credentialsID(env)
		}
		found = true
		if info.Runtime == "" {
			info.Runtime = Docker
		}
		info.Name = name
		fromLabels(&info, labels)
	}
	if r.ecs != nil && (info.ECS.ARN == "" || info.ECS.Family == "") && (found || runtime == "" || runtime == Docker) {
		if t, ok := r.ecs.taskOf(id); ok {
			found = true
			t.CredentialsID = info.ECS.CredentialsID
			info.ECS = t
		}
	}
	return info, found
}

// spec is the part of an OCI runtime config that names the container.
type spec struct {
	Annotations map[string]string `json:"annotations"`
	Process     struct {
		Env []string `json:"env"`
	} `json:"process"`
	Mounts []struct {
		Destination string `json:"destination"`
		Source      string `json:"source"`
	} `json:"mounts"`
}

// maxStateBytes bounds what is read of one state file; real ones are tens of KiB.
const maxStateBytes = 4 << 20

func readJSON(path string, v any) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() || st.Size() > maxStateBytes {
		return false
	}
	return json.NewDecoder(f).Decode(v) == nil
}

func readSpec(path string) (spec, bool) {
	var s spec
	ok := readJSON(path, &s)
	return s, ok
}

func (r *Resolver) containerdSpec(id string) (spec, string, bool) {
	if r.src.ContainerdTasks == "" {
		return spec{}, "", false
	}
	nss, err := os.ReadDir(r.src.ContainerdTasks)
	if err != nil {
		return spec{}, "", false
	}
	for _, ns := range nss {
		if s, ok := readSpec(filepath.Join(r.src.ContainerdTasks, ns.Name(), id, "config.json")); ok {
			return s, ns.Name(), true
		}
	}
	return spec{}, "", false
}

func (r *Resolver) storageSpec(id string) (spec, bool) {
	for _, root := range r.src.ContainersStorage {
		if s, ok := readSpec(filepath.Join(root, "overlay-containers", id, "userdata", "config.json")); ok {
			return s, true
		}
	}
	return spec{}, false
}

func (r *Resolver) dockerConfig(id string) (name string, labels map[string]string, env []string, ok bool) {
	if r.src.DockerData == "" {
		return "", nil, nil, false
	}
	var c struct {
		Name   string
		Config struct {
			Labels map[string]string
			Env    []string
		}
	}
	if !readJSON(filepath.Join(r.src.DockerData, "containers", id, "config.v2.json"), &c) {
		return "", nil, nil, false
	}
	return strings.TrimPrefix(c.Name, "/"), c.Config.Labels, c.Config.Env, true
}

// Annotations the CRI runtimes write into a container's OCI config.
const (
	// containerd's CRI plugin.
	criSandboxNamespace = "io.kubernetes.cri.sandbox-namespace"
	criSandboxName      = "io.kubernetes.cri.sandbox-name"
	criSandboxUID       = "io.kubernetes.cri.sandbox-uid"
	criContainerName    = "io.kubernetes.cri.container-name"
	// CRI-O: the kubelet's labels as one JSON object.
	crioLabels = "io.kubernetes.cri-o.Labels"
	// The kubelet's labels (CRI-O's Labels, Docker's labels under dockershim and
	// cri-dockerd).
	kubePodNamespace = "io.kubernetes.pod.namespace"
	kubePodName      = "io.kubernetes.pod.name"
	kubePodUID       = "io.kubernetes.pod.uid"
	kubeContainer    = "io.kubernetes.container.name"
	// The ECS agent's Docker labels.
	ecsTaskARN   = "com.amazonaws.ecs.task-arn"
	ecsFamily    = "com.amazonaws.ecs.task-definition-family"
	ecsContainer = "com.amazonaws.ecs.container-name"
)

// serviceAccountMounts are where a pod's service account tokens are mounted; each
// token's claims name the service account.
var serviceAccountMounts = []string{
	"/var/run/secrets/kubernetes.io/serviceaccount",
	"/var/run/secrets/eks.amazonaws.com/serviceaccount",      // IRSA
	"/var/run/secrets/pods.eks.amazonaws.com/serviceaccount", // EKS Pod Identity
}

// credentialsID returns the ECS credentials id in a container's environment, "" when
// there is none.
func credentialsID(env []string) string {
	for _, kv := range env {
		if uri, ok := strings.CutPrefix(kv, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="); ok {
			if id, ok := strings.CutPrefix(uri, "/v2/credentials/"); ok && id != "" && !strings.ContainsAny(id, "/?") {
				return id
			}
		}
	}
	return ""
}

func fromAnnotations(info *Info, s spec) {
	if info.ECS.CredentialsID == "" {
		info.ECS.CredentialsID = credentialsID(s.Process.Env)
	}
	a := s.Annotations
	set := func(dst *string, v string) {
		if *dst == "" {
			*dst = v
		}
	}
	set(&info.Pod.Namespace, a[criSandboxNamespace])
	set(&info.Pod.Name, a[criSandboxName])
	set(&info.Pod.UID, a[criSandboxUID])
	set(&info.Pod.Container, a[criContainerName])
	if raw := a[crioLabels]; raw != "" {
		var labels map[string]string
		if json.Unmarshal([]byte(raw), &labels) == nil {
			fromLabels(info, labels)
		}
	}
	fromLabels(info, a) // CRI-O also writes the kubelet's labels as annotations
	if info.Pod.Name != "" && info.Pod.ServiceAccount == "" {
		info.Pod.ServiceAccount = serviceAccount(s, info.Pod.Namespace)
	}
}

func fromLabels(info *Info, l map[string]string) {
	set := func(dst *string, v string) {
		if *dst == "" {
			*dst = v
		}
	}
	set(&info.Pod.Namespace, l[kubePodNamespace])
	set(&info.Pod.Name, l[kubePodName])
	set(&info.Pod.UID, l[kubePodUID])
	set(&info.Pod.Container, l[kubeContainer])
	set(&info.ECS.ARN, l[ecsTaskARN])
	set(&info.ECS.Family, l[ecsFamily])
	set(&info.ECS.Container, l[ecsContainer])
}

// serviceAccount reads the service account's name from the claims of the token the
// kubelet mounted into the container (the CRI does not pass it). Only the claims are
// decoded; the token is neither verified (the kubelet wrote it, on the host) nor kept.
func serviceAccount(s spec, namespace string) string {
	for _, dst := range serviceAccountMounts {
		for _, m := range s.Mounts {
			if m.Destination != dst || !filepath.IsAbs(m.Source) {
				continue
			}
			names, _ := filepath.Glob(filepath.Join(m.Source, "*token"))
			for _, name := range names {
				if sa, err := tokenServiceAccount(name, namespace); err == nil {
					return sa
				}
			}
		}
	}
	return ""
}

func tokenServiceAccount(path, namespace string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	buf := make([]byte, 16<<10)
	n, _ := f.Read(buf)
	parts := strings.Split(strings.TrimSpace(string(buf[:n])), ".")
	if len(parts) != 3 {
		return "", fmt.Errorf("token %s: not a JWT", path)
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return "", fmt.Errorf("token %s: claims: %w", path, err)
	}
	var claims struct {
		Sub string `json:"sub"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return "", fmt.Errorf("token %s: claims: %w", path, err)
	}
	// sub is system:serviceaccount:<namespace>:<name>.
	rest, ok := strings.CutPrefix(claims.Sub, "system:serviceaccount:")
	ns, name, ok2 := strings.Cut(rest, ":")
	if !ok || !ok2 || name == "" || (namespace != "" && ns != namespace) {
		return "", fmt.Errorf("token %s: subject %q is not a service account of namespace %q", path, claims.Sub, namespace)
	}
	return name, nil
}
