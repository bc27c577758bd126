package testbed

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// AgentProc is an imdsguard agent binary running inside the bed's network namespace,
// guarding the bed's cgroup.
type AgentProc struct {
	Cmd              *exec.Cmd
	ConfigPath       string
	EventsPath       string
	FingerprintsPath string
	// StatusSocket is the agent's status socket, in the bed's directory so that tests
	// leave nothing under /run and never meet another agent's socket.
	StatusSocket string

	mu     sync.Mutex
	log    bytes.Buffer
	exited chan struct{}
	err    error
}

// StartAgent writes a config that points the agent at the bed (cgroup, IMDS, an events
// file, pins, control and status sockets in the bed's directory), appends extraYAML to
// it (which must not repeat those top-level keys), starts the agent through nsenter
// --net, and returns once the agent says its hooks are attached.
func (b *Bed) StartAgent(extraYAML string, args ...string) (*AgentProc, error) {
	return b.StartAgentFiles(extraYAML, nil, args...)
}

// StartAgentFiles is StartAgent with files passed the way systemd passes its file
// descriptor store to a service: from fd 3, named by LISTEN_FDS and LISTEN_PID.
func (b *Bed) StartAgentFiles(extraYAML string, files []*os.File, args ...string) (*AgentProc, error) {
	bin, err := Agent()
	if err != nil {
		return nil, err
	}
	a := &AgentProc{
		ConfigPath:       filepath.Join(b.Dir, "imdsguard.yaml"),
		EventsPath:       filepath.Join(b.Dir, "events.json"),
		FingerprintsPath: filepath.Join(b.Dir, "fingerprints.jsonl"),
		StatusSocket:     filepath.Join(b.Dir, "status.sock"),
		exited:           make(chan struct{}),
	}
	conf := b.Config(a.EventsPath, a.FingerprintsPath, a.StatusSocket, extraYAML)
	if err := os.WriteFile(a.ConfigPath, []byte(conf), 0o600); err != nil {
		return nil, fmt.Errorf("write agent config: %w", err)
	}
	argv := b.agentArgv(bin, append([]string{"run", "--config", a.ConfigPath}, args...)...)
	a.Cmd = exec.Command(argv[0], argv[1:]...)
	if len(files) > 0 {
		// LISTEN_PID must be the agent's pid: the shell's, which exec keeps (nsenter
		// without --pid execs too).
		a.Cmd = exec.Command("sh", append([]string{"-c", `export LISTEN_PID=$$ LISTEN_FDS=` + strconv.Itoa(len(files)) + `; exec "$@"`, "sh"}, argv...)...)
		a.Cmd.ExtraFiles = files
	}
	a.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	// TESTBED_AGENT_ENV (NAME=value ...) reaches the agent only, not the clients: how a
	// benchmark tries a runtime setting (GOMAXPROCS, GOGC) on the agent alone.
	a.Cmd.Env = append(os.Environ(), strings.Fields(os.Getenv("TESTBED_AGENT_ENV"))...)
	// A pipe of our own rather than StderrPipe: Wait runs on its own thread here and
	// must not close the pipe before every line is read.
	stderr, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	a.Cmd.Stderr = w
	waitErr, err := startPinned(a.Cmd)
	w.Close() // the child holds its own copy
	if err != nil {
		stderr.Close()
		return nil, fmt.Errorf("start agent: %w", err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			a.mu.Lock()
			a.log.Write(sc.Bytes())
			a.log.WriteByte('\n')
			a.mu.Unlock()
			if strings.Contains(sc.Text(), `"event":"agent_started"`) {
				once.Do(func() { close(ready) })
			}
		}
		stderr.Close()
		a.err = <-waitErr
		close(a.exited)
	}()
	b.closers = append(b.closers, func() error { a.Stop(); return nil })
	select {
	case <-ready:
		return a, nil
	case <-a.exited:
		return nil, fmt.Errorf("agent exited before it was ready: %v\n%s", a.err, a.Log())
	case <-time.After(30 * time.Second):
		a.Stop()
		return nil, fmt.Errorf("agent not ready after 30s:\n%s", a.Log())
	}
}

// Config is an agent configuration that keeps everything the agent touches inside the
// bed: its cgroup and IMDS, pins on the bed's own bpffs, control and status sockets and
// state in the bed's directory. extraYAML is appended (it must not repeat these keys,
// except fingerprints:, which is merged).
func (b *Bed) Config(eventsPath, fingerprintsPath, statusSocket, extraYAML string) string {
	return fmt.Sprintf("cgroup: %s\nimds:\n  ipv4: %s\n  ipv6: %s\n  port: %d\nevents:\n  output: %s\npin_path: %s\ncontrol_socket: %s\nstate_dir: %s\nstatus:\n  socket: %s\n%s",
		b.agentCgroup(), IMDSv4, IMDSv6, IMDSPort, eventsPath, b.PinPath(), b.ControlSocket(),
		filepath.Join(b.Dir, "state"), statusSocket, b.fingerprintsYAML(fingerprintsPath, extraYAML))
}

// PinPath is where the bed's agents pin their programs.
func (b *Bed) PinPath() string { return filepath.Join(b.BPFFS, "imdsguard") }

