package testbed

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/containercreds"
)

// ContainerdTasks is where containerd keeps its running tasks' bundles, and where the
// agent reads their OCI config. The bed lays its containers' bundles out there, in a
// containerd namespace named after the bed, so the agent finds them as on a node.
const ContainerdTasks = "/run/containerd/io.containerd.runtime.v2.task"

// Pod makes a container a Kubernetes pod's: a CRI-shaped cgroup
// (kubepods.slice/…-pod<uid>.slice/cri-containerd-<id>.scope) and the annotations
// containerd's CRI plugin writes.
type Pod struct {
	Namespace, Name, Container string
	UID                        string // made up when empty
	// ServiceAccount, when set, mounts a token for it where the kubelet does.
	ServiceAccount string
	// PodIdentity gives the container what the EKS Pod Identity webhook does: the
	// token file and AWS_CONTAINER_CREDENTIALS_FULL_URI; the bed's Pod Identity
	// stand-in (Options.CredentialEndpoints) hands it credentials.
	PodIdentity bool
}

// ECSTask makes a container an ECS task's: an ECS-shaped cgroup (/ecs/<task>/<id>),
// the ECS agent's introspection API naming it (on 127.0.0.1:51678 in the bed's
// namespace) and AWS_CONTAINER_CREDENTIALS_RELATIVE_URI in its OCI environment.
type ECSTask struct {
	Family, Container string
	TaskID            string // 32 hex, made up when empty
	// CredentialsID is the id of the task's credentials; made up when empty. The bed's
	// ECS stand-in (Options.CredentialEndpoints) hands credentials out under it.
	CredentialsID string
}

// ARN is the task's ARN as the ECS agent names it.
func (t ECSTask) ARN() string {
	return "arn:aws:ecs:us-east-1:123456789012:task/default/" + t.TaskID
}

// ContainerSpec describes a container the bed runs with runc.
type ContainerSpec struct {
	Pod *Pod
	ECS *ECSTask
	// Args is the container's process; its programs are the bed's static IMDS client,
	// mounted at /imds-client, and the sleeper at /sleeper. Default: /sleeper.
	Args []string
	Env  []string
	// Netns is the namespace the container joins; nil makes a new one.
	Netns *ContainerNetns
	// UID runs the container's process as this uid (and gid); 0 means 65534.
	UID int
	// Unguarded puts the container's cgroup beside the bed's instead of below it: the
	// bed's agent does not guard it (a baseline for benchmarks).
	Unguarded bool
}

// Container is a container the bed runs with runc.
type Container struct {
	ID    string // 64 hex
	Netns *ContainerNetns
	// Cgroup is the container's cgroup directory; CgroupRel is where an agent with the
	// bed's container view (Options.ContainerView) sees it: /kubepods.slice/…, /ecs/….
	Cgroup, CgroupRel string
	Pod               *Pod
	ECS               *ECSTask
	// Creds are the credentials the bed's stand-ins hand this container (ECS or Pod
	// Identity), when it has some.
	Creds *containercreds.Creds
	// PID is the container's first process (host pid) while it runs detached.
	PID int

	bed     *Bed
	bundle  string
	removed bool
	mu      sync.Mutex
}

// containerState is what a bed keeps for its containers.
type containerState struct {
	cgroupnsPID int    // the process that holds the agent's cgroup namespace
	runcRoot    string // runc's state directory

	ecsMu         sync.Mutex
	ecsTasks      map[string]ECSTask // by container id: the introspection stand-in's view
	unguardedOnce sync.Once
	ecs           *containercreds.ECS
	podID         *containercreds.PodIdentity
}

// ECS returns the bed's ECS stand-in (Options.CredentialEndpoints), nil without one.
func (b *Bed) ECS() *containercreds.ECS { return b.ecs }

// PodIdentity returns the bed's Pod Identity stand-in, nil without one.
func (b *Bed) PodIdentity() *containercreds.PodIdentity { return b.podID }

