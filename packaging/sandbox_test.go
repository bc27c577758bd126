package packaging

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/status"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// sandboxed is one run of the agent binary inside the test bed, under a capability
// bounding set and no_new_privs, as systemd starts it from the unit.
type sandboxed struct {
	log    string          // the agent's stderr
	events []testbed.Event // lines of its events file
	err    error           // start or exit failure
	trace  string          // strace output file, when traced
	client testbed.Event   // the event of the long-lived client, when seen
	found  bool            // whether that event was seen
	// served: the agent served the broker in the container's network namespace;
	// netnsLog is its log line saying why not, when it did not.
	served   bool
	netnsLog string
}

// runSandboxed starts the agent with only caps in its bounding set (as root, like the
// unit), connects to IMDS from a long-lived bash running as uid 65534, waits for its
// event, then does the same from a container's network namespace (containerNetns, of
// the bed's AddContainerNetns) and waits until the agent serves that namespace or says
// why it cannot, and stops the agent. With trace, the agent runs under strace -f.
func runSandboxed(t *testing.T, bed *testbed.Bed, agent string, caps []string, trace bool, containerNetns string) (res sandboxed) {
	t.Helper()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.yaml")
	eventsPath := filepath.Join(dir, "events.json")
	ready := filepath.Join(dir, "ready")
	// Everything the agent touches stays in the bed: pins, sockets, state.
	statusSock := filepath.Join(dir, "status.sock")
	conf := bed.Config(eventsPath, filepath.Join(dir, "fingerprints.jsonl"), statusSock,
		fmt.Sprintf("agent:\n  ready_file: %s\n", ready))
	if err := os.WriteFile(cfgPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	bounding := "-all"
	for _, c := range caps {
		bounding += ",+" + c
	}
	args := []string{"--net=" + bed.NetnsPath, "--", "setpriv", "--nnp", "--bounding-set", bounding, "--inh-caps", "-all", "--"}
	if trace {
		res.trace = filepath.Join(dir, "strace.out")
		args = append(args, "strace", "-f", "-qq", "-o", res.trace)
	}
	args = append(args, agent, "run", "--config", cfgPath)
	cmd := exec.Command("nsenter", args...)
	// Read while the agent runs: whether it served the container's namespace.
	stderr := &lockedBuffer{}
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// Under strace the agent is strace's child: if strace goes first, it must not
	// keep Wait waiting on the stderr pipe forever.
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatalf("start agent: %v", err)
	}
	// exited is closed when the agent has exited, with its result in waitErr.
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	stop := func() error {
		// The ready file holds the agent's own pid: signal it, not strace, which
		// exits when the agent has.
		target := cmd.Process.Pid
		if data, err := os.ReadFile(ready); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil {
				target = pid
			}
		}
		_ = syscall.Kill(target, syscall.SIGTERM)
		select {
		case <-exited:
			return waitErr
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return errors.New("agent did not stop within 15s of SIGTERM")
		}
	}
	defer func() { res.log = string(stderr.Bytes()) }()

	if err := waitFor(func() bool { _, err := os.Stat(ready); return err == nil }, exited); err != nil {
		res.err = fmt.Errorf("agent never attached: %w", err)
		if e := stop(); e != nil {
			res.err = fmt.Errorf("%w (exit: %v)", res.err, e)
		}
		return res
	}

	// bash connects, then blocks reading: alive while the agent reads its /proc.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	longClient := func(netns string) *exec.Cmd {
		client, err := bed.Command(ctx, testbed.Placement{UID: testbed.NobodyUID, GID: testbed.NobodyUID, Netns: netns},
			"bash", "-c", "exec 3<>/dev/tcp/"+testbed.IMDSv4.String()+"/80 && read -t 20 line <&3")
		if err != nil {
			t.Fatal(err)
		}
		if err := client.Start(); err != nil {
			t.Fatalf("start client: %v", err)
		}
		return client
	}
	client := longClient("")
	pid := client.Process.Pid
	err := waitFor(func() bool {
		res.events = readEvents(t, eventsPath)
		for _, e := range res.events {
			if e.PID == pid {
				res.client, res.found = e, true
			}
		}
		return res.found
	}, exited)
	_ = client.Process.Kill()
	_ = client.Wait()
	if err != nil {
		res.err = fmt.Errorf("no event for the client: %w", err)
	}
	if res.err == nil {
		// The same client in a container's namespace: the agent enters it (setns,
		// CAP_SYS_ADMIN), reads its /proc/PID/ns/net (another user's: CAP_SYS_PTRACE)
		// and watches it (pidfd, epoll).
		client := longClient(containerNetns)
		err = waitFor(func() bool {
			sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			if r, err := status.Fetch(sctx, statusSock); err == nil {
				for _, n := range r.Namespaces {
					res.served = res.served || n.PID == client.Process.Pid
				}
			}
			for _, l := range strings.Split(string(stderr.Bytes()), "\n") {
				if strings.Contains(l, `"event":"netns_`) && !strings.Contains(l, "netns_endpoint_added") {
					res.netnsLog = l
				}
			}
			return res.served || res.netnsLog != ""
		}, exited)
		_ = client.Process.Kill()
		_ = client.Wait()
		if err != nil {
			res.err = fmt.Errorf("the container's namespace neither served nor refused: %w", err)
		}
	}
	if e := stop(); e != nil && res.err == nil {
		res.err = fmt.Errorf("agent exit: %w", e)
	}
	return res
}

