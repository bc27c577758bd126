package e2e

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

func newFDStore(t *testing.T, dir string) *testbed.FDStore {
	t.Helper()
	s, err := testbed.NewFDStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	t.Setenv("NOTIFY_SOCKET", s.Socket)
	return s
}

// restartTally counts what clients looping through a restarting agent saw.
type restartTally struct {
	allowed, allowedFailed atomic.Int64 // allowed: IMDSv1 from root; failed: refused or hung
	killFailed             atomic.Int64 // allowed requests failed around SIGKILL (in flight in the killed broker)
	killing                atomic.Bool
	v2, v2Answered         atomic.Int64 // v2-required: IMDSv1 and X-Forwarded-For PUTs; answered: 200
	failures               sync.Map     // exit code -> count, for the log
}

// TestPrivilegedRestartNoLapse restarts the agent, with failure_mode open, while clients
// loop through it (issue 16 point 2): first gracefully (SIGTERM, then a new agent), then
// after SIGKILL. The pinned programs keep redirecting to the broker's port, whose listener
// outlives each agent in the file descriptor store, and the new agent's heartbeat starts
// before its programs are verified: no connection is judged under the failure mode, no
// allowed client is refused or hangs, and a v2-required process never gets IMDSv1
// answered.
func TestPrivilegedRestartNoLapse(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	store := newFDStore(t, bed.Dir)
	policy := "mode: enforce\nfailure_mode: open\ndefault_action: allow\nrules:\n  - name: nobody-v2\n    user: nobody\n    action: allow\n    imdsv2: required\n"
	agent, err := bed.StartAgentFiles(policy, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitStored(t, store, agent)

	var tally restartTally
	stop := make(chan struct{})
	var wg sync.WaitGroup
	loop := func(f func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				f()
			}
		}()
	}
	nobody := testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID}
	loop(func() {
		code, _ := curlExit(t, bed, testbed.Placement{}, "-m", "3", imdsURL)
		tally.allowed.Add(1)
		if code != 0 && tally.killing.Load() {
			tally.killFailed.Add(1)
		} else if code != 0 {
			tally.allowedFailed.Add(1)
			n, _ := tally.failures.LoadOrStore(code, new(atomic.Int64))
			n.(*atomic.Int64).Add(1)
		}
	})
	loop(func() {
		code, _ := curlExit(t, bed, nobody, "-m", "3", imdsURL)
		tally.v2.Add(1)
		if code == 0 {
			tally.v2Answered.Add(1)
		}
		code, _ = curlExit(t, bed, nobody, "-m", "3", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
			"-H", "X-Forwarded-For: 203.0.113.7", "http://169.254.169.254/latest/api/token")
		tally.v2.Add(1)
		if code == 0 {
			tally.v2Answered.Add(1)
		}
	})
	settle := func() {
		for n := tally.allowed.Load() + 3; tally.allowed.Load() < n; {
			time.Sleep(20 * time.Millisecond)
		}
	}
	settle()

	// Graceful: SIGTERM, then the next agent.
	if err := agent.Stop(); err != nil {
		close(stop)
		wg.Wait()
		t.Fatalf("stop: %v\n%s", err, agent.Log())
	}
	if agent, err = bed.StartAgentFiles(policy, store.Held()); err != nil {
		t.Fatal(err)
	}
	settle()

	// SIGKILL, then the next agent: how soon is the policy enforced through the broker?
	tally.killing.Store(true)
	agent.Kill()
	started := time.Now()
	if agent, err = bed.StartAgentFiles(policy, store.Held()); err != nil {
		t.Fatal(err)
	}
	var enforcedAfter time.Duration
	for deadline := time.Now().Add(5 * time.Second); enforcedAfter == 0 && time.Now().Before(deadline); {
		events, err := agent.Events()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range events {
			if e.Event == "imds_request" && e.UID == testbed.NobodyUID && e.Refused != "" && e.Time.After(started) {
				enforcedAfter = e.Time.Sub(started)
				break
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	settle()
	close(stop)
	wg.Wait()

	t.Logf("allowed requests %d (refused or hung %d; around SIGKILL %d), v2-required requests %d (answered %d); after SIGKILL, enforced through the broker %v after the new agent started",
		tally.allowed.Load(), tally.allowedFailed.Load(), tally.killFailed.Load(), tally.v2.Load(), tally.v2Answered.Load(), enforcedAfter.Round(time.Millisecond))
	if n := tally.allowedFailed.Load(); n != 0 {
		tally.failures.Range(func(k, v any) bool {
			t.Logf("allowed client: curl exit %v: %d times", k, v.(*atomic.Int64).Load())
			return true
		})
		t.Errorf("%d allowed requests refused or hung during the graceful restart", n)
	}
	if n := tally.v2Answered.Load(); n != 0 {
		t.Errorf("%d IMDSv1 or X-Forwarded-For requests of a v2-required process answered during the restarts", n)
	}
	if enforcedAfter == 0 {
		t.Error("after SIGKILL: no refused v2-required request through the new agent's broker within 5s")
	} else if enforcedAfter > 2*time.Second { // the goal is 500 ms; generous for a busy machine
		t.Errorf("after SIGKILL: policy enforced through the broker %v after the new agent started", enforcedAfter)
	}
	events, err := agent.Events()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range events {
		if e.Event == "imds_request" && e.UID == 0 && e.Status >= 400 {
			t.Logf("allowed request answered %d: %+v", e.Status, e)
		}
		if e.Verdict == "fail_open" || e.Verdict == "fail_closed" {
			t.Errorf("a connection was judged under the failure mode: %+v", e)
		}
	}
}

// waitStored waits until the agent put its broker listeners in the store.
func waitStored(t *testing.T, s *testbed.FDStore, a *testbed.AgentProc) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if len(s.Held()) > 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("the agent stored no broker listener (FDSTORE=1):\n%s", a.Log())
}
