package metrics

import (
	"context"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/containers"
	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/agent/metrics/metricstest"
)

var testContainerID = "0123456789ab" + strings.Repeat("cd", 26)

func TestContainerValue(t *testing.T) {
	for _, c := range []struct {
		name string
		in   containers.Info
		want string
	}{
		{"no container", containers.Info{}, Host},
		{"deployment pod", containers.Info{ID: testContainerID, Runtime: containers.Containerd,
			Pod: containers.Pod{Namespace: "shop", Name: "web-7d9f8b6c5d-x2x7k", UID: "u", Container: "app", ServiceAccount: "web"}},
			"pod/shop/web/app"},
		{"pod without container name", containers.Info{ID: testContainerID,
			Pod: containers.Pod{Namespace: "kube-system", Name: "aws-node-zq4xv"}}, "pod/kube-system/aws-node"},
		{"ecs task", containers.Info{ID: testContainerID, Runtime: containers.Docker, Name: "ecs-billing-3-api-e0c2a1",
			ECS: containers.ECSTask{ARN: "arn:aws:ecs:eu-west-1:1:task/c/abc", Family: "billing", Container: "api"}},
			"ecs/billing/api"},
		{"ecs task, container unknown", containers.Info{ID: testContainerID, ECS: containers.ECSTask{Family: "billing"}}, "ecs/billing"},
		{"named docker container", containers.Info{ID: testContainerID, Runtime: containers.Docker, Name: "shop-db-1"}, "docker/shop-db-1"},
		{"unnamed containerd container", containers.Info{ID: testContainerID, Runtime: containers.Containerd}, "containerd/0123456789ab"},
		{"runtime unknown", containers.Info{ID: testContainerID}, "container/0123456789ab"},
	} {
		if got := ContainerValue(c.in); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

// The workload is the pod name without what the controllers add, and only that.
func TestWorkload(t *testing.T) {
	for pod, want := range map[string]string{
		"web-7d9f8b6c5d-x2x7k":              "web",          // Deployment: hash and random suffix
		"payments-api-5c98db65d4-bq2lz":     "payments-api", // hyphens in the Deployment's name
		"aws-node-zq4xv":                    "aws-node",     // DaemonSet
		"backup-28912345-kx7vh":             "backup",       // CronJob: schedule time
		"db-0":                              "db-0",         // StatefulSet: stable
		"debug-shell":                       "debug-shell",  // by hand
		"kube-proxy-ip-10-0-1-2":            "kube-proxy-ip-10-0-1-2",
		"node-exporter":                     "node-exporter", // "exporter" has vowels: no suffix
		"fluent-bit-abcde":                  "fluent-bit-abcde",
		"coredns-5d78c9869d-9mdbh":          "coredns",
		"etcd-ip-10-0-1-2.ec2.internal":     "etcd-ip-10-0-1-2.ec2.internal", // static pod
		"job-with-random-suffix-only-xk2vb": "job-with-random-suffix-only",
		"-x2x7k":                            "-x2x7k", // nothing before the suffix
		"report-28912345":                   "report-28912345",
		"x2x7k":                             "x2x7k",
	} {
		if got := Workload(pod); got != want {
			t.Errorf("Workload(%q) = %q, want %q", pod, got, want)
		}
	}
}

func TestPodNamespace(t *testing.T) {
	for v, want := range map[string]string{"pod/shop/web/app": "shop", "pod/kube-system/aws-node": "kube-system",
		"ecs/billing/api": "", Host: "", Other: "", "docker/pod": ""} {
		if got := PodNamespace(v); got != want {
			t.Errorf("PodNamespace(%q) = %q, want %q", v, got, want)
		}
	}
}

// Per container, as per executable: the counts of every process in it, capped with the
// IMDSv1 users first, the rest summed as other, and a process whose cgroup is unknown
// counted as unknown, not as the host.
func TestAggregatorByContainer(t *testing.T) {
	a := NewAggregator(3, 100)
	pods := make([]string, 10)
	for i := range pods {
		pods[i] = ContainerValue(containers.Info{ID: testContainerID,
			Pod: containers.Pod{Namespace: "ns", Name: fmt.Sprintf("svc%d-7d9f8b6c5d-x2x7k", i), Container: "app"}})
		// Busy IMDSv2 workloads, two processes each.
		a.Observe(Observation{Kind: MetadataWithToken, Exe: "/app", User: "root", Container: pods[i], Count: uint64(100 + i)})
		a.Observe(Observation{Kind: MetadataWithToken, Exe: "/sidecar", User: "1337", Container: pods[i], Count: 1})
	}
	// The same workload's next pod (a restart) is the same value.
	again := ContainerValue(containers.Info{ID: testContainerID,
		Pod: containers.Pod{Namespace: "ns", Name: "svc0-7d9f8b6c5d-p5wtr", Container: "app"}})
	a.Observe(Observation{Kind: MetadataWithToken, Exe: "/app", User: "root", Container: again, Count: 5})
	// A rare IMDSv1 caller on the host, a denied one in an ECS task, one of unknown cgroup.
	a.Observe(Observation{Kind: MetadataNoToken, Exe: "/usr/bin/curl", User: "root", Container: Host})
	a.Observe(Observation{Kind: MetadataDenied, Exe: "/bin/sh", User: "root", Container: "ecs/billing/api"})
	a.Observe(Observation{Kind: MetadataWithToken, Exe: "/gone", User: "root"})
	s := a.Flush(time.Now())

	if len(s.ByContainer) != 4 || s.ByContainer[3].Value != Other {
		t.Fatalf("capped: %+v", s.ByContainer)
	}
	// The IMDSv1 and denied ones first (tie: by name), then the busiest IMDSv2 workload.
	if got := []string{s.ByContainer[0].Value, s.ByContainer[1].Value, s.ByContainer[2].Value}; got[0] != "ecs/billing/api" ||
		got[1] != Host || got[2] != "pod/ns/svc9/app" {
		t.Errorf("ranking %v", got)
	}
	var sum uint64
	for _, sr := range s.ByContainer {
		sum += sr.Counts[MetadataWithToken]
	}
	if sum != s.Totals[MetadataWithToken] {
		t.Errorf("containers sum to %d, total %d", sum, s.Totals[MetadataWithToken])
	}

	// Uncapped, the restart joins its workload and the unknown cgroup is its own value.
	a = NewAggregator(20, 100)
	a.Observe(Observation{Kind: MetadataWithToken, Exe: "/app", User: "root", Container: pods[0], Count: 2})
	a.Observe(Observation{Kind: MetadataWithToken, Exe: "/app", User: "root", Container: again, Count: 5})
	a.Observe(Observation{Kind: MetadataWithToken, Exe: "/gone", User: "root"})
	got := map[string]uint64{}
	for _, sr := range a.Flush(time.Now()).ByContainer {
		got[sr.Value] = sr.Counts[MetadataWithToken]
	}
	if len(got) != 2 || got["pod/ns/svc0/app"] != 7 || got[Unknown] != 1 {
		t.Errorf("by container %v", got)
	}
}

// The by-container families carry the container and, for a pod, its namespace, bounded
// over the agent's life like the executable label.
func TestPrometheusByContainer(t *testing.T) {
	p := NewPrometheus(2, zerolog.Nop())
	srv := httptest.NewServer(p.Handler())
	defer srv.Close()
	a := NewAggregator(20, 100)
	a.Observe(Observation{Kind: MetadataNoToken, Exe: "/app", User: "root", Container: "pod/shop/web/app", Count: 2})
	a.Observe(Observation{Kind: MetadataWithToken, Exe: "/bin/x", User: "root", Container: Host})
	if err := p.Publish(context.Background(), a.Flush(time.Now()), hostid.Identity{}, false); err != nil {
		t.Fatal(err)
	}
	a.Observe(Observation{Kind: MetadataWithToken, Exe: "/app", User: "root", Container: "pod/shop/web/app"})
	a.Observe(Observation{Kind: MetadataWithToken, Exe: "/srv", User: "root", Container: "ecs/billing/api"}) // over the limit
	if err := p.Publish(context.Background(), a.Flush(time.Now()), hostid.Identity{}, false); err != nil {
		t.Fatal(err)
	}
	fams, err := metricstest.Scrape(srv.Client(), srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	type series struct{ container, ns string }
	got := map[string]map[series]float64{}
	for _, name := range []string{"imdsguard_metadata_no_token_by_container_total", "imdsguard_metadata_with_token_by_container_total"} {
		got[name] = map[series]float64{}
		for _, m := range fams[name].GetMetric() {
			var s series
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "container":
					s.container = l.GetValue()
				case "pod_namespace":
					s.ns = l.GetValue()
				}
			}
			got[name][s] = m.GetCounter().GetValue()
		}
	}
	if v1 := got["imdsguard_metadata_no_token_by_container_total"]; len(v1) != 1 || v1[series{"pod/shop/web/app", "shop"}] != 2 {
		t.Errorf("no_token by container %v", v1)
	}
	v2 := got["imdsguard_metadata_with_token_by_container_total"]
	if len(v2) != 3 || v2[series{"pod/shop/web/app", "shop"}] != 1 || v2[series{Host, ""}] != 1 || v2[series{Other, ""}] != 1 {
		t.Errorf("with_token by container %v", v2)
	}
}

// ContainerValue runs for every counted observation of a process in a pod.
func BenchmarkContainerValue(b *testing.B) {
	pod := containers.Info{ID: testContainerID, Runtime: containers.Containerd,
		Pod: containers.Pod{Namespace: "shop", Name: "web-7d9f8b6c5d-x2x7k", Container: "app"}}
	b.ReportAllocs()
	for b.Loop() {
		_ = ContainerValue(pod)
	}
}