// containerFiles builds the programs containers run (static: a container has no libc).
func containerFiles() (client, sleeper string, err error) {
	static := func(name, dir string) (string, error) {
		// Keyed apart from the bed's other builds of the same package (ClientBinary is
		// the same client, linked against the host's libc).
		return compileOnce(name, name, func(root, out string) *exec.Cmd {
			cmd := exec.Command("go", "build", "-o", out, "./"+dir)
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			return cmd
		})
	}
	if client, err = static("imds-client-static", "internal/testing/testbed/imdsclient"); err != nil {
		return "", "", err
	}
	sleeper, err = static("sleeper", "internal/testing/testbed/sleeper")
	return client, sleeper, err
}

// runc finds Debian's runc.
func runcPath() (string, error) {
	p, err := exec.LookPath("runc")
	if err != nil {
		return "", fmt.Errorf("runc is not installed (Debian package runc): %w", err)
	}
	return p, nil
}

// prepareContainer lays out the container's bundle, cgroup path and credentials.
func (b *Bed) prepareContainer(spec ContainerSpec) (*Container, error) {
	if !b.containerView {
		return nil, errors.New("containers need a bed with Options.ContainerView")
	}
	client, sleeper, err := containerFiles()
	if err != nil {
		return nil, err
	}
	c := &Container{ID: randHex(32), Netns: spec.Netns, bed: b}
	if c.Netns == nil {
		if c.Netns, err = b.NewContainerNetns(); err != nil {
			return nil, err
		}
	}
	c.bundle = filepath.Join(ContainerdTasks, b.Name, c.ID)
	rootfs := filepath.Join(c.bundle, "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		return nil, fmt.Errorf("create bundle: %w", err)
	}
	for _, f := range []string{"imds-client", "sleeper"} {
		if err := os.WriteFile(filepath.Join(rootfs, f), nil, 0o755); err != nil {
			return nil, err
		}
	}
	uid := spec.UID
	if uid == 0 {
		uid = NobodyUID
	}
	env := append([]string{"PATH=/", "HOME=/"}, spec.Env...)
	mounts := []map[string]any{
		{"destination": "/proc", "type": "proc", "source": "proc", "options": []string{"nosuid", "noexec", "nodev"}},
		{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{"destination": "/imds-client", "type": "bind", "source": client, "options": []string{"rbind", "ro"}},
		{"destination": "/sleeper", "type": "bind", "source": sleeper, "options": []string{"rbind", "ro"}},
	}
	annotations := map[string]string{}
	switch {
	case spec.Pod != nil:
		pod := *spec.Pod
		if pod.UID == "" {
			pod.UID = fmt.Sprintf("%s-%s-%s-%s-%s", randHex(4), randHex(2), randHex(2), randHex(2), randHex(6))
		}
		c.Pod = &pod
		slice := "kubepods-besteffort-pod" + strings.ReplaceAll(pod.UID, "-", "_") + ".slice"
		c.CgroupRel = "/kubepods.slice/kubepods-besteffort.slice/" + slice + "/cri-containerd-" + c.ID + ".scope"
		annotations = map[string]string{
			"io.kubernetes.cri.container-type":    "container",
			"io.kubernetes.cri.container-name":    pod.Container,
			"io.kubernetes.cri.image-name":        "registry.example/" + pod.Container + ":1",
			"io.kubernetes.cri.sandbox-id":        randHex(32),
			"io.kubernetes.cri.sandbox-name":      pod.Name,
			"io.kubernetes.cri.sandbox-namespace": pod.Namespace,
			"io.kubernetes.cri.sandbox-uid":       pod.UID,
		}
		if pod.ServiceAccount != "" || pod.PodIdentity {
			token := serviceAccountToken(pod.Namespace, pod.ServiceAccount)
			dir := filepath.Join(c.bundle, "serviceaccount")
			if err := writeToken(dir, "token", token); err != nil {
				return nil, err
			}
			mounts = append(mounts, map[string]any{"destination": "/var/run/secrets/kubernetes.io/serviceaccount",
				"type": "bind", "source": dir, "options": []string{"rbind", "ro"}})
			if pod.PodIdentity {
				dir := filepath.Join(c.bundle, "eks-pod-identity")
				if err := writeToken(dir, "eks-pod-identity-token", token); err != nil {
					return nil, err
				}
				mounts = append(mounts, map[string]any{"destination": "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount",
					"type": "bind", "source": dir, "options": []string{"rbind", "ro"}})
				env = append(env, "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials",
					"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token")
				c.Creds = newCreds("")
				if b.podID != nil {
					b.podID.Add(token, *c.Creds)
				}
			}
		}
	case spec.ECS != nil:
		task := *spec.ECS
		if task.TaskID == "" {
			task.TaskID = randHex(16)
		}
		if task.CredentialsID == "" {
			task.CredentialsID = randHex(18)
		}
		c.ECS = &task
		c.CgroupRel = "/ecs/" + task.TaskID + "/" + c.ID
		env = append(env, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/"+task.CredentialsID)
		c.Creds = newCreds("arn:aws:iam::123456789012:role/" + task.Family + "-task")
		if b.ecs != nil {
			b.ecs.Add(task.CredentialsID, *c.Creds)
		}
		b.ecsMu.Lock()
		b.ecsTasks[c.ID] = task
		b.ecsMu.Unlock()
	default:
		c.CgroupRel = "/system.slice/docker-" + c.ID + ".scope"
	}
	top := b.Name
	if spec.Unguarded {
		top = b.Name + "-u"
		b.unguardedOnce.Do(func() {
			b.closers = append(b.closers, func() error {
				return errors.Join(RemoveCgroupEverywhere(top), removeCgroup(filepath.Join(b.CgroupRoot, top)))
			})
		})
	}
	c.Cgroup = filepath.Join(b.CgroupRoot, top, c.CgroupRel)
	args := spec.Args
	if len(args) == 0 {
		args = []string{"/sleeper"}
	}
	oci := map[string]any{
		"ociVersion": "1.0.2-dev",
		"process": map[string]any{
			"user": map[string]any{"uid": uid, "gid": uid}, "args": args,
			"env": env, "cwd": "/", "noNewPrivileges": true,
		},
		"root":        map[string]any{"path": "rootfs", "readonly": true},
		"hostname":    "container",
		"mounts":      mounts,
		"annotations": annotations,
		"linux": map[string]any{
			// Below the bed's cgroup: the bed's agent guards it, and sees it as the root.
			"cgroupsPath": "/" + top + c.CgroupRel,
			"namespaces": []map[string]string{{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
				{"type": "network", "path": c.Netns.Path}},
			"maskedPaths":   []string{"/proc/kcore", "/proc/keys"},
			"readonlyPaths": []string{"/proc/sys", "/proc/sysrq-trigger"},
		},
	}
	data, err := json.MarshalIndent(oci, "", "\t")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(c.bundle, "config.json"), data, 0o600); err != nil {
		return nil, fmt.Errorf("write bundle config: %w", err)
	}
	return c, nil
}

func newCreds(roleArn string) *containercreds.Creds {
	return &containercreds.Creds{RoleArn: roleArn, AccountID: "123456789012",
		AccessKeyID: "ASIA" + strings.ToUpper(randHex(8)), SecretAccessKey: "csecret-" + randHex(16),
		Token: "ctoken-" + randHex(24), Expiration: time.Now().Add(6 * time.Hour).UTC().Truncate(time.Second)}
}

// serviceAccountToken is a JWT the kubelet could have mounted: its claims name the
// service account (the agent decodes them and checks nothing else).
func serviceAccountToken(namespace, name string) string {
	enc := base64.RawURLEncoding.EncodeToString
	claims, _ := json.Marshal(map[string]any{"sub": "system:serviceaccount:" + namespace + ":" + name,
		"aud": []string{"pods.eks.amazonaws.com"}, "jti": randHex(8)})
	return enc([]byte(`{"alg":"RS256","kid":"bed"}`)) + "." + enc(claims) + "." + enc([]byte(randHex(16)))
}

func writeToken(dir, name, token string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name), []byte(token), 0o644)
}