// ControlSocket is the bed's agent control socket.
func (b *Bed) ControlSocket() string { return filepath.Join(b.Dir, "control.sock") }

// Kill kills the agent with SIGKILL, as a crash would, and waits for it.
func (a *AgentProc) Kill() {
	select {
	case <-a.exited:
		return
	default:
	}
	_ = a.Cmd.Process.Kill()
	<-a.exited
}

// Log returns what the agent wrote to stderr so far.
func (a *AgentProc) Log() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.log.String()
}

// Stop sends SIGTERM and waits for the agent to exit; it returns the exit error (nil for
// a clean exit 0). A second call returns the same result.
func (a *AgentProc) Stop() error {
	select {
	case <-a.exited:
		return a.err
	default:
	}
	_ = a.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
	case <-time.After(15 * time.Second):
		_ = a.Cmd.Process.Kill()
		<-a.exited
		return errors.New("agent did not stop within 15s of SIGTERM")
	}
	return a.err
}

// Event is one line of the agent's events output, as docs/events.md documents it.
type Event struct {
	Time        time.Time `json:"time"`
	Event       string    `json:"event"`
	PID         int       `json:"pid"`
	TID         int       `json:"tid"`
	PPID        int       `json:"ppid"`
	UID         int       `json:"uid"`
	GID         int       `json:"gid"`
	User        string    `json:"user"`
	Comm        string    `json:"comm"`
	Exe         string    `json:"exe"`
	Cmdline     []string  `json:"cmdline"`
	Cgroup      string    `json:"cgroup"`
	CgroupID    uint64    `json:"cgroup_id"`
	Unit        string    `json:"unit"`
	ContainerID string    `json:"container_id"`
	// Present when the process ran in a container its runtime's state names.
	ContainerRuntime string   `json:"container_runtime"`
	ContainerName    string   `json:"container_name"`
	PodNamespace     string   `json:"pod_namespace"`
	Pod              string   `json:"pod"`
	PodUID           string   `json:"pod_uid"`
	PodContainer     string   `json:"pod_container"`
	ServiceAccount   string   `json:"service_account"`
	ECSTaskARN       string   `json:"ecs_task_arn"`
	ECSTaskFamily    string   `json:"ecs_task_family"`
	ECSContainer     string   `json:"ecs_container"`
	Netns            uint64   `json:"netns"`
	SocketCookie     uint64   `json:"socket_cookie"`
	ExeTruncated     bool     `json:"exe_truncated"`
	Dst              string   `json:"dst"`
	Verdict          string   `json:"verdict"`
	Rule             string   `json:"rule"`
	Redirected       bool     `json:"redirected"`
	Agent            bool     `json:"agent"`
	NoBroker         bool     `json:"no_broker"`
	ExeBorrowed      bool     `json:"exe_borrowed"`
	Missing          []string `json:"missing"`
	// imds_connect_summary only
	Count    uint64    `json:"count"`
	First    time.Time `json:"first"`
	UDP      bool      `json:"udp"`
	Backstop bool      `json:"backstop"`
	// imds_request only
	Endpoint    string  `json:"endpoint"`
	ForeignTask string  `json:"foreign_task_arn"`
	Method      string  `json:"method"`
	Path        string  `json:"path"`
	IMDSVersion string  `json:"imds_version"`
	Status      int     `json:"status"`
	Refused     string  `json:"refused"`
	WouldRefuse string  `json:"would_refuse"`
	DurationMS  float64 `json:"duration_ms"`
}

// Events reads every complete line of the events file. Unknown fields are an error, so
// a field added without documenting it here fails the tests.
func (a *AgentProc) Events() ([]Event, error) {
	data, err := os.ReadFile(a.EventsPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	var out []Event
	for _, line := range bytes.Split(data, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.DisallowUnknownFields()
		var e Event
		if err := dec.Decode(&e); err != nil {
			return nil, fmt.Errorf("events line %q: %w", line, err)
		}
		out = append(out, e)
	}
	return out, nil
}

// WaitEvents waits until the events file holds an event for each pid, and returns
// all events. It watches the file; the deadline only bounds a failure.
func (a *AgentProc) WaitEvents(pids ...int) ([]Event, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		events, err := a.Events()
		if err != nil {
			return nil, err
		}
		seen := map[int]bool{}
		for _, e := range events {
			seen[e.PID] = true
		}
		missing := 0
		for _, p := range pids {
			if !seen[p] {
				missing++
			}
		}
		if missing == 0 {
			return events, nil
		}
		select {
		case <-a.exited:
			return events, fmt.Errorf("agent exited: %v\n%s", a.err, a.Log())
		default:
		}
		if time.Now().After(deadline) {
			return events, fmt.Errorf("no event for %d of pids %v after 15s", missing, pids)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fingerprintsYAML adds the bed's fingerprints output to extraYAML: into its own
// fingerprints: block when it has one (a test that forwards to a correlator), else as
// a block of its own.
func (b *Bed) fingerprintsYAML(output, extraYAML string) string {
	if strings.Contains(extraYAML, "fingerprints:\n") {
		return strings.Replace(extraYAML, "fingerprints:\n", "fingerprints:\n  output: "+output+"\n", 1)
	}
	return "fingerprints:\n  output: " + output + "\n" + extraYAML
}
