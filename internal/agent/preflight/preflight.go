// Package preflight checks, before the agent starts, that this host can run it: kernel
// version, BTF, cgroup v2, permission to load BPF, bpffs, and what can be learnt about
// the instance's metadata options from inside. Each finding says in plain words what is
// missing and how to fix it, so that a failed service start explains itself in the
// journal (the systemd unit runs `imdsguard preflight` as ExecStartPre).
package preflight

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/imdsguard/imdsguard/internal/agent/cgroup"
	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/hostid"
)

// MinKernel is the oldest kernel the agent runs on: bpf_get_netns_cookie in sockops
// (which keys the broker's connections, issue 11) came in 5.15, SO_NETNS_COOKIE in 5.14,
// BPF ring buffers and CAP_BPF in 5.8.
var MinKernel = [2]int{5, 15}

// Status is how bad a finding is. Only Fail makes preflight (and the service) fail.
type Status int

// Statuses, from good to bad.
const (
	OK Status = iota
	Warn
	Fail
)

func (s Status) String() string {
	switch s {
	case OK:
		return "ok"
	case Warn:
		return "warn"
	default:
		return "FAIL"
	}
}

// Result is one check's finding.
type Result struct {
	Check  string
	Status Status
	Detail string // what was found
	Fix    string // how to fix it; empty when nothing needs doing
}

// Host is what the checks look at. Tests replace every field; Real returns the
// running host's.
type Host struct {
	// Root is prepended to every file path read (/proc/self/mountinfo, /sys/...).
	Root string
	// KernelRelease returns the running kernel's release, as uname -r prints it.
	KernelRelease func() (string, error)
	// LoadBPF loads and frees a trivial program of the type the agent uses.
	LoadBPF func() error
	// LoadPrograms loads imdsguard's own programs, unattached and unpinned, and frees
	// them: the one true answer to "does this kernel's verifier take them?". It returns
	// why the programs that record executables at exec did not load (nil when they
	// did) apart from a refusal of the whole set.
	LoadPrograms func() (execErr, err error)
	// NetnsCookie reads the agent's own network namespace cookie (SO_NETNS_COOKIE),
	// which it needs to tell its namespace's connections from containers'.
	NetnsCookie func() error
	// IMDS is the base URL of the metadata service ("http://169.254.169.254:80"); empty
	// skips the IMDS check.
	IMDS string
	// HTTP is the client for IMDS; its Timeout bounds the check.
	HTTP *http.Client
}