// StartContainer runs a container detached (its process by default sleeps): exec into
// it with Exec, end it with Remove. Close removes it too.
func (b *Bed) StartContainer(ctx context.Context, spec ContainerSpec) (*Container, error) {
	runc, err := runcPath()
	if err != nil {
		return nil, err
	}
	c, err := b.prepareContainer(spec)
	if err != nil {
		return nil, err
	}
	b.closers = append(b.closers, func() error { return c.Remove() })
	pidFile := filepath.Join(c.bundle, "init.pid")
	// The detached container keeps runc's stdio: a file, not a pipe, or reading it
	// would wait for the container to end.
	logPath := filepath.Join(c.bundle, "runc.log")
	log, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer log.Close()
	cmd := exec.CommandContext(ctx, runc, "--root", b.runcRoot, "run", "--detach", "--pid-file", pidFile, "--bundle", c.bundle, c.ID)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Run(); err != nil {
		out, _ := os.ReadFile(logPath)
		return nil, fmt.Errorf("runc run: %w: %s", err, out)
	}
	if c.PID, err = readPID(pidFile); err != nil {
		return nil, err
	}
	// runc run --detach returns once the container is told to start: its process may
	// still be runc init. Wait for the exec of the container's program.
	want := "/sleeper"
	if len(spec.Args) > 0 {
		want = spec.Args[0]
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(c.PID), "cmdline"))
		if err != nil || strings.HasPrefix(string(cmdline), want+"\x00") {
			break // exited already, or running its program
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("container %s never ran %s: cmdline %q", c.ID, want, cmdline)
		}
	}
	return c, nil
}

