// Package testbed brings up a private copy of an EC2 instance's view of IMDS on one
// Linux box, so that every part of imdsguard is proven against real kernels and real
// clients without touching the machine's own network or cgroups:
//
//   - a network namespace in which 169.254.169.254 and fd00:ec2::254 are local addresses
//     served by amazon-ec2-metadata-mock (AWS's own IMDS emulator), with fresh credentials;
//   - a child cgroup v2 that BPF programs attach to, so they guard only the bed's
//     processes;
//   - helpers that run client processes inside both.
//
// Everything is removed by Close, which tests call through tb.Cleanup.
package testbed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	aemmdynamic "github.com/aws/amazon-ec2-metadata-mock/pkg/mock/dynamic/types"

	"github.com/imdsguard/imdsguard/internal/agent/cgroup"
	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
)

// Addresses of IMDS inside the bed, the same as on EC2.
var (
	IMDSv4 = netip.MustParseAddr("169.254.169.254")
	IMDSv6 = netip.MustParseAddr("fd00:ec2::254")
)

// IMDSPort is where the emulator listens inside the bed.
const IMDSPort = 80

// Role is the IAM role name the emulator serves credentials for.
const Role = "baskinc-role"

// Credentials are what the emulator hands out for Role. They are fresh per bed so
// that SDK clients, which refuse expired credentials, accept them.
type Credentials struct {
	AccessKeyID     string
	SecretAccessKey string
	Token           string
	Expiration      time.Time
}

// Options shape a bed.
type Options struct {
	// IMDSv2Only makes the emulator refuse requests without a session token.
	IMDSv2Only bool
	// Log receives the emulator's output; nil discards it.
	Log io.Writer
	// ContainerView readies the bed for real containers (StartContainer, RunContainer):
	// its agent sees the bed's cgroup as the cgroup root, as an agent on a node sees
	// the host's, and an ECS agent introspection stand-in answers in the bed.
	ContainerView bool
	// CredentialEndpoints serves the ECS and Pod Identity stand-ins
	// (internal/testing/containercreds) at 169.254.170.2:80, 169.254.170.23:80 and
	// [fd00:ec2::23]:80 in the bed, and IMDS's emulator on IMDS's addresses only (one
	// per address, which costs start time).
	CredentialEndpoints bool
}

// Bed is one running test bed.
type Bed struct {
	Name       string // network namespace name, also the cgroup's base name
	NetnsPath  string // /run/netns/<Name>: for nsenter --net and setns
	CgroupRoot string // the host's cgroup2 mount
	Cgroup     string // the bed's child cgroup directory
	Creds      Credentials
	InstanceID string
	AccountID  string // the identity document's accountId
	// IdentityDocument is exactly what the emulator serves at
	// /latest/dynamic/instance-identity/document, and /pkcs7 serves its signature by a
	// test certificate, SigningCertPEM: give that to the intake as its AWS certificate.
	IdentityDocument []byte
	SigningCertPEM   []byte
	Dir              string // scratch directory, removed on Close
	BPFFS            string // a bpf file system of the bed's own, for pins
	EmulatorPID      int

	emulator  *exec.Cmd
	emulators []emulatorProc
	waitErr   chan error
	stopOnce  sync.Once

	mu        sync.Mutex
	cgroupFDs map[*exec.Cmd]func() // cgroup fds of commands not yet started
	closers   []func() error
	closed    bool

	netnsSeq atomic.Int64 // container namespaces made
	containerState
	containerView bool
}

var (
	seq      atomic.Uint64
	reapOnce sync.Once
)

// cgroupRootNoMount finds the cgroup2 mount without mounting one.
func cgroupRootNoMount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	return cgroup.FindMount(f)
}

// New builds a bed. It needs root; on any failure what was already built is removed.
func New(opts Options) (b *Bed, err error) {
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	reapOnce.Do(ReapStale)
	name := fmt.Sprintf("imdsguard-t%d-%d", os.Getpid(), seq.Add(1))
	b = &Bed{Name: name, NetnsPath: "/run/netns/" + name, cgroupFDs: map[*exec.Cmd]func(){}}
	defer func() {
		if err != nil {
			_ = b.Close()
			b = nil
		}
	}()
	if b.Dir, err = os.MkdirTemp("", name+"-"); err != nil {
		return nil, fmt.Errorf("create scratch dir: %w", err)
	}
	// Clients run as an unprivileged uid must be able to reach binaries in it.
	if err := os.Chmod(b.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("chmod scratch dir: %w", err)
	}
	b.closers = append(b.closers, func() error { return os.RemoveAll(b.Dir) })
	// Pins go to a bpf file system of the bed's own, never the host's /sys/fs/bpf;
	// unmounting it drops whatever a test left pinned there.
	b.BPFFS = filepath.Join(b.Dir, "bpffs")
	if err := os.Mkdir(b.BPFFS, 0o700); err != nil {
		return nil, fmt.Errorf("create bpffs mount point: %w", err)
	}
	if err := run("mount", "-t", "bpf", "bpf", b.BPFFS); err != nil {
		return nil, fmt.Errorf("mount bpffs: %w", err)
	}
	b.closers = append(b.closers, func() error { return run("umount", "-l", b.BPFFS) })
	if err := b.makeNetns(); err != nil {
		return nil, err
	}
	if err := b.makeCgroup(); err != nil {
		return nil, err
	}
	if opts.ContainerView {
		if err := b.setUpContainerView(); err != nil {
			return nil, err
		}
	}
	if opts.CredentialEndpoints {
		if err := b.setUpCredentialEndpoints(); err != nil {
			return nil, err
		}
	}
	if err := b.startEmulator(opts); err != nil {
		return nil, err
	}
	return b, nil
}

