package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// restartPolicy: failure_mode open, so that a lapse into the failure mode shows as
// IMDSv1 answered to the v2-required user.
const imdsURL = "http://169.254.169.254/latest/meta-data/instance-id"

const restartPolicy = "mode: enforce\nfailure_mode: open\ndefault_action: allow\nrules:\n  - name: nobody-v2\n    user: nobody\n    action: allow\n    imdsv2: required\n"

// restarts restarts the agent rounds times gracefully (SIGTERM, then a new agent) and
// rounds times after SIGKILL, with the broker's listeners in an emulated systemd file
// descriptor store, while an allowed client (root, IMDSv1) and a v2-required one
// (nobody: IMDSv1 and an X-Forwarded-For token PUT) loop through it. Goals (issue 16):
// 0 allowed requests refused or hung, 0 answered to the v2-required client, 0 connections
// judged under the failure mode; after SIGKILL, policy enforced through the broker
// within 500 ms of the new agent starting.
func restarts(bed *testbed.Bed, rounds int) error {
	store, err := testbed.NewFDStore(bed.Dir)
	if err != nil {
		return err
	}
	defer store.Close()
	if err := os.Setenv("NOTIFY_SOCKET", store.Socket); err != nil {
		return err
	}
	defer os.Unsetenv("NOTIFY_SOCKET")
	agent, err := bed.StartAgentFiles(restartPolicy, nil)
	if err != nil {
		return err
	}
	defer func() { _ = agent.Stop() }()
	for deadline := time.Now().Add(5 * time.Second); len(store.Held()) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			return errors.New("the agent stored no broker listener")
		}
	}

	var allowed, v2, v2Answered atomic.Int64
	var allowedFailed [2]atomic.Int64 // during the graceful restarts, the SIGKILL ones
	var phase atomic.Int32
	stop := make(chan struct{})
	var wg sync.WaitGroup
	curl := func(p testbed.Placement, args ...string) int {
		r := bed.RunCommand(context.Background(), "curl", "", p, append([]string{"curl", "-sf", "-m", "3"}, args...)...)
		var ee *exec.ExitError
		if errors.As(r.Err, &ee) {
			return ee.ExitCode()
		}
		if r.Err != nil {
			return -1
		}
		return 0
	}
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}
	loop := func(f func()) {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
					f()
				}
			}
		})
	}
	loop(func() {
		allowed.Add(1)
		if curl(testbed.Placement{}, imdsURL) != 0 {
			allowedFailed[phase.Load()].Add(1)
		}
	})
	loop(func() {
		v2.Add(2)
		if curl(nobody, imdsURL) == 0 {
			v2Answered.Add(1)
		}
		if curl(nobody, "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", "-H", "X-Forwarded-For: 203.0.113.7",
			"http://169.254.169.254/latest/api/token") == 0 {
			v2Answered.Add(1)
		}
	})
	settle := func() {
		for n := allowed.Load() + 3; allowed.Load() < n; {
			time.Sleep(20 * time.Millisecond)
		}
	}
	settle()
	var enforced []time.Duration
	for i, kill := range []bool{false, true} {
		phase.Store(int32(i))
		for range rounds {
			if kill {
				agent.Kill()
			} else if err := agent.Stop(); err != nil {
				return fmt.Errorf("stop: %w", err)
			}
			started := time.Now()
			if agent, err = bed.StartAgentFiles(restartPolicy, store.Held()); err != nil {
				return err
			}
			if kill {
				d, err := enforcedAfter(agent, started)
				if err != nil {
					return err
				}
				enforced = append(enforced, d)
			}
			settle()
		}
	}
	close(stop)
	wg.Wait()
	events, err := agent.Events()
	if err != nil {
		return err
	}
	failMode := 0
	for _, e := range events {
		if e.Verdict == "fail_open" || e.Verdict == "fail_closed" {
			failMode++
		}
	}
	slices.Sort(enforced)
	fmt.Printf("   %d graceful + %d SIGKILL restarts, failure_mode open: allowed requests %d, refused or hung %d during graceful restarts (goal 0), %d during SIGKILL ones (requests in flight in the killed broker)\n",
		rounds, rounds, allowed.Load(), allowedFailed[0].Load(), allowedFailed[1].Load())
	fmt.Printf("   v2-required IMDSv1/X-Forwarded-For requests %d, answered %d (goal 0); connections judged under the failure mode %d (goal 0)\n",
		v2.Load(), v2Answered.Load(), failMode)
	fmt.Printf("   SIGKILL then start: policy enforced through the broker %v median, %v max after the new agent started (goal <= 500ms)\n",
		enforced[len(enforced)/2].Round(time.Millisecond), enforced[len(enforced)-1].Round(time.Millisecond))
	return nil
}

// enforcedAfter is how long after started the new agent's broker first refused the
// v2-required client's IMDSv1 request.
func enforcedAfter(agent *testbed.AgentProc, started time.Time) (time.Duration, error) {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		events, err := agent.Events()
		if err != nil {
			return 0, err
		}
		for _, e := range events {
			if e.Event == "imds_request" && e.UID == testbed.NobodyUID && e.Refused != "" && e.Time.After(started) {
				return e.Time.Sub(started), nil
			}
		}
	}
	return 0, errors.New("after SIGKILL: no request refused through the new agent's broker within 5s")
}
