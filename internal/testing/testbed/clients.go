package testbed

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// NobodyUID is the unprivileged uid the bed runs a client as.
const NobodyUID = 65534

// Placement says where a command runs.
type Placement struct {
	// OutsideCgroup runs the command in the bed's namespace but not its cgroup: hooks
	// on the bed's cgroup must not see it.
	OutsideCgroup bool
	// UID and GID, when UID > 0, drop privileges inside the namespace.
	UID, GID int
	// SubCgroup places the command in a child of the bed's cgroup (created if missing),
	// e.g. to stand for a systemd unit.
	SubCgroup string
	// Netns runs the command in another network namespace (a container's, from
	// AddContainerNetns) instead of the bed's.
	Netns string
	// Env, when not nil, is the command's whole environment instead of the test's: real
	// SDK clients must not find credentials or proxies in the caller's environment.
	Env []string
}

// Command returns a command that runs argv inside the bed's network namespace and, by
// default, its cgroup. The process is placed in the cgroup as it is created
// (CLONE_INTO_CGROUP), so its very first connect() is already guarded. nsenter execs
// argv in place: the command's pid is the client's pid.
func (b *Bed) Command(ctx context.Context, p Placement, argv ...string) (*exec.Cmd, error) {
	netns := b.NetnsPath
	if p.Netns != "" {
		netns = p.Netns
	}
	args := []string{"--net=" + netns}
	if p.UID > 0 {
		args = append(args, "--setuid", strconv.Itoa(p.UID), "--setgid", strconv.Itoa(p.GID))
	}
	args = append(args, "--")
	args = append(args, argv...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Dir = "/"
	cmd.Env = p.Env
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if !p.OutsideCgroup {
		dir := b.Cgroup
		if p.SubCgroup != "" {
			var err error
			if dir, err = b.SubCgroup(p.SubCgroup); err != nil {
				return nil, err
			}
		}
		fd, err := syscall.Open(dir, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open cgroup %s: %w", dir, err)
		}
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
		// The fd is only needed until the child exists; the bed closes it on Close.
		var once sync.Once
		release := func() { once.Do(func() { syscall.Close(fd) }) }
		b.mu.Lock()
		b.cgroupFDs[cmd] = release
		b.mu.Unlock()
		b.closers = append(b.closers, func() error { release(); return nil })
	}
	return cmd, nil
}

// Run is one finished client process and what a correct agent must say about it.
type Run struct {
	Name   string
	PID    int
	UID    int
	Exe    string // the executable, symlinks resolved, as /proc/<pid>/exe shows it
	How    string // what the client did, for people reading a demo
	Output string
	Err    error
}

// RunCommand runs argv to completion with the given placement and records its pid.
func (b *Bed) RunCommand(ctx context.Context, name, how string, p Placement, argv ...string) Run {
	r := Run{Name: name, How: how, UID: p.UID}
	exe, err := exec.LookPath(argv[0])
	if err == nil {
		exe, err = filepath.EvalSymlinks(exe)
	}
	if err != nil {
		r.Err = fmt.Errorf("find %s: %w", argv[0], err)
		return r
	}
	r.Exe = exe
	cmd, err := b.Command(ctx, p, argv...)
	if err != nil {
		r.Err = err
		return r
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	waitErr, err := startPinned(cmd)
	b.releaseCgroupFD(cmd) // only needed to create the child; long loops must not run out of fds
	if err != nil {
		r.Err = fmt.Errorf("start %s: %w", name, err)
		return r
	}
	r.PID = cmd.Process.Pid
	if err := <-waitErr; err != nil {
		r.Err = fmt.Errorf("%s: %w: %s", name, err, strings.TrimSpace(errOut.String()))
	}
	r.Output = out.String()
	return r
}

// RunClients runs the bed's standard clients one after another, each a fresh process
// inside the bed's cgroup and namespace:
//
//   - curl without a token (IMDSv1)
//   - curl asking for a token (PUT /latest/api/token), then curl using it (IMDSv2)
//   - the aws-sdk-go-v2 IMDS client (IMDSv2, several requests)
//   - curl as the unprivileged uid 65534
//   - a client that connects and exits at once, before /proc can be read
//   - curl over IPv6 to [fd00:ec2::254]
func (b *Bed) RunClients(ctx context.Context) ([]Run, error) {
	client, err := ClientBinary()
	if err != nil {
		return nil, err
	}
	base := "http://" + IMDSv4.String()
	var runs []Run
	add := func(r Run) Run { runs = append(runs, r); return r }

	add(b.RunCommand(ctx, "curl-v1", "IMDSv1 GET, no token", Placement{},
		"curl", "-sf", "-m", "5", base+"/latest/meta-data/instance-id"))
	tok := add(b.RunCommand(ctx, "curl-token", "PUT /latest/api/token", Placement{},
		"curl", "-sf", "-m", "5", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", base+"/latest/api/token"))
	add(b.RunCommand(ctx, "curl-v2", "IMDSv2 GET with token", Placement{},
		"curl", "-sf", "-m", "5", "-H", "X-aws-ec2-metadata-token: "+strings.TrimSpace(tok.Output),
		base+"/latest/meta-data/iam/security-credentials/"+Role))
	add(b.RunCommand(ctx, "go-sdk", "aws-sdk-go-v2 imds client (v2)", Placement{}, client, "sdk"))
	add(b.RunCommand(ctx, "curl-nobody", "IMDSv1 GET as uid 65534", Placement{UID: NobodyUID, GID: NobodyUID},
		"curl", "-sf", "-m", "5", base+"/latest/meta-data/ami-id"))
	add(b.RunCommand(ctx, "quick-exit", "connects and exits at once", Placement{}, client, "connect-exit"))
	add(b.RunCommand(ctx, "curl-ipv6", "IMDSv1 GET over IPv6", Placement{},
		"curl", "-sf", "-m", "5", "-g", "http://["+IMDSv6.String()+"]/latest/meta-data/instance-id"))
	for _, r := range runs {
		if r.Err != nil {
			return runs, r.Err
		}
	}
	return runs, nil
}

// SubCgroup returns the path of a child of the bed's cgroup, creating it when missing.
// The bed's removal removes it.
func (b *Bed) SubCgroup(name string) (string, error) {
	dir := filepath.Join(b.Cgroup, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	return dir, nil
}

func (b *Bed) releaseCgroupFD(cmd *exec.Cmd) {
	b.mu.Lock()
	release := b.cgroupFDs[cmd]
	delete(b.cgroupFDs, cmd)
	b.mu.Unlock()
	if release != nil {
		release()
	}
}