// ErrNotRoot is returned when the bed cannot be built for lack of privileges.
var ErrNotRoot = errors.New("testbed needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF)")

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (b *Bed) makeNetns() error {
	if err := run("ip", "netns", "add", b.Name); err != nil {
		return fmt.Errorf("create network namespace: %w", err)
	}
	b.closers = append(b.closers, func() error { return run("ip", "netns", "del", b.Name) })
	// No dummy link type on some kernels: IMDS's addresses go on the namespace's lo.
	for _, args := range [][]string{
		{"-n", b.Name, "link", "set", "lo", "up"},
		{"-n", b.Name, "addr", "add", IMDSv4.String() + "/32", "dev", "lo"},
		{"-n", b.Name, "-6", "addr", "add", IMDSv6.String() + "/128", "dev", "lo", "nodad"},
	} {
		if err := run("ip", args...); err != nil {
			return fmt.Errorf("set up network namespace: %w", err)
		}
	}
	return nil
}

func (b *Bed) makeCgroup() error {
	root, err := cgroup.Root()
	if err != nil {
		return fmt.Errorf("find cgroup2: %w", err)
	}
	b.CgroupRoot = root
	b.Cgroup = filepath.Join(root, b.Name)
	if err := os.Mkdir(b.Cgroup, 0o755); err != nil {
		return fmt.Errorf("create cgroup: %w", err)
	}
	b.closers = append(b.closers, func() error { return removeCgroup(b.Cgroup) })
	return nil
}

// removeCgroup kills whatever still runs in dir and removes it, children first.
func removeCgroup(dir string) error {
	if entries, err := os.ReadDir(dir); err == nil {
		for _, e := range entries {
			if e.IsDir() {
				if err := removeCgroup(filepath.Join(dir, e.Name())); err != nil {
					return err
				}
			}
		}
	}
	// cgroup.kill (5.14+) kills every process in the subtree at once.
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		killProcs(dir)
	}
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		killProcs(dir)
	}
	return fmt.Errorf("remove cgroup %s: %w", dir, err)
}

