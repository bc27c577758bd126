package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	"github.com/imdsguard/imdsguard/internal/agent/metrics/metricstest"
	"github.com/imdsguard/imdsguard/internal/agent/netns"
	"github.com/imdsguard/imdsguard/internal/agent/status"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// These tests run real containers (Debian's runc, internal/testing/testbed's
// StartContainer) with the annotations, labels and cgroups Kubernetes' CRI and the ECS
// agent give them, each in a network namespace of its own, against the agent binary.

const imdsInstanceID = "http://169.254.169.254/latest/meta-data/instance-id"

// getResult is what `imds-client get` printed, or the connection error it exited with.
type getResult struct {
	PID    int
	Status int
	Err    string
}

func containerGet(t *testing.T, c *testbed.Container, url string) getResult {
	t.Helper()
	r := c.Exec(context.Background(), "/imds-client", "get", url)
	var g getResult
	if r.Err != nil {
		g.Err = r.Err.Error()
	} else if err := json.Unmarshal([]byte(r.Output), &g); err != nil {
		t.Fatalf("imds-client get printed %q: %v", r.Output, err)
	}
	g.PID = r.PID
	return g
}

// until retries get in c until ok says its result is the one wanted: rules on pods are
// resolved to the cgroups of the pods that exist, after the pod starts. It fails the
// test after 15 s with the last result.
func until(t *testing.T, c *testbed.Container, url, what string, ok func(getResult) bool) getResult {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		g := containerGet(t, c, url)
		if ok(g) {
			return g
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: last GET in the container: %+v", what, g)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// served connects from c to IMDS until the agent's status lists c's network namespace:
// a namespace's first connections may get containers.fallback before it is served
// (and a namespace whose connecting process exited before the agent entered it is
// tried again at a connect 5 s later). It returns the namespace's endpoint.
func served(t *testing.T, agent *testbed.AgentProc, c *testbed.Container) netns.Endpoint {
	t.Helper()
	ino := c.Netns.Inode()
	deadline := time.Now().Add(20 * time.Second)
	for {
		containerGet(t, c, imdsInstanceID)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		r, err := status.Fetch(ctx, agent.StatusSocket)
		cancel()
		if err == nil {
			for _, ep := range r.Namespaces {
				if ep.Inode == ino {
					return ep
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("namespace %d of container %s never served (%v)\n%s", ino, c.ID, err, agent.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// requestOf waits for the imds_request line of pid.
func requestOf(t *testing.T, a *testbed.AgentProc, pid int) testbed.Event {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		events, err := a.Events()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range events {
			if e.Event == "imds_request" && e.PID == pid {
				return e
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no imds_request line for pid %d\n%s", pid, a.Log())
		}
	}
}

// fingerprints reads the agent's fingerprint lines.
func fingerprints(t *testing.T, a *testbed.AgentProc) []wire.Fingerprint {
	t.Helper()
	f, err := os.Open(a.FingerprintsPath)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []wire.Fingerprint
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var fp wire.Fingerprint
		if err := json.Unmarshal(sc.Bytes(), &fp); err != nil {
			t.Fatalf("fingerprint line %q: %v", sc.Bytes(), err)
		}
		out = append(out, fp)
	}
	return out
}

func waitFingerprintOf(t *testing.T, a *testbed.AgentProc, keyID string) wire.Fingerprint {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		for _, fp := range fingerprints(t, a) {
			if fp.AccessKeyID == keyID {
				return fp
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no fingerprint of %s\n%s", keyID, a.Log())
		}
	}
}

// neverDirect fails the test if a connection the rule named requires IMDSv2 for went
// straight to IMDS: such a connection is brokered or refused, never sent direct.
func neverDirect(t *testing.T, a *testbed.AgentProc, rule string) {
	t.Helper()
	events, err := a.Events()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range events {
		if e.Event == "imds_connect" && e.Rule == rule && e.Verdict == "allow" && !e.Redirected {
			t.Errorf("a connection of rule %s (IMDSv2 required) went direct: %+v", rule, e)
		}
	}
}

// TestPrivilegedContainersPolicyByPod: IMDSv2 required for one pod's container and not
// another's, a third pod's namespace denied; each connection brokered inside its own
// container's network namespace and attributed to its pod.
func TestPrivilegedContainersPolicyByPod(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{ContainerView: true})
	const promAddr = "127.0.0.1:9775"
	agent, err := bed.StartAgent(`mode: enforce
default_action: allow
rules:
  - {name: payments, pod_namespace: payments, action: allow, imdsv2: required}
  - {name: sandbox, pod_namespace: sandbox, action: deny}
metrics:
  interval: 1s
  prometheus:
    listen: ` + promAddr + "\n")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	start := func(ns, name string) *testbed.Container {
		c, err := bed.StartContainer(ctx, testbed.ContainerSpec{Pod: &testbed.Pod{Namespace: ns, Name: name, Container: "app", ServiceAccount: "app"}})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	pay, shop, sandbox := start("payments", "api-0"), start("shop", "web-0"), start("sandbox", "job-0")

	// payments: IMDSv1 is refused by the broker in the container's namespace, with IMDS's
	// own answer to a token-less request when tokens are required.
	v1 := until(t, pay, imdsInstanceID, "payments' IMDSv1 refused with 401", func(g getResult) bool { return g.Status == 401 })
	e := requestOf(t, agent, v1.PID)
	if e.Refused != "imdsv2_required" || e.PodNamespace != "payments" || e.Pod != "api-0" || e.Netns == 0 {
		t.Errorf("payments' IMDSv1 request line %+v: want refused imdsv2_required, pod payments/api-0, its netns", e)
	}
	// Its IMDSv2 client gets credentials, fingerprinted with its pod.
	r := pay.Exec(ctx, "/imds-client", "sdk")
	if r.Err != nil || !strings.Contains(r.Output, bed.Creds.AccessKeyID) {
		t.Fatalf("payments' IMDSv2 client: %q %v", r.Output, r.Err)
	}
	fp := waitFingerprintOf(t, agent, bed.Creds.AccessKeyID)
	if fp.Process.Pod == nil || fp.Process.Pod.Namespace != "payments" || fp.Process.Pod.Name != "api-0" ||
		fp.Process.Pod.ServiceAccount != "app" || fp.Process.ContainerID != pay.ID || fp.IMDSVersion != "v2" {
		t.Errorf("fingerprint %+v: want pod payments/api-0 (service account app), container %s, v2", fp.Process, pay.ID)
	}

	// shop: IMDSv1 allowed, brokered in its own namespace, counted as MetadataNoToken.
	shopEP := served(t, agent, shop)
	g := containerGet(t, shop, imdsInstanceID)
	if g.Status != 200 {
		t.Fatalf("shop's IMDSv1: %+v", g)
	}
	e = requestOf(t, agent, g.PID)
	if e.IMDSVersion != "v1" || e.Status != 200 || e.PodNamespace != "shop" || e.Pod != "web-0" ||
		e.ContainerID != shop.ID || e.ContainerRuntime != "containerd" || e.Netns != shopEP.Cookie {
		t.Errorf("shop's request line %+v: want v1 200 from pod shop/web-0 (containerd %s) in its netns", e, shop.ID)
	}
	payNetns := requestOf(t, agent, v1.PID).Netns
	if e.Netns == payNetns {
		t.Errorf("shop and payments share network namespace %d", e.Netns)
	}
	waitNoToken(t, bed, agent, "http://"+promAddr+"/metrics")
	// Per container, the workload: shop's IMDSv1, payments' refusal.
	fams, err := metricstest.Scrape(bed.HTTPClient(), "http://"+promAddr+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := metricstest.Counter(fams, "imdsguard_metadata_no_token_by_container_total", "container", "pod/shop/web-0/app"); v < 1 {
		t.Errorf("MetadataNoToken{container=pod/shop/web-0/app} = %v, want at least 1", v)
	}
	if v, _ := metricstest.Counter(fams, "imdsguard_metadata_no_token_rejected_by_container_total", "container", "pod/payments/api-0/app"); v < 1 {
		t.Errorf("MetadataNoTokenRejected{container=pod/payments/api-0/app} = %v, want at least 1", v)
	}
	// And `imdsguard status` has a row for the pod's workload.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	rep, err := status.Fetch(ctx2, agent.StatusSocket)
	cancel2()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(rep.Processes, func(p metrics.ProcessStats) bool { return p.Container == "pod/shop/web-0/app" && p.V1 > 0 }) {
		t.Errorf("status has no IMDSv1 row for container pod/shop/web-0/app: %+v", rep.Processes)
	}

	// sandbox: denied by its pod namespace, as a refused connection.
	d := until(t, sandbox, imdsInstanceID, "sandbox denied", func(g getResult) bool { return g.Err != "" })
	if !strings.Contains(d.Err, "connection refused") {
		t.Errorf("sandbox: %s, want connection refused", d.Err)
	}
	neverDirect(t, agent, "payments")
}

// waitNoToken waits until Prometheus' MetadataNoToken counts every IMDSv1 request
// answered (the request lines say how many).
func waitNoToken(t *testing.T, bed *testbed.Bed, agent *testbed.AgentProc, url string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		want := countV1(t, agent)
		fams, err := metricstest.Scrape(bed.HTTPClient(), url)
		if err == nil {
			got, _ := metricstest.Counter(fams, metrics.PromName(metrics.MetadataNoToken), "", "")
			if got == float64(want) && want > 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("MetadataNoToken = %v, want %d", got, want)
			}
		} else if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
}

// TestPrivilegedContainersNamespaceBeforeAgent: a pod whose namespace (and process)
// existed before the agent started gets the fallback at worst for its first connection,
// and the broker from then on; a pod that starts and connects at once is answered
// (brokered, served as runc forks its init, or at worst the fallback when the agent loses
// that race: TestPrivilegedContainerDiscoveredBeforeFirstConnect), and a v2-required one
// never goes direct.
func TestPrivilegedContainersNamespaceBeforeAgent(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{ContainerView: true})
	ctx := context.Background()
	early, err := bed.StartContainer(ctx, testbed.ContainerSpec{Pod: &testbed.Pod{Namespace: "shop", Name: "early-0", Container: "app"}})
	if err != nil {
		t.Fatal(err)
	}
	agent, err := bed.StartAgent("mode: enforce\ndefault_action: allow\ncontainers:\n  fallback: direct\n" +
		"rules:\n  - {name: payments, pod_namespace: payments, action: allow, imdsv2: required}\n")
	if err != nil {
		t.Fatal(err)
	}
	// The first connections get the fallback (direct) or the broker; either answers.
	if first := containerGet(t, early, imdsInstanceID); first.Status != 200 {
		t.Fatalf("first GET from a namespace older than the agent: %+v", first)
	}
	ep := served(t, agent, early)
	for i := 0; i < 3; i++ {
		g := containerGet(t, early, imdsInstanceID)
		if g.Status != 200 {
			t.Fatalf("GET %d after the namespace was served: %+v", i, g)
		}
		// Once served, every connection is brokered: its request line is the broker's.
		if e := requestOf(t, agent, g.PID); e.Netns != ep.Cookie || e.PodNamespace != "shop" {
			t.Errorf("GET %d after the namespace was served: %+v, want brokered in namespace %d", i, e, ep.Cookie)
		}
	}

	// Start-and-connect: the container's first process connects at once.
	for i := 0; i < 3; i++ {
		c, r := bed.RunContainer(ctx, testbed.ContainerSpec{
			Pod:  &testbed.Pod{Namespace: "shop", Name: fmt.Sprintf("quick-%d", i), Container: "app"},
			Args: []string{"/imds-client", "get", imdsInstanceID},
		})
		if r.Err != nil || !strings.Contains(r.Output, `"status":200`) {
			t.Errorf("container that connects at once: %q %v", r.Output, r.Err)
		}
		_ = c.Remove()
	}
	// A v2-required pod started after the agent, connecting at once and again: never
	// direct (refused until its rule and endpoint exist, brokered after).
	pay, err := bed.StartContainer(ctx, testbed.ContainerSpec{Pod: &testbed.Pod{Namespace: "payments", Name: "api-0", Container: "api"},
		Args: []string{"/imds-client", "touch-sleep"}})
	if err != nil {
		t.Fatal(err)
	}
	until(t, pay, imdsInstanceID, "payments' IMDSv1 refused with 401", func(g getResult) bool { return g.Status == 401 })
	neverDirect(t, agent, "payments")
}

// TestPrivilegedContainersEndpointRemoved: the broker endpoint of a container goes
// when the container ends, and its network namespace is freed (the agent holds no
// reference to it).
func TestPrivilegedContainersEndpointRemoved(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{ContainerView: true})
	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	c, err := bed.StartContainer(ctx, testbed.ContainerSpec{Pod: &testbed.Pod{Namespace: "shop", Name: "web-0", Container: "app"}})
	if err != nil {
		t.Fatal(err)
	}
	served(t, agent, c)
	if ep := waitNamespaces(t, agent, 1).Namespaces[0]; ep.PID != c.PID {
		t.Errorf("endpoint watches pid %d, want the container's first process %d", ep.PID, c.PID)
	}
	if err := c.Remove(); err != nil {
		t.Fatal(err)
	}
	waitNamespaces(t, agent, 0)
	for deadline := time.Now().Add(5 * time.Second); !c.Netns.Freed(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the container's network namespace is still alive after its endpoint was removed\n%s", agent.Log())
		}
	}
	if !strings.Contains(agent.Log(), `"event":"netns_endpoint_removed"`) {
		t.Errorf("no netns_endpoint_removed in the log")
	}
}

// TestPrivilegedContainersTaskCredentials: an ECS task's and an EKS pod's credential
// fetches through the stand-ins of their endpoints, brokered from inside the
// containers: request lines and fingerprints name the endpoint, the task or pod and the
// role; no credentials id, token or secret is written anywhere; another task's
// credentials id is refused (enforce) and counted.
func TestPrivilegedContainersTaskCredentials(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{ContainerView: true, CredentialEndpoints: true})
	const promAddr = "127.0.0.1:9775"
	agent, err := bed.StartAgent(`mode: enforce
default_action: allow
endpoints:
  - kind: imds
  - kind: ecs
  - kind: pod_identity
metrics:
  interval: 1s
  prometheus:
    listen: ` + promAddr + "\n")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	task, err := bed.StartContainer(ctx, testbed.ContainerSpec{ECS: &testbed.ECSTask{Family: "billing", Container: "app"}})
	if err != nil {
		t.Fatal(err)
	}
	other, err := bed.StartContainer(ctx, testbed.ContainerSpec{ECS: &testbed.ECSTask{Family: "reports", Container: "app"}})
	if err != nil {
		t.Fatal(err)
	}
	pod, err := bed.StartContainer(ctx, testbed.ContainerSpec{Pod: &testbed.Pod{Namespace: "payments", Name: "api-0",
		Container: "api", ServiceAccount: "api", PodIdentity: true}})
	if err != nil {
		t.Fatal(err)
	}

	for _, c := range []*testbed.Container{task, pod} {
		served(t, agent, c)
	}
	// ECS: the SDK's default chain in the task's container.
	r := task.Exec(ctx, "/imds-client", "creds-container")
	if r.Err != nil || !strings.Contains(r.Output, task.Creds.AccessKeyID) {
		t.Fatalf("ECS credentials in the task: %q %v", r.Output, r.Err)
	}
	e := requestOf(t, agent, r.PID)
	if e.Endpoint != "ecs" || e.Path != "/v2/credentials/REDACTED" || e.Status != 200 || e.ECSTaskFamily != "billing" ||
		e.ECSTaskARN != task.ECS.ARN() || e.ECSContainer != "app" || e.Netns == 0 {
		t.Errorf("ECS request line %+v: want endpoint ecs, redacted path, task billing %s, its netns", e, task.ECS.ARN())
	}
	fp := waitFingerprintOf(t, agent, task.Creds.AccessKeyID)
	if fp.Endpoint != "ecs" || fp.RoleARN != task.Creds.RoleArn || fp.Process.ECSTask == nil || fp.Process.ECSTask.ARN != task.ECS.ARN() {
		t.Errorf("ECS fingerprint %+v: want endpoint ecs, role %s, task %s", fp, task.Creds.RoleArn, task.ECS.ARN())
	}

	// Pod Identity: the SDK's default chain with the pod's token file.
	r = pod.Exec(ctx, "/imds-client", "creds-container")
	if r.Err != nil || !strings.Contains(r.Output, pod.Creds.AccessKeyID) {
		t.Fatalf("Pod Identity credentials in the pod: %q %v", r.Output, r.Err)
	}
	e = requestOf(t, agent, r.PID)
	if e.Endpoint != "pod_identity" || e.Path != "/v1/credentials" || e.Status != 200 || e.PodNamespace != "payments" || e.Pod != "api-0" {
		t.Errorf("Pod Identity request line %+v", e)
	}
	fp = waitFingerprintOf(t, agent, pod.Creds.AccessKeyID)
	if fp.Endpoint != "pod_identity" || fp.Process.Pod == nil || fp.Process.Pod.Name != "api-0" || fp.Process.Pod.ServiceAccount != "api" {
		t.Errorf("Pod Identity fingerprint %+v", fp)
	}

	// Another task's credentials id, asked for from this task: 403, counted, nothing
	// sent to the endpoint. (The agent knows whose id it is once that task's container
	// has been looked up: here, after its own fetch.)
	served(t, agent, other)
	if r := other.Exec(ctx, "/imds-client", "creds-container"); r.Err != nil {
		t.Fatalf("ECS credentials in the other task: %v", r.Err)
	}
	seen := len(bed.ECS().Seen())
	g := containerGet(t, task, "http://169.254.170.2/v2/credentials/"+other.ECS.CredentialsID)
	if g.Status != 403 {
		t.Errorf("another task's credentials id: %+v, want 403", g)
	}
	if e := requestOf(t, agent, g.PID); e.ForeignTask != other.ECS.ARN() || e.Refused == "" {
		t.Errorf("foreign request line %+v: want foreign_task_arn %s, refused", e, other.ECS.ARN())
	}
	if n := len(bed.ECS().Seen()); n != seen {
		t.Errorf("the ECS endpoint saw %d more requests: a refused one was forwarded", n-seen)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		fams, err := metricstest.Scrape(bed.HTTPClient(), "http://"+promAddr+"/metrics")
		if err == nil {
			if v, _ := metricstest.Counter(fams, metrics.PromName(metrics.ForeignTaskCredentials), "", ""); v == 1 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("ForeignTaskCredentials never reached 1 (%v)", err)
		}
	}

	// No secret anywhere the agent writes.
	events, _ := os.ReadFile(agent.EventsPath)
	fps, _ := os.ReadFile(agent.FingerprintsPath)
	for _, c := range []*testbed.Container{task, other, pod} {
		secrets := []string{c.Creds.SecretAccessKey, c.Creds.Token}
		if c.ECS != nil {
			secrets = append(secrets, c.ECS.CredentialsID)
		}
		for _, s := range secrets {
			for name, text := range map[string]string{"events": string(events), "fingerprints": string(fps), "log": agent.Log()} {
				if strings.Contains(text, s) {
					t.Errorf("a secret of %s is in the agent's %s", c.ID, name)
				}
			}
		}
	}
	if tok := bed.PodIdentity().Seen(); len(tok) == 0 || slices.ContainsFunc(
		[]string{string(events), string(fps), agent.Log()}, func(s string) bool { return strings.Contains(s, tok[0].Authorization) }) {
		t.Errorf("the Pod Identity token is in the agent's output (or the endpoint saw no request)")
	}
}