// ContainerRun is one finished container, or one finished exec in a container.
type ContainerRun struct {
	PID    int // host pid of the container's (or exec's) process
	Output string
	Err    error // with the process's stderr when it failed
}

// RunContainer runs a container to completion and collects its output. runc deletes
// the container when its process exits; the namespace stays until Close or
// c.Netns.Detach.
func (b *Bed) RunContainer(ctx context.Context, spec ContainerSpec) (*Container, ContainerRun) {
	runc, err := runcPath()
	if err != nil {
		return nil, ContainerRun{Err: err}
	}
	c, err := b.prepareContainer(spec)
	if err != nil {
		return nil, ContainerRun{Err: err}
	}
	b.closers = append(b.closers, func() error { return c.Remove() })
	pidFile := filepath.Join(c.bundle, "init.pid")
	cmd := exec.CommandContext(ctx, runc, "--root", b.runcRoot, "run", "--pid-file", pidFile, "--bundle", c.bundle, c.ID)
	r := runCapture(cmd)
	r.PID, _ = readPID(pidFile)
	return c, r
}

// Exec runs argv in the running container (runc exec) to completion.
func (c *Container) Exec(ctx context.Context, argv ...string) ContainerRun {
	runc, err := runcPath()
	if err != nil {
		return ContainerRun{Err: err}
	}
	pidFile := filepath.Join(c.bundle, "exec-"+randHex(4)+".pid")
	defer os.Remove(pidFile)
	cmd := exec.CommandContext(ctx, runc, append([]string{"--root", c.bed.runcRoot, "exec", "--pid-file", pidFile, c.ID}, argv...)...)
	r := runCapture(cmd)
	r.PID, _ = readPID(pidFile)
	return r
}

func runCapture(cmd *exec.Cmd) ContainerRun {
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	r := ContainerRun{Output: out.String()}
	if err != nil {
		r.Err = fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args[3:], " "), err, strings.TrimSpace(errOut.String()))
	}
	return r
}

func readPID(path string) (int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read container pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		return 0, fmt.Errorf("container pid %q: %w", data, err)
	}
	return pid, nil
}

// Remove ends the container: runc delete --force kills its processes and removes its
// cgroup; its bundle goes, and its namespace's name (the kernel frees the namespace
// once nothing holds it). Removing twice is a no-op.
func (c *Container) Remove() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.removed {
		return nil
	}
	c.removed = true
	var errs []error
	if runc, err := runcPath(); err == nil {
		out, err := exec.Command(runc, "--root", c.bed.runcRoot, "delete", "--force", c.ID).CombinedOutput()
		if err != nil && !strings.Contains(string(out), "does not exist") {
			errs = append(errs, fmt.Errorf("runc delete %s: %w: %s", c.ID, err, out))
		}
	}
	if c.ECS != nil {
		c.bed.ecsMu.Lock()
		delete(c.bed.ecsTasks, c.ID)
		c.bed.ecsMu.Unlock()
	}
	errs = append(errs, os.RemoveAll(c.bundle), c.Netns.Detach())
	return errors.Join(errs...)
}