func killProcs(dir string) {
	data, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	for _, f := range strings.Fields(string(data)) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

func (b *Bed) startEmulator(opts Options) error {
	bin, err := Emulator()
	if err != nil {
		return err
	}
	b.InstanceID = "i-1234567890abcdef0"
	now := time.Now().UTC().Truncate(time.Second)
	b.Creds = Credentials{
		AccessKeyID:     "ASIA" + strings.ToUpper(randHex(8)),
		SecretAccessKey: "secret-" + randHex(16),
		Token:           "token-" + randHex(24),
		Expiration:      now.Add(6 * time.Hour),
	}
	signed, err := b.signIdentity(now)
	if err != nil {
		return err
	}
	conf := map[string]any{"dynamic": map[string]any{"values": signed}, "metadata": map[string]any{"values": map[string]any{
		"iam-security-credentials": map[string]any{
			"Code": "Success", "Type": "AWS-HMAC",
			"LastUpdated":     now.Format(time.RFC3339),
			"AccessKeyId":     b.Creds.AccessKeyID,
			"SecretAccessKey": b.Creds.SecretAccessKey,
			"Token":           b.Creds.Token,
			"Expiration":      b.Creds.Expiration.Format(time.RFC3339),
		},
	}}}
	confPath := filepath.Join(b.Dir, "aemm-config.json")
	data, _ := json.Marshal(conf)
	if err := os.WriteFile(confPath, data, 0o600); err != nil {
		return fmt.Errorf("write emulator config: %w", err)
	}
	// 0.0.0.0 listens dual-stack, so one emulator serves both IMDS addresses; the
	// namespace is private, so nothing else can reach it. With the credential
	// endpoints on port 80 too, one emulator per IMDS address.
	hosts := []string{"0.0.0.0"}
	if opts.CredentialEndpoints {
		hosts = []string{IMDSv4.String(), "[" + IMDSv6.String() + "]"} // joined to the port with ":"
	}
	w := opts.Log
	if w == nil {
		w = io.Discard
	}
	b.waitErr = make(chan error, len(hosts))
	for _, host := range hosts {
		args := []string{"--net=" + b.NetnsPath, bin, "-n", host, "-p", strconv.Itoa(IMDSPort), "-c", confPath}
		if opts.IMDSv2Only {
			args = append(args, "-I")
		}
		cmd := exec.Command("nsenter", args...)
		cmd.Dir = b.Dir
		cmd.Env = append(os.Environ(), "HOME="+b.Dir)
		cmd.Stdout, cmd.Stderr = w, w
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		waitErr, err := startPinned(cmd)
		if err != nil {
			return fmt.Errorf("start emulator: %w", err)
		}
		if b.emulator == nil {
			b.emulator, b.EmulatorPID = cmd, cmd.Process.Pid
		}
		b.emulators = append(b.emulators, emulatorProc{cmd, waitErr})
	}
	go func() {
		for _, e := range b.emulators {
			b.waitErr <- <-e.done
		}
	}()
	b.closers = append(b.closers, func() error {
		b.StopEmulator()
		return nil
	})
	if err := b.waitReady("http://" + IMDSv4.String()); err != nil {
		return err
	}
	if len(hosts) > 1 {
		return b.waitReady("http://[" + IMDSv6.String() + "]")
	}
	return nil
}

// emulatorProc is one running emulator.
type emulatorProc struct {
	cmd  *exec.Cmd
	done <-chan error
}

// StopEmulator kills the emulator: IMDS is down and its address refuses connections,
// for tests of what clients see then. Close does it too.
func (b *Bed) StopEmulator() {
	b.stopOnce.Do(func() {
		for _, e := range b.emulators {
			_ = e.cmd.Process.Kill()
		}
		for range b.emulators {
			<-b.waitErr
		}
	})
}

var (
	signerOnce sync.Once
	signer     *iddoc.Signer
	signerErr  error
)

// signIdentity makes the bed's identity document and its PKCS#7 signature, as the
// emulator's config values. The document is rendered the way the emulator renders it
// (tab-indented JSON of its own type), so the signature covers the bytes it serves.
func (b *Bed) signIdentity(now time.Time) (map[string]any, error) {
	signerOnce.Do(func() { signer, signerErr = iddoc.NewSigner() })
	if signerErr != nil {
		return nil, signerErr
	}
	b.AccountID = "123456789012"
	doc := aemmdynamic.InstanceIdentityDocument{
		AccountId: b.AccountID, ImageId: "ami-0b69ea66ff7391e80", AvailabilityZone: "us-east-1f",
		Version: "2017-09-30", PrivateIp: "10.0.7.10", InstanceId: b.InstanceID,
		PendingTime: now.Add(-time.Hour).Format(time.RFC3339), Architecture: "x86_64",
		InstanceType: "m4.xlarge", Region: "us-east-1",
	}
	data, err := json.MarshalIndent(doc, "", "\t")
	if err != nil {
		return nil, fmt.Errorf("encode identity document: %w", err)
	}
	p7, err := signer.Sign(data)
	if err != nil {
		return nil, fmt.Errorf("sign identity document: %w", err)
	}
	b.IdentityDocument, b.SigningCertPEM = data, signer.CertPEM
	return map[string]any{"instance-identity-document": doc, "instance-identity-pkcs": p7}, nil
}

// waitReady polls the emulator from inside the namespace until it answers.
func (b *Bed) waitReady(base string) error {
	client := b.HTTPClient()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-b.waitErr:
			b.waitErr <- err
			return fmt.Errorf("emulator exited before it was ready: %v", err)
		default:
		}
		resp, err := client.Get(base + "/latest/meta-data/instance-id")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("emulator not ready after 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Close tears the bed down, in reverse order of creation, and reports every failure.
func (b *Bed) Close() error {
	if b == nil || b.closed {
		return nil
	}
	b.closed = true
	var errs []error
	for i := len(b.closers) - 1; i >= 0; i-- {
		if err := b.closers[i](); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// HTTPClient returns a client whose sockets are created inside the bed's network
// namespace. The calling process is not in the bed's cgroup, so its connections are
// not seen by hooks attached there.
func (b *Bed) HTTPClient() *http.Client {
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext:       b.DialContext,
			DisableKeepAlives: true,
		},
	}
}

// DialContext dials from inside the bed's network namespace.
func (b *Bed) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := InNetns(b.NetnsPath, func() error {
		var err error
		conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

var buildMu sync.Mutex

// startPinned starts cmd from an OS thread that stays alive until cmd exits. Pdeathsig
// is tied to the thread that started the child, not the process: a child started from
// a thread the Go runtime later retires would be killed mid-test.
func startPinned(cmd *exec.Cmd) (<-chan error, error) {
	started := make(chan error, 1)
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		done <- cmd.Wait()
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return done, nil
}
