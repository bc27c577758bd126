package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/status"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// containersPolicy requires IMDSv2 from the payments pods and guards the ECS task
// credential endpoint too.
const containersPolicy = `mode: enforce
default_action: allow
endpoints:
  - kind: imds
  - kind: ecs
rules:
  - {name: payments-v2, pod_namespace: payments, action: allow, imdsv2: required}
`

// containersTable runs a Kubernetes pod's container and an ECS task's (real runc
// containers, each in its own network namespace) under an agent with
// containersPolicy: the pod's IMDSv1 is refused in its own namespace, its IMDSv2
// fetch and the task's credential fetch are attributed to the pod and the task.
func containersTable(ctx context.Context, bed *testbed.Bed) ([]string, [][]string, error) {
	agent, err := bed.StartAgent(containersPolicy)
	if err != nil {
		return nil, nil, err
	}
	defer agent.Stop()
	pod, err := bed.StartContainer(ctx, testbed.ContainerSpec{Pod: &testbed.Pod{Namespace: "payments", Name: "api-0", Container: "api", ServiceAccount: "api"}})
	if err != nil {
		return nil, nil, err
	}
	task, err := bed.StartContainer(ctx, testbed.ContainerSpec{ECS: &testbed.ECSTask{Family: "billing", Container: "app"}})
	if err != nil {
		return nil, nil, err
	}
	type step struct {
		c        *testbed.Container
		how      string
		argv     []string
		wantsHit func(string) bool // the run's output once the policy has caught up
	}
	imds := "http://169.254.169.254/latest/meta-data/instance-id"
	steps := []step{
		{pod, "IMDSv1 GET", []string{"/imds-client", "get", imds}, func(o string) bool { return strings.Contains(o, `"status":401`) }},
		{pod, "aws-sdk-go-v2 (IMDSv2)", []string{"/imds-client", "sdk"}, nil},
		{task, "SDK default chain (ECS)", []string{"/imds-client", "creds-container"}, nil},
	}
	// A container's namespace is served from its first connection on (which may get
	// containers.fallback), and pod rules follow new pods within the policy interval.
	for _, c := range []*testbed.Container{pod, task} {
		if err := waitServed(ctx, agent, c); err != nil {
			return nil, nil, err
		}
	}
	var pids []int
	for _, s := range steps {
		r := s.c.Exec(ctx, s.argv...)
		for deadline := time.Now().Add(15 * time.Second); s.wantsHit != nil && !s.wantsHit(r.Output) && time.Now().Before(deadline); {
			time.Sleep(200 * time.Millisecond)
			r = s.c.Exec(ctx, s.argv...)
		}
		if r.Err != nil {
			return nil, nil, r.Err
		}
		pids = append(pids, r.PID)
	}
	if _, err := agent.WaitEvents(pids...); err != nil {
		return nil, nil, err
	}
	if err := agent.Stop(); err != nil {
		return nil, nil, fmt.Errorf("agent did not stop cleanly: %w", err)
	}
	events, err := agent.Events()
	if err != nil {
		return nil, nil, err
	}
	header := []string{"CONTAINER", "PID", "HOW", "ENDPOINT", "REQUESTS (version status)", "ATTRIBUTED TO", "NETNS"}
	var rows [][]string
	for i, s := range steps {
		var reqs []string
		who, endpoint, netns := "", "", ""
		for _, e := range events {
			if e.PID != pids[i] || e.Event != "imds_request" {
				continue
			}
			r := fmt.Sprintf("%s %d", e.IMDSVersion, e.Status)
			if e.IMDSVersion == "" {
				r = fmt.Sprintf("%s %d", e.Path, e.Status)
			}
			if e.Refused != "" {
				r += " refused: " + e.Refused
			}
			reqs = append(reqs, strings.TrimSpace(r))
			endpoint, netns = e.Endpoint, strconv.FormatUint(e.Netns, 10)
			switch {
			case e.Pod != "":
				who = fmt.Sprintf("pod %s/%s (container %s, service account %s)", e.PodNamespace, e.Pod, e.PodContainer, e.ServiceAccount)
			case e.ECSTaskARN != "":
				who = fmt.Sprintf("task %s (family %s, container %s)", e.ECSTaskARN, e.ECSTaskFamily, e.ECSContainer)
			}
		}
		name := s.c.ID[:12]
		rows = append(rows, []string{name, strconv.Itoa(pids[i]), s.how, endpoint, strings.Join(reqs, ", "), who, netns})
	}
	return header, rows, nil
}

// waitServed connects from c until the agent's status lists c's network namespace.
func waitServed(ctx context.Context, agent *testbed.AgentProc, c *testbed.Container) error {
	ino := c.Netns.Inode()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		c.Exec(ctx, "/imds-client", "get", "http://169.254.169.254/latest/meta-data/instance-id")
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		r, err := status.Fetch(sctx, agent.StatusSocket)
		cancel()
		if err != nil {
			continue
		}
		for _, ep := range r.Namespaces {
			if ep.Inode == ino {
				return nil
			}
		}
	}
	return fmt.Errorf("container %s: its network namespace was never served", c.ID)
}
