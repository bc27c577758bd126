package containers

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

var (
	idA = strings.Repeat("0123456789abcdef", 4)
	idB = strings.Repeat("fedcba9876543210", 4)
)

func TestFromCgroup(t *testing.T) {
	cases := []struct{ path, id, runtime, top string }{
		{"/system.slice/docker-" + idA + ".scope", idA, Docker, ""},
		{"/docker/" + idA, idA, Docker, ""},
		{"/machine.slice/libpod-" + idA + ".scope", idA, Podman, ""},
		{"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-" + idA + ".scope", idA, Containerd, ""},
		{"/kubepods.slice/kubepods-pod1.slice/crio-" + idA + ".scope", idA, CRIO, ""},
		{"/kubepods/besteffort/pod0d4f/" + idA, idA, "", ""},
		{"/ecs/" + idA[:32] + "/" + idA, idA, "", ""},
		// Below a container: the container's, never a name made inside it.
		{"/system.slice/docker-" + idA + ".scope/init", idA, Docker, "/system.slice/docker-" + idA + ".scope"},
		{"/system.slice/docker-" + idA + ".scope/docker/" + idB, idA, Docker, "/system.slice/docker-" + idA + ".scope"},
		// Container-like names elsewhere name nothing.
		{"/user.slice/user-1000.slice/user@1000.service/docker-" + idA + ".scope", "", "", ""},
		{"/system.slice/docker-" + idA[:12] + ".scope", "", "", ""},
		{"/", "", "", ""},
		{"", "", "", ""},
	}
	for _, c := range cases {
		id, rt, top := ContainerOf(c.path)
		want := c.top
		if want == "" && c.id != "" {
			want = c.path
		}
		if id != c.id || rt != c.runtime || top != want {
			t.Errorf("ContainerOf(%q) = %q, %q, %q; want %q, %q, %q", c.path, id, rt, top, c.id, c.runtime, want)
		}
	}
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// token writes a projected service account token as the kubelet does (claims only
// matter here; the signature is not checked) and returns its volume directory.
func token(t *testing.T, sub string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "kubelet/pods/uid/volumes/kubernetes.io~projected/kube-api-access-x")
	claims, _ := json.Marshal(map[string]any{"aud": []string{"https://kubernetes.default.svc"}, "sub": sub,
		"kubernetes.io": map[string]any{"namespace": "payments", "serviceaccount": map[string]string{"name": "api"}}})
	jwt := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"RS256","kid":"k"}`)) + "." +
		base64.RawURLEncoding.EncodeToString(claims) + ".c2lnbmF0dXJl"
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "token"), []byte(jwt), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// containerdCRISpec is the shape of the config.json containerd's CRI plugin writes into
// a task's bundle.
func containerdCRISpec(tokenDir string) map[string]any {
	return map[string]any{
		"ociVersion": "1.0.2-dev",
		"process":    map[string]any{"args": []string{"/app"}, "cwd": "/"},
		"root":       map[string]any{"path": "rootfs"},
		"mounts": []map[string]any{
			{"destination": "/proc", "type": "proc", "source": "proc"},
			{"destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind", "source": tokenDir, "options": []string{"rbind", "ro"}},
		},
		"annotations": map[string]string{
			"io.kubernetes.cri.container-type":    "container",
			"io.kubernetes.cri.container-name":    "api",
			"io.kubernetes.cri.image-name":        "registry.example/api:1",
			"io.kubernetes.cri.sandbox-id":        idB,
			"io.kubernetes.cri.sandbox-name":      "api-7d9f-x2",
			"io.kubernetes.cri.sandbox-namespace": "payments",
			"io.kubernetes.cri.sandbox-uid":       "0b1c2d3e-0000-4000-8000-000000000001",
		},
		"linux": map[string]any{"cgroupsPath": "kubepods-burstable-pod0b1c.slice:cri-containerd:" + idA},
	}
}

func TestContainerdCRI(t *testing.T) {
	root := t.TempDir()
	writeJSON(t, filepath.Join(root, "k8s.io", idA, "config.json"), containerdCRISpec(token(t, "system:serviceaccount:payments:api")))
	r := NewResolver(Sources{ContainerdTasks: root})
	got, ok := r.Lookup(idA, Containerd)
	want := Info{ID: idA, Runtime: Containerd, Pod: Pod{Namespace: "payments", Name: "api-7d9f-x2",
		UID: "0b1c2d3e-0000-4000-8000-000000000001", Container: "api", ServiceAccount: "api"}}
	if !ok || got != want {
		t.Fatalf("Lookup = %+v, %v; want %+v", got, ok, want)
	}
	// Found once, cached: the state going away changes nothing until Forget.
	if err := os.RemoveAll(filepath.Join(root, "k8s.io")); err != nil {
		t.Fatal(err)
	}
	if got, ok := r.Lookup(idA, Containerd); !ok || got != want {
		t.Fatalf("cached Lookup = %+v, %v", got, ok)
	}
	r.Forget(map[string]bool{})
	if got, ok := r.Lookup(idA, Containerd); ok || got.Pod.Name != "" {
		t.Fatalf("after Forget Lookup = %+v, %v; want nothing", got, ok)
	}
}

func TestServiceAccountOfAnotherNamespaceIgnored(t *testing.T) {
	root := t.TempDir()
	writeJSON(t, filepath.Join(root, "k8s.io", idA, "config.json"), containerdCRISpec(token(t, "system:serviceaccount:kube-system:admin")))
	got, _ := NewResolver(Sources{ContainerdTasks: root}).Lookup(idA, Containerd)
	if got.Pod.ServiceAccount != "" {
		t.Fatalf("service account %q from a token of another namespace", got.Pod.ServiceAccount)
	}
}

func TestCRIO(t *testing.T) {
	run := t.TempDir()
	labels, _ := json.Marshal(map[string]string{
		"io.kubernetes.container.name": "web", "io.kubernetes.pod.name": "web-0",
		"io.kubernetes.pod.namespace": "shop", "io.kubernetes.pod.uid": "77aa",
	})
	writeJSON(t, filepath.Join(run, "overlay-containers", idA, "userdata", "config.json"), map[string]any{
		"ociVersion": "1.0.2-dev",
		"annotations": map[string]string{
			"io.kubernetes.cri-o.ContainerType": "container",
			"io.kubernetes.cri-o.ContainerName": "k8s_web_web-0_shop_77aa_0",
			"io.kubernetes.cri-o.Labels":        string(labels),
			"io.kubernetes.cri-o.SandboxID":     idB,
			"io.kubernetes.pod.name":            "web-0",
			"io.kubernetes.pod.namespace":       "shop",
		},
	})
	// A cgroupfs-driver path does not name the runtime: the state does.
	got, ok := NewResolver(Sources{ContainersStorage: []string{t.TempDir(), run}}).Lookup(idA, "")
	want := Info{ID: idA, Runtime: CRIO, Pod: Pod{Namespace: "shop", Name: "web-0", UID: "77aa", Container: "web"}}
	if !ok || got != want {
		t.Fatalf("Lookup = %+v, %v; want %+v", got, ok, want)
	}
}

func TestPodman(t *testing.T) {
	data := t.TempDir()
	writeJSON(t, filepath.Join(data, "overlay-containers", idA, "userdata", "config.json"), map[string]any{
		"ociVersion":  "1.0.2-dev",
		"annotations": map[string]string{"io.container.manager": "libpod", "org.opencontainers.image.stopSignal": "15"},
	})
	got, ok := NewResolver(Sources{ContainersStorage: []string{data}}).Lookup(idA, "")
	if !ok || got != (Info{ID: idA, Runtime: Podman}) {
		t.Fatalf("Lookup = %+v, %v", got, ok)
	}
}

// ecsAgent stands in for the ECS agent's introspection API, answering as it documents:
// /v1/tasks?dockerid=ID is the task of that container, 404 for a container in none.
func ecsAgent(t *testing.T, calls *atomic.Int32) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.URL.Path != "/v1/tasks" || r.URL.Query().Get("dockerid") != idA {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(`{"Arn":"arn:aws:ecs:us-east-1:012345678910:task/default/e01d58a8151b40e6a4b3bd9a6da2f8b5",
"DesiredStatus":"RUNNING","KnownStatus":"RUNNING","Family":"billing","Version":"3",
"Containers":[{"DockerId":"` + idB + `","DockerName":"ecs-billing-3-sidecar-a1","Name":"sidecar"},
{"DockerId":"` + idA + `","DockerName":"ecs-billing-3-app-b2","Name":"app","Networks":[{"NetworkMode":"awsvpc","IPv4Addresses":["10.0.1.5"]}]}]}`))
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestDockerAndECS(t *testing.T) {
	var calls atomic.Int32
	srv := ecsAgent(t, &calls)
	docker := t.TempDir()
	writeJSON(t, filepath.Join(docker, "containers", idA, "config.v2.json"), map[string]any{
		"ID": idA, "Name": "/ecs-billing-3-app-b2",
		"Config": map[string]any{"Image": "billing:3", "Labels": map[string]string{"maintainer": "x"}},
	})
	r := NewResolver(Sources{DockerData: docker, ECSAgent: srv.URL})
	got, ok := r.Lookup(idA, Docker)
	want := Info{ID: idA, Runtime: Docker, Name: "ecs-billing-3-app-b2", ECS: ECSTask{
		ARN: "arn:aws:ecs:us-east-1:012345678910:task/default/e01d58a8151b40e6a4b3bd9a6da2f8b5", Family: "billing", Container: "app"}}
	if !ok || got != want {
		t.Fatalf("Lookup = %+v, %v; want %+v", got, ok, want)
	}
	if got, _ := r.Lookup(idA, Docker); got != want || calls.Load() != 1 {
		t.Fatalf("second Lookup = %+v after %d calls; want the cached answer after 1", got, calls.Load())
	}
}

func TestDockerECSLabels(t *testing.T) {
	docker := t.TempDir()
	writeJSON(t, filepath.Join(docker, "containers", idA, "config.v2.json"), map[string]any{
		"Name": "/app", "Config": map[string]any{"Labels": map[string]string{
			"com.amazonaws.ecs.task-arn":                "arn:aws:ecs:us-east-1:012345678910:task/c/1",
			"com.amazonaws.ecs.task-definition-family":  "billing",
			"com.amazonaws.ecs.task-definition-version": "3",
			"com.amazonaws.ecs.container-name":          "app",
			"com.amazonaws.ecs.cluster":                 "c",
		}},
	})
	var calls atomic.Int32
	srv := ecsAgent(t, &calls)
	got, ok := NewResolver(Sources{DockerData: docker, ECSAgent: srv.URL}).Lookup(idA, "")
	if !ok || got.ECS != (ECSTask{ARN: "arn:aws:ecs:us-east-1:012345678910:task/c/1", Family: "billing", Container: "app"}) || got.Runtime != Docker {
		t.Fatalf("Lookup = %+v, %v", got, ok)
	}
	if calls.Load() != 0 {
		t.Fatalf("asked the ECS agent %d times although the labels said it all", calls.Load())
	}
}

func TestNoStateAndNoECSAgent(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close() // connection refused, as on a host without an ECS agent
	r := NewResolver(Sources{ContainerdTasks: t.TempDir(), DockerData: t.TempDir(), ECSAgent: url})
	if got, ok := r.Lookup(idA, Docker); ok || got != (Info{ID: idA, Runtime: Docker}) {
		t.Fatalf("Lookup = %+v, %v; want the id and runtime only", got, ok)
	}
}

func TestBadStateIgnored(t *testing.T) {
	root := t.TempDir()
	path := filepath.Join(root, "k8s.io", idA, "config.json")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(`{"annotations": [`), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, ok := NewResolver(Sources{ContainerdTasks: root}).Lookup(idA, ""); ok || got.Runtime != "" {
		t.Fatalf("Lookup of a truncated config.json = %+v, %v", got, ok)
	}
}

// The ECS agent hands each task its credentials id in the containers' environment;
// the resolver learns it from the runtime's state (Docker's config, the OCI bundle),
// and tells which task an id was handed to.
func TestECSCredentialsIDFromEnvironment(t *testing.T) {
	docker, tasks := t.TempDir(), t.TempDir()
	writeJSON(t, filepath.Join(docker, "containers", idA, "config.v2.json"), map[string]any{
		"Name": "/app", "Config": map[string]any{
			"Env": []string{"PATH=/bin", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/1111-aaaa"},
			"Labels": map[string]string{"com.amazonaws.ecs.task-arn": "arn:aws:ecs:us-east-1:012345678910:task/c/1",
				"com.amazonaws.ecs.task-definition-family": "billing"}},
	})
	writeJSON(t, filepath.Join(tasks, "moby", idB, "config.json"), map[string]any{
		"process": map[string]any{"env": []string{"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/2222-bbbb"}},
		"annotations": map[string]string{"com.amazonaws.ecs.task-arn": "arn:aws:ecs:us-east-1:012345678910:task/c/2",
			"com.amazonaws.ecs.task-definition-family": "web"},
	})
	r := NewResolver(Sources{DockerData: docker, ContainerdTasks: tasks})
	a, okA := r.Lookup(idA, Docker)
	b, okB := r.Lookup(idB, "")
	if !okA || !okB || a.ECS.CredentialsID != "1111-aaaa" || b.ECS.CredentialsID != "2222-bbbb" {
		t.Fatalf("credentials ids: %+v %+v", a.ECS, b.ECS)
	}
	if task, ok := r.ECSTaskOfCredentials("2222-bbbb"); !ok || task.ARN != "arn:aws:ecs:us-east-1:012345678910:task/c/2" {
		t.Fatalf("task of 2222-bbbb: %+v %v", task, ok)
	}
	if _, ok := r.ECSTaskOfCredentials("3333-cccc"); ok {
		t.Fatal("an id no container was handed has an owner")
	}
	for _, env := range [][]string{
		{"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v1/credentials?id=x"},
		{"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/"},
		{"X_AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/x"},
	} {
		if id := credentialsID(env); id != "" {
			t.Errorf("credentialsID(%q) = %q", env, id)
		}
	}
}