// Real returns the running host, with IMDS at the address and port of cfg.
func Real(cfg config.Config) Host {
	return Host{
		Root:          "/",
		KernelRelease: unameRelease,
		LoadBPF:       loadTrivialProgram,
		LoadPrograms: func() (error, error) {
			// The addresses as written: preflight may run on a config not yet validated.
			ip4, _ := netip.ParseAddr(cfg.IMDS.IPv4)
			ip6, _ := netip.ParseAddr(cfg.IMDS.IPv6)
			h, err := hook.Load(hook.Target{IPv4: ip4, IPv6: ip6, Port: uint16(cfg.IMDS.Port),
				BrokerPort: uint16(cfg.Broker.Port)}, "")
			if err != nil {
				return nil, err
			}
			return h.ExecIdentityError(), h.Close()
		},
		NetnsCookie: func() error { _, err := hook.OwnNetnsCookie(); return err },
		IMDS:        "http://" + net.JoinHostPort(cfg.IMDS.IPv4, strconv.Itoa(cfg.IMDS.Port)),
		HTTP: &http.Client{
			Timeout: 2 * time.Second,
			// IMDS answers directly; a redirect or an environment proxy would be
			// someone else answering.
			Transport:     &http.Transport{Proxy: nil, DisableKeepAlives: true},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
}

// Run performs every check, in a fixed order. cfg supplies the guarded cgroup.
func Run(ctx context.Context, h Host, cfg config.Config) []Result {
	// Both mount checks read it; each reports a read error in its own words.
	mountinfo, err := os.ReadFile(h.path("/proc/self/mountinfo"))
	results := []Result{
		h.checkKernel(),
		h.checkBTF(),
		h.checkCgroup(mountinfo, err, cfg.Cgroup),
		checkBPFFS(mountinfo, err),
		h.checkLockdown(),
		h.checkBPFLoad(),
	}
	// Probe what the agent needs rather than trust a version number: distributions
	// backport features, and a new enough version can still lack one.
	if results[len(results)-1].Status == OK && h.LoadPrograms != nil {
		results = append(results, h.checkPrograms()...)
	}
	if h.NetnsCookie != nil {
		results = append(results, h.checkNetnsCookie())
	}
	if h.IMDS != "" {
		results = append(results, h.checkIMDS(ctx))
	}
	return results
}

func (h Host) path(p string) string {
	return filepath.Join(h.Root, p)
}

func (h Host) checkKernel() Result {
	r := Result{Check: "kernel"}
	rel, err := h.KernelRelease()
	if err != nil {
		r.Status, r.Detail = Fail, fmt.Sprintf("cannot read the kernel release: %v", err)
		return r
	}
	major, minor, ok := parseRelease(rel)
	need := fmt.Sprintf("%d.%d", MinKernel[0], MinKernel[1])
	switch {
	case !ok:
		r.Status, r.Detail = Warn, fmt.Sprintf("kernel %q: version not understood; %s or newer is needed", rel, need)
	case major < MinKernel[0] || major == MinKernel[0] && minor < MinKernel[1]:
		r.Status, r.Detail = Fail, fmt.Sprintf("kernel %s is too old: %s or newer is needed (BPF ring buffer, CAP_BPF)", rel, need)
		r.Fix = "boot a newer kernel: Amazon Linux 2023, Ubuntu 20.10+ and Debian 11+ have one; on Amazon Linux 2 install kernel-5.10 or 5.15 (amazon-linux-extras)"
	default:
		r.Detail = fmt.Sprintf("%s (%s or newer needed; the probes below say what works)", rel, need)
	}
	return r
}

// parseRelease reads "6.18.0-1-cloud-amd64" as 6, 18.
func parseRelease(rel string) (major, minor int, ok bool) {
	parts := strings.SplitN(rel, ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(parts[0])
	digits := strings.IndexFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' })
	if digits >= 0 {
		parts[1] = parts[1][:digits]
	}
	minor, err2 := strconv.Atoi(parts[1])
	return major, minor, err1 == nil && err2 == nil
}

func (h Host) checkBTF() Result {
	r := Result{Check: "btf"}
	p := h.path("/sys/kernel/btf/vmlinux")
	f, err := os.Open(p)
	if err != nil {
		r.Status = Fail
		r.Detail = fmt.Sprintf("kernel BTF is not available at /sys/kernel/btf/vmlinux: %v", shortErr(err))
		r.Fix = "the agent's BPF programs are compiled once (CO-RE) and need the kernel's type information: use a kernel built with CONFIG_DEBUG_INFO_BTF=y (stock kernels of Amazon Linux 2023, Ubuntu 20.10+ and Debian 11+ are)"
		return r
	}
	f.Close()
	r.Detail = "/sys/kernel/btf/vmlinux present"
	return r
}

func (h Host) checkCgroup(mountinfo []byte, readErr error, guarded string) Result {
	r := Result{Check: "cgroup v2"}
	if readErr != nil {
		r.Status, r.Detail = Fail, fmt.Sprintf("cannot read /proc/self/mountinfo: %v", shortErr(readErr))
		r.Fix = "mount /proc"
		return r
	}
	mnt, err := cgroup.FindMount(bytes.NewReader(mountinfo))
	if err != nil {
		r.Status, r.Detail = Fail, err.Error()
		return r
	}
	if mnt == "" {
		r.Status = Warn
		r.Detail = "no cgroup2 file system is mounted (cgroup v1 only); the agent mounts its own at " + cgroup.OwnMount + " and guards every process from there"
		r.Fix = "to use cgroup v2 for everything, boot with systemd.unified_cgroup_hierarchy=1"
		if guarded != "" {
			r.Status = Fail
			r.Detail = fmt.Sprintf("config names cgroup %s, but no cgroup2 file system is mounted", guarded)
			r.Fix = "remove the cgroup key from the config (the agent then guards every process), or mount cgroup2"
		}
		return r
	}
	r.Detail = "cgroup2 mounted at " + mnt
	if guarded == "" {
		return r
	}
	if rel, err := filepath.Rel(mnt, guarded); err != nil || strings.HasPrefix(rel, "..") {
		r.Status = Fail
		r.Detail = fmt.Sprintf("config names cgroup %s, which is not under the cgroup2 mount %s", guarded, mnt)
		r.Fix = "set cgroup to a directory under " + mnt + ", or remove the key to guard every process"
		return r
	}
	if fi, err := os.Stat(h.path(guarded)); err != nil || !fi.IsDir() {
		r.Status = Fail
		r.Detail = fmt.Sprintf("config names cgroup %s, which does not exist", guarded)
		r.Fix = "create it first (mkdir " + guarded + "), or remove the cgroup key to guard every process"
		return r
	}
	r.Detail += "; guarding " + guarded
	return r
}

func checkBPFFS(mountinfo []byte, readErr error) Result {
	r := Result{Check: "bpffs"}
	if readErr != nil {
		r.Status, r.Detail = Warn, "cannot read /proc/self/mountinfo"
		return r
	}
	for _, line := range strings.Split(string(mountinfo), "\n") {
		fields := strings.Fields(line)
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) && fields[i+1] == "bpf" && i >= 5 && fields[4] == "/sys/fs/bpf" {
				r.Detail = "bpf file system mounted at /sys/fs/bpf"
				return r
			}
		}
	}
	r.Status = Warn
	r.Detail = "no bpf file system at /sys/fs/bpf: pinned programs cannot keep guarding across an agent restart or upgrade"
	r.Fix = "mount -t bpf bpf /sys/fs/bpf (systemd does this at boot; add it to /etc/fstab on hosts without systemd)"
	return r
}

// checkLockdown reports kernel lockdown: in "confidentiality" mode BPF may not read
// kernel memory, which the connect programs do to name the executable.
func (h Host) checkLockdown() Result {
	r := Result{Check: "lockdown"}
	data, err := os.ReadFile(h.path("/sys/kernel/security/lockdown"))
	if err != nil {
		r.Detail = "no lockdown information (securityfs not mounted): assuming none"
		return r
	}
	mode := string(data)
	if i, j := strings.Index(mode, "["), strings.Index(mode, "]"); i >= 0 && j > i {
		mode = mode[i+1 : j]
	}
	mode = strings.TrimSpace(mode)
	if mode == "confidentiality" {
		r.Status = Fail
		r.Detail = "kernel lockdown is in confidentiality mode: BPF programs may not read kernel memory"
		r.Fix = "boot with lockdown=integrity (or none); integrity mode is enough to protect the kernel and lets the agent run"
		return r
	}
	r.Detail = "lockdown: " + mode
	return r
}

func (h Host) checkBPFLoad() Result {
	r := Result{Check: "bpf permission"}
	err := h.LoadBPF()
	switch {
	case err == nil:
		r.Detail = "loaded a cgroup/connect4 test program"
	case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
		r.Status = Fail
		r.Detail = fmt.Sprintf("not allowed to load BPF programs: %v", err)
		r.Fix = "run as root, or give the agent CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_PTRACE (the packaged systemd unit does); in a container, run it privileged"
	default:
		r.Status = Fail
		r.Detail = fmt.Sprintf("loading a test BPF program failed: %v", err)
		r.Fix = "the kernel must have CONFIG_BPF_SYSCALL=y and CONFIG_CGROUP_BPF=y"
	}
	return r
}

// checkPrograms loads the agent's programs: whether the verifier takes them, and whether
// the ones that record each executable at exec load too (else exe rules match
// mm->exe_file, which a process can repoint).
func (h Host) checkPrograms() []Result {
	r := Result{Check: "bpf programs"}
	start := time.Now()
	execErr, err := h.LoadPrograms()
	if err != nil {
		r.Status = Fail
		r.Detail = fmt.Sprintf("this kernel refused imdsguard's programs: %v", err)
		r.Fix = "the programs need BTF, the BPF ring buffer and BPF-to-BPF global functions (Linux 5.14 or newer, or a distribution kernel with them backported); see docs/install-and-operate.md#kernels"
		return []Result{r}
	}
	r.Detail = fmt.Sprintf("the verifier took imdsguard's programs in %d ms", time.Since(start).Milliseconds())
	x := Result{Check: "exec identity", Detail: "exe rules match the file each process exec'd (tp_btf sched_process_exec/fork, task storage)"}
	if execErr != nil {
		x.Status = Warn
		x.Detail = fmt.Sprintf("the programs that record executables at exec did not load (%v): exe rules match mm->exe_file, which an unprivileged process in a user namespace can point at another program's file (prctl PR_SET_MM_MAP)", execErr)
		x.Fix = "they need BTF tracing programs (tp_btf) and task storage in tracing and cgroup programs: Linux 5.14 or newer with CONFIG_DEBUG_INFO_BTF=y; see docs/install-and-operate.md#kernels"
	}
	return []Result{r, x}
}

func (h Host) checkNetnsCookie() Result {
	r := Result{Check: "netns cookie"}
	if err := h.NetnsCookie(); err != nil {
		r.Status = Fail
		r.Detail = fmt.Sprintf("cannot read the agent's network namespace cookie: %v", err)
		r.Fix = "SO_NETNS_COOKIE came in Linux 5.14: boot a 5.15 or newer kernel (Amazon Linux 2: the kernel-5.15 extra); without it the agent cannot tell its own namespace's connections from containers'"
		return r
	}
	r.Detail = "SO_NETNS_COOKIE works"
	return r
}

// loadTrivialProgram loads `return 1` as a cgroup/connect4 program: the same type,
// and so the same permission checks, as the agent's own.
func loadTrivialProgram() error {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK. Its removal probes bpf()
	// first, so without CAP_BPF (or under a seccomp filter) it fails too: then the
	// program's own load below says what is really refused.
	memlockErr := rlimit.RemoveMemlock()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "preflight",
		Type:         ebpf.CGroupSockAddr,
		AttachType:   ebpf.AttachCGroupInet4Connect,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		if memlockErr != nil {
			return fmt.Errorf("load program: %w (and the memlock limit could not be raised: %v)", err, memlockErr)
		}
		return fmt.Errorf("load program: %w", err)
	}
	return prog.Close()
}