// waitFor polls cond until it holds, the process exits, or 20s pass.
func waitFor(cond func() bool, exited <-chan struct{}) error {
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		select {
		case <-exited:
			return errors.New("agent exited")
		default:
		}
		if time.Now().After(deadline) {
			return errors.New("timed out after 20s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

func readEvents(t *testing.T, path string) []testbed.Event {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []testbed.Event
	for _, line := range bytes.Split(data, []byte("\n")) {
		var e testbed.Event
		if json.Unmarshal(line, &e) == nil {
			out = append(out, e)
		}
	}
	return out
}

// TestPrivilegedUnitCapabilities runs the agent with exactly the unit's
// CapabilityBoundingSet and proves it works (attaches, records the client with its
// command line read from /proc, serves a container's network namespace), then drops
// each capability in turn and proves the agent then fails or loses something: the set
// is measured, not guessed. The kernel lets CAP_SYS_ADMIN stand in for CAP_BPF,
// CAP_PERFMON and CAP_NET_ADMIN, so those are measured against the set of a host
// without containers (the documented drop-in without CAP_SYS_ADMIN), which needs them.
func TestPrivilegedUnitCapabilities(t *testing.T) {
	testbed.RequirePrivileged(t)
	bed := testbed.Start(t, testbed.Options{})
	agent, err := testbed.Agent()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := bed.AddContainerNetns()
	if err != nil {
		t.Fatal(err)
	}
	caps := unitCaps(t)
	if !slices.Contains(caps, "sys_admin") {
		t.Fatalf("unit's CapabilityBoundingSet %v lacks CAP_SYS_ADMIN: containers' namespaces cannot be served", caps)
	}
	res := runSandboxed(t, bed, agent, caps, false, ns)
	if res.err != nil {
		t.Fatalf("agent under the unit's capabilities %v: %v\n%s", caps, res.err, res.log)
	}
	if len(res.client.Missing) > 0 || res.client.Exe != "/usr/bin/bash" && res.client.Exe != "/bin/bash" {
		t.Fatalf("agent under the unit's capabilities lost fields: exe %q, missing %v", res.client.Exe, res.client.Missing)
	}
	if !res.served {
		t.Fatalf("agent under the unit's capabilities did not serve the container's network namespace: %s", res.netnsLog)
	}
	noContainers := slices.DeleteFunc(slices.Clone(caps), func(c string) bool { return c == "sys_admin" })
	for _, drop := range caps {
		from, what := caps, "the unit's set"
		if drop != "sys_admin" {
			from, what = noContainers, "the set without CAP_SYS_ADMIN"
		}
		fewer := slices.DeleteFunc(slices.Clone(from), func(c string) bool { return c == drop })
		r := runSandboxed(t, bed, agent, fewer, false, ns)
		switch {
		case r.err != nil:
			t.Logf("%s without cap_%s: %v: %s", what, drop, r.err, agentError(r.log))
		case len(r.client.Missing) > 0:
			t.Logf("%s without cap_%s: runs, but event lacks %v", what, drop, r.client.Missing)
		case drop == "sys_admin" && !r.served:
			t.Logf("%s without cap_%s: runs, but serves no container's namespace: %s", what, drop, r.netnsLog)
		default:
			t.Errorf("cap_%s is in the unit's CapabilityBoundingSet, but the agent works without it (from %s)", drop, what)
		}
	}
}

// agentError returns the agent's last "imdsguard: ..." error line, or its whole log.
func agentError(log string) string {
	lines := strings.Split(strings.TrimSpace(log), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "imdsguard: ") {
			return lines[i]
		}
	}
	return log
}

// TestPrivilegedUnitSyscallFilter traces every system call the agent makes while it
// starts, records an event and stops, and checks each against the unit's
// SystemCallFilter as systemd expands it: a call outside it would fail with EPERM
// under systemd.
func TestPrivilegedUnitSyscallFilter(t *testing.T) {
	testbed.RequirePrivileged(t)
	if _, err := exec.LookPath("strace"); err != nil {
		t.Fatalf("strace not installed (make deps installs it): %v", err)
	}
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze not installed (make deps installs it): %v", err)
	}
	filters := unitValues(t, "SystemCallFilter")
	if len(filters) != 1 {
		t.Fatalf("unit has %d SystemCallFilter lines, want 1", len(filters))
	}
	allowed := map[string]bool{}
	for _, f := range strings.Fields(filters[0]) {
		if err := expandFilter(sa, f, allowed); err != nil {
			t.Fatal(err)
		}
	}

	bed := testbed.Start(t, testbed.Options{})
	agent, err := testbed.Agent()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := bed.AddContainerNetns()
	if err != nil {
		t.Fatal(err)
	}
	res := runSandboxed(t, bed, agent, unitCaps(t), true, ns)
	if res.err != nil {
		t.Fatalf("agent under strace: %v\n%s", res.err, res.log)
	}
	if !res.served {
		t.Fatalf("agent under strace did not serve the container's namespace (its system calls for that are not traced): %s", res.netnsLog)
	}
	// ExecStartPre runs preflight under the same filter. --no-imds, as in the unit:
	// this runs in the machine's network namespace.
	preTrace := filepath.Join(t.TempDir(), "strace-preflight.out")
	if out, err := exec.Command("setpriv", "--nnp", "--bounding-set", "-all,+"+strings.Join(unitCaps(t), ",+"), "--",
		"strace", "-f", "-qq", "-o", preTrace, agent, "preflight", "--no-imds").CombinedOutput(); err != nil {
		t.Fatalf("preflight under the unit's capabilities: %v\n%s", err, out)
	}
	used, families, nsTypes := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, trace := range []string{res.trace, preTrace} {
		if err := tracedCalls(trace, used, families, nsTypes); err != nil {
			t.Fatal(err)
		}
	}
	// RestrictNamespaces= filters setns, unshare and clone by the namespace types in
	// their flags, and refuses setns with none.
	restrictNs := unitValues(t, "RestrictNamespaces")
	if len(restrictNs) != 1 {
		t.Fatalf("unit has %d RestrictNamespaces lines, want 1", len(restrictNs))
	}
	if !used["setns"] {
		t.Errorf("the agent served a container's namespace without setns: the trace misses its calls")
	}
	for typ := range nsTypes {
		if !slices.Contains(strings.Fields(restrictNs[0]), typ) {
			t.Errorf("agent uses namespaces of type %q (setns/unshare/clone flags), which RestrictNamespaces=%s refuses", typ, restrictNs[0])
		}
	}
	t.Logf("namespace types used: %v", slices.Sorted(maps.Keys(nsTypes)))
	restrict := unitValues(t, "RestrictAddressFamilies")
	if len(restrict) != 1 {
		t.Fatalf("unit has %d RestrictAddressFamilies lines, want 1", len(restrict))
	}
	for fam := range families {
		if !slices.Contains(strings.Fields(restrict[0]), fam) {
			t.Errorf("agent opens %s sockets, which RestrictAddressFamilies=%s refuses", fam, restrict[0])
		}
	}
	t.Logf("socket families used: %v", slices.Sorted(maps.Keys(families)))
	var outside []string
	for name := range used {
		// The first execve is strace starting the agent, before any filter applies.
		if !allowed[name] && name != "execve" {
			outside = append(outside, name)
		}
	}
	slices.Sort(outside)
	t.Logf("agent and preflight used %d distinct system calls", len(used))
	if len(outside) > 0 {
		t.Errorf("system calls outside the unit's SystemCallFilter (would fail with EPERM): %v", outside)
	}
}

// nsFlagTypes are RestrictNamespaces= names of the CLONE_NEW* flags strace prints.
var nsFlagTypes = map[string]string{"CLONE_NEWCGROUP": "cgroup", "CLONE_NEWIPC": "ipc", "CLONE_NEWNET": "net",
	"CLONE_NEWNS": "mnt", "CLONE_NEWPID": "pid", "CLONE_NEWUSER": "user", "CLONE_NEWUTS": "uts"}

// tracedCalls adds the names of the system calls in an strace -f output file to used,
// the address families of the sockets opened to families, and the RestrictNamespaces=
// types of the namespace flags of setns, unshare and clone calls to nsTypes ("any" for
// a setns with no type, which RestrictNamespaces= other than no refuses).
func tracedCalls(path string, used, families, nsTypes map[string]bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		// "1234  bpf(BPF_PROG_LOAD, ...) = 5" or "1234  <... read resumed>..."
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		name, _, ok := strings.Cut(fields[1], "(")
		// "???": strace could not name the call of a thread caught as it exited (seen
		// under load); it is no call the agent makes.
		if !ok || name == "" || name == "???" || strings.HasPrefix(name, "<") || strings.HasPrefix(name, "+++") || strings.HasPrefix(name, "---") {
			continue
		}
		used[name] = true
		if name == "setns" || name == "unshare" || strings.HasPrefix(name, "clone") {
			call := strings.Join(fields[1:], " ")
			for flag, typ := range nsFlagTypes {
				if regexp.MustCompile(`\b` + flag + `\b`).MatchString(call) {
					nsTypes[typ] = true
				}
			}
			// setns(5, 0) = 0
			if name == "setns" && regexp.MustCompile(`^setns\(\d+, 0\)`).MatchString(call) {
				nsTypes["any"] = true
			}
		}
		if name == "socket" {
			// socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = 3
			fam, _, _ := strings.Cut(strings.TrimPrefix(fields[1], "socket("), ",")
			families[fam] = true
		}
	}
	return sc.Err()
}

// expandFilter adds the system calls of a SystemCallFilter entry to set: a name as
// is, a @group as systemd-analyze lists it, nested groups included.
func expandFilter(systemdAnalyze, entry string, set map[string]bool) error {
	if !strings.HasPrefix(entry, "@") {
		set[entry] = true
		return nil
	}
	if set[entry] {
		return nil
	}
	set[entry] = true
	out, err := exec.Command(systemdAnalyze, "syscall-filter", entry).Output()
	if err != nil {
		return fmt.Errorf("systemd-analyze syscall-filter %s: %w", entry, err)
	}
	// "@system-service" then indented members: "# comment", "@group" or "name".
	for _, l := range strings.Split(string(out), "\n")[1:] {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if err := expandFilter(systemdAnalyze, strings.Fields(l)[0], set); err != nil {
			return err
		}
	}
	return nil
}
