package preflight

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

const mountinfoV2 = `22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
41 31 0:38 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700
`

const mountinfoV1 = `22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
41 31 0:38 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
`

// fakeHost builds a root directory with the given files and a Host that reads it;
// no check touches the machine's kernel or network.
func fakeHost(t *testing.T, files map[string]string) Host {
	t.Helper()
	root := t.TempDir()
	for name, content := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return Host{
		Root:          root,
		KernelRelease: func() (string, error) { return "6.1.0-13-cloud-amd64", nil },
		LoadBPF:       func() error { return nil },
	}
}

func byCheck(results []Result) map[string]Result {
	m := map[string]Result{}
	for _, r := range results {
		m[r.Check] = r
	}
	return m
}

func TestHealthyHost(t *testing.T) {
	h := fakeHost(t, map[string]string{
		"proc/self/mountinfo":          mountinfoV2,
		"sys/kernel/btf/vmlinux":       "btf",
		"sys/kernel/security/lockdown": "[none] integrity confidentiality\n",
		"sys/kernel/security/lsm":      "lockdown,capability,landlock,bpf",
	})
	var out bytes.Buffer
	if n := Write(&out, Run(context.Background(), h, config.Default())); n != 0 {
		t.Fatalf("%d failures on a healthy host:\n%s", n, out.String())
	}
	if strings.Contains(out.String(), "warn") || strings.Contains(out.String(), "fix:") {
		t.Errorf("warnings on a healthy host:\n%s", out.String())
	}
	for _, want := range []string{"6.1.0-13-cloud-amd64", "cgroup2 mounted at /sys/fs/cgroup", "bpf file system mounted"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestBrokenHost(t *testing.T) {
	h := fakeHost(t, map[string]string{
		"proc/self/mountinfo":          mountinfoV1,
		"sys/kernel/security/lockdown": "none integrity [confidentiality]\n",
	})
	h.KernelRelease = func() (string, error) { return "4.14.355-275.570.amzn2.x86_64", nil }
	h.LoadBPF = func() error { return fmt.Errorf("load program: %w", unix.EPERM) }
	cfg := config.Default()
	results := byCheck(Run(context.Background(), h, cfg))
	for check, want := range map[string]Status{
		"kernel":         Fail,
		"btf":            Fail,
		"cgroup v2":      Warn, // the agent mounts its own cgroup2
		"bpffs":          Warn,
		"lockdown":       Fail,
		"bpf permission": Fail,
	} {
		r, ok := results[check]
		if !ok {
			t.Errorf("no %q result", check)
			continue
		}
		if r.Status != want {
			t.Errorf("%s: status %v, want %v (%s)", check, r.Status, want, r.Detail)
		}
		if r.Fix == "" {
			t.Errorf("%s: no fix given for %q", check, r.Detail)
		}
	}
	if !strings.Contains(results["bpf permission"].Fix, "CAP_BPF") {
		t.Errorf("bpf permission fix does not name the capability: %q", results["bpf permission"].Fix)
	}
	var out bytes.Buffer
	if n := Write(&out, Run(context.Background(), h, cfg)); n != 4 {
		t.Errorf("Write counted %d failures, want 4:\n%s", n, out.String())
	}
}

func TestGuardedCgroup(t *testing.T) {
	h := fakeHost(t, map[string]string{
		"proc/self/mountinfo":                mountinfoV2,
		"sys/fs/cgroup/workload.slice/.keep": "",
		"sys/kernel/btf/vmlinux":             "btf",
	})
	for _, tc := range []struct {
		cgroup string
		want   Status
	}{
		{"/sys/fs/cgroup/workload.slice", OK},
		{"/sys/fs/cgroup/missing.slice", Fail},
		{"/tmp/elsewhere", Fail},
	} {
		r := h.checkCgroup([]byte(mountinfoV2), nil, tc.cgroup)
		if r.Status != tc.want {
			t.Errorf("cgroup %s: status %v, want %v (%s)", tc.cgroup, r.Status, tc.want, r.Detail)
		}
	}
	if r := h.checkCgroup([]byte(mountinfoV1), nil, "/sys/fs/cgroup/x"); r.Status != Fail {
		t.Errorf("named cgroup on a v1-only host: status %v, want FAIL", r.Status)
	}
}

func TestParseRelease(t *testing.T) {
	for rel, want := range map[string][2]int{
		"6.18.0":                        {6, 18},
		"5.10.228-219.884.amzn2.x86_64": {5, 10},
		"6.8.0-1015-aws":                {6, 8},
		"5.15rc2":                       {5, 15},
	} {
		major, minor, ok := parseRelease(rel)
		if !ok || major != want[0] || minor != want[1] {
			t.Errorf("parseRelease(%q) = %d, %d, %v; want %v", rel, major, minor, ok, want)
		}
	}
	if _, _, ok := parseRelease("garbage"); ok {
		t.Error("parseRelease(garbage) succeeded")
	}
}

// imdsStub answers like IMDS: tokens only by PUT, metadata only with a token, and it
// fails the test on any token-less GET (which would count in MetadataNoToken).
func imdsStub(t *testing.T) *httptest.Server {
	t.Helper()
	const token = "tok-123"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			if r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds") == "" {
				http.Error(w, "missing ttl", http.StatusBadRequest)
				return
			}
			// Real IMDS echoes the TTL; the SDK needs it.
			w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds"))
			fmt.Fprint(w, token)
		case r.Method == http.MethodGet && r.URL.Path == "/latest/meta-data/instance-id":
			if r.Header.Get("X-aws-ec2-metadata-token") != token {
				t.Errorf("preflight made a GET without the token")
				http.Error(w, "", http.StatusUnauthorized)
				return
			}
			fmt.Fprint(w, "i-0123456789abcdef0")
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestIMDS(t *testing.T) {
	srv := imdsStub(t)
	h := Host{IMDS: srv.URL, HTTP: srv.Client()}
	r := h.checkIMDS(context.Background())
	if r.Status != OK || !strings.Contains(r.Detail, "i-0123456789abcdef0") || !strings.Contains(r.Detail, "HttpTokens") {
		t.Errorf("working IMDS: %v %q", r.Status, r.Detail)
	}

	// A listener that is gone: unreachable is a warning, never a failure, since the
	// agent guards the host without IMDS answering.
	dead := httptest.NewServer(http.NotFoundHandler())
	url := dead.URL
	dead.Close()
	h = Host{IMDS: url, HTTP: &http.Client{}}
	r = h.checkIMDS(context.Background())
	if r.Status != Warn || !strings.Contains(r.Detail, "not reachable") {
		t.Errorf("unreachable IMDS: %v %q", r.Status, r.Detail)
	}

	// Something that is not IMDS (here: 404 to the token PUT).
	other := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(other.Close)
	h = Host{IMDS: other.URL, HTTP: other.Client()}
	if r = h.checkIMDS(context.Background()); r.Status != Warn || !strings.Contains(r.Detail, "404") {
		t.Errorf("non-IMDS server: %v %q", r.Status, r.Detail)
	}
}

func TestRealUsesConfiguredIMDS(t *testing.T) {
	cfg, err := config.Parse([]byte("imds:\n  ipv4: 127.0.0.1\n  port: 8080\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := Real(cfg).IMDS; got != "http://127.0.0.1:8080" {
		t.Errorf("IMDS base = %q", got)
	}
}

// The probes decide, not the version: a kernel whose verifier refuses the programs, or
// that lacks SO_NETNS_COOKIE, fails preflight whatever uname says, and says what to do.
func TestProbesDecide(t *testing.T) {
	files := map[string]string{
		"proc/self/mountinfo":          mountinfoV2,
		"sys/kernel/btf/vmlinux":       "btf",
		"sys/kernel/security/lockdown": "[none] integrity confidentiality\n",
	}
	h := fakeHost(t, files)
	h.LoadPrograms = func() (error, error) { return nil, nil }
	h.NetnsCookie = func() error { return nil }
	results := byCheck(Run(context.Background(), h, config.Default()))
	if results["bpf programs"].Status != OK || results["netns cookie"].Status != OK || results["exec identity"].Status != OK {
		t.Fatalf("probes on a good kernel: %+v %+v %+v", results["bpf programs"], results["netns cookie"], results["exec identity"])
	}

	// The programs load but the exec recorders do not: exe rules are borrowable.
	h.LoadPrograms = func() (error, error) { return errors.New("load program imds_exec: invalid argument"), nil }
	results = byCheck(Run(context.Background(), h, config.Default()))
	if r := results["exec identity"]; r.Status != Warn || r.Fix == "" || results["bpf programs"].Status != OK {
		t.Errorf("exec identity without its programs: %+v", r)
	}

	// A 6.1 kernel (uname looks fine) that lacks what the programs need.
	h.LoadPrograms = func() (error, error) { return nil, errors.New("load program connect4: invalid argument") }
	h.NetnsCookie = func() error { return fmt.Errorf("read netns cookie: %w", unix.ENOPROTOOPT) }
	results = byCheck(Run(context.Background(), h, config.Default()))
	for _, check := range []string{"bpf programs", "netns cookie"} {
		r := results[check]
		if r.Status != Fail || r.Fix == "" {
			t.Errorf("%s: %v %q (fix %q), want a failure with a fix", check, r.Status, r.Detail, r.Fix)
		}
	}
	if results["kernel"].Status != OK {
		t.Errorf("kernel check: %v; the version alone was fine", results["kernel"].Status)
	}

	// Without permission to load, the program probe is not attempted: one clear failure.
	h.LoadBPF = func() error { return fmt.Errorf("load program: %w", unix.EPERM) }
	h.LoadPrograms = func() (error, error) { t.Error("programs loaded without permission"); return nil, nil }
	results = byCheck(Run(context.Background(), h, config.Default()))
	if _, ok := results["bpf programs"]; ok {
		t.Error("program probe ran after the permission check failed")
	}
}

// On this machine, as root, the real probes pass: the programs verify and the cookie
// reads.
func TestPrivilegedRealProbes(t *testing.T) {
	testbed.RequirePrivileged(t)
	h := Real(config.Default())
	for _, r := range h.checkPrograms() {
		if r.Status != OK {
			t.Errorf("%s: %s", r.Check, r.Detail)
		}
	}
	if r := h.checkNetnsCookie(); r.Status != OK {
		t.Errorf("netns cookie: %s", r.Detail)
	}
}