// checkIMDS asks IMDS for a session token and, with it, the instance id. It never
// makes a token-less (IMDSv1) request: that would count in the instance's
// MetadataNoToken metric, which operators watch to find IMDSv1 users.
func (h Host) checkIMDS(ctx context.Context) Result {
	r := Result{Check: "imds"}
	fail := func(detail string) Result {
		r.Status = Warn
		r.Detail = detail
		r.Fix = "not needed to guard this host; on EC2, check that the metadata endpoint is enabled (aws ec2 modify-instance-metadata-options --http-endpoint enabled)"
		return r
	}
	// The agent's own IMDS client: IMDSv2 only, one try.
	id, err := hostid.NewClient(h.IMDS, h.HTTP).Metadata(ctx, "instance-id")
	if err != nil {
		return fail(fmt.Sprintf("IMDSv2 at %s is not reachable or did not answer (not on EC2, the endpoint is disabled, or the network is not up yet): %v", h.IMDS, err))
	}
	r.Detail = fmt.Sprintf("IMDSv2 works at %s (instance %s). Not visible from inside: whether IMDSv1 is refused (HttpTokens) and the hop limit; check them with aws ec2 describe-instances --query 'Reservations[].Instances[].MetadataOptions'", h.IMDS, id)
	return r
}

func unameRelease() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("uname: %w", err)
	}
	return unix.ByteSliceToString(u.Release[:]), nil
}

// shortErr drops the path an *os.PathError repeats.
func shortErr(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// Write prints results as aligned lines, with the fix under each problem, and
// returns how many failed.
func Write(w io.Writer, results []Result) int {
	failed := 0
	for _, r := range results {
		fmt.Fprintf(w, "%-4s  %-15s %s\n", r.Status, r.Check, r.Detail)
		if r.Fix != "" && r.Status != OK {
			fmt.Fprintf(w, "      %-15s fix: %s\n", "", r.Fix)
		}
		if r.Status == Fail {
			failed++
		}
	}
	return failed
}

// Check runs every check for cfg on this host, prints the report and fails when any
// check did. noIMDS skips reaching IMDS (the unit starts before the network is up).
func Check(ctx context.Context, cfg config.Config, noIMDS bool, stdout io.Writer) error {
	h := Real(cfg)
	if noIMDS {
		h.IMDS = ""
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if n := Write(stdout, Run(ctx, h, cfg)); n > 0 {
		return fmt.Errorf("preflight: %d check(s) failed; the agent cannot run on this host until they are fixed", n)
	}
	return nil
}
