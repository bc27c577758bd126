package testbed_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedContainers runs real runc containers in the bed, without an agent: a
// pod's reaches IMDS and its Pod Identity credentials, an ECS task's its task
// credentials, each from its own namespace; everything goes with the container.
func TestPrivilegedContainers(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{ContainerView: true, CredentialEndpoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	pod, r := bed.RunContainer(ctx, testbed.ContainerSpec{
		Pod:  &testbed.Pod{Namespace: "payments", Name: "api-0", Container: "api", ServiceAccount: "api", PodIdentity: true},
		Args: []string{"/imds-client", "get", "http://169.254.169.254/latest/meta-data/instance-id"},
	})
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	var got struct{ Status int }
	if err := json.Unmarshal([]byte(r.Output), &got); err != nil || got.Status != 200 || r.PID <= 0 {
		t.Fatalf("IMDS from a pod: %q %v, pid %d", r.Output, err, r.PID)
	}
	if _, err := os.Stat(filepath.Join(testbed.ContainerdTasks, bed.Name, pod.ID, "config.json")); err != nil {
		t.Errorf("the pod's bundle is not where containerd keeps it: %v", err)
	}

	for _, spec := range []testbed.ContainerSpec{
		{Pod: &testbed.Pod{Namespace: "payments", Name: "api-1", Container: "api", ServiceAccount: "api", PodIdentity: true}},
		{ECS: &testbed.ECSTask{Family: "billing", Container: "app"}},
	} {
		c, err := bed.StartContainer(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(c.Cgroup); err != nil {
			t.Fatalf("container cgroup: %v", err)
		}
		r := c.Exec(ctx, "/imds-client", "creds-container")
		if r.Err != nil || !strings.Contains(r.Output, c.Creds.AccessKeyID) {
			t.Fatalf("credentials in the container: %q %v, want %s", r.Output, r.Err, c.Creds.AccessKeyID)
		}
		if err := c.Remove(); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(5 * time.Second); !c.Netns.Freed(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("namespace %s not freed after the container ended", c.Netns.Name)
			}
		}
		if _, err := os.Stat(c.Cgroup); !os.IsNotExist(err) {
			t.Errorf("container cgroup still there: %v", err)
		}
	}
	if n := len(bed.ECS().Seen()); n != 1 {
		t.Errorf("ECS stand-in answered %d requests, want 1", n)
	}
}
