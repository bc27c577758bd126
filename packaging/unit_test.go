package packaging

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

const unitFile = "imdsguard.service"

// unitValues returns every value of key in the unit file, in order.
func unitValues(t *testing.T, key string) []string {
	t.Helper()
	f, err := os.Open(unitFile)
	if err != nil {
		t.Fatalf("open unit: %v", err)
	}
	defer f.Close()
	var vals []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if k, v, ok := strings.Cut(line, "="); ok && k == key && !strings.HasPrefix(line, "#") {
			vals = append(vals, v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("read unit: %v", err)
	}
	return vals
}

// unitCaps returns the unit's CapabilityBoundingSet as setpriv names (bpf, net_admin).
func unitCaps(t *testing.T) []string {
	t.Helper()
	vals := unitValues(t, "CapabilityBoundingSet")
	if len(vals) != 1 {
		t.Fatalf("unit has %d CapabilityBoundingSet lines, want 1", len(vals))
	}
	var caps []string
	for _, c := range strings.Fields(vals[0]) {
		caps = append(caps, strings.ToLower(strings.TrimPrefix(c, "CAP_")))
	}
	return caps
}

// fakeRoot is a directory with the unit and stand-ins for the programs it runs, so that
// systemd-analyze can check the unit without the package installed.
func fakeRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	unit, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{
		"usr/lib/systemd/system/" + unitFile: string(unit),
		"usr/bin/imdsguard":                  "#!/bin/sh\n",
		"bin/kill":                           "#!/bin/sh\n",
	} {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		mode := os.FileMode(0o755)
		if strings.HasSuffix(name, ".service") {
			mode = 0o644
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func systemdAnalyze(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("systemd-analyze")
	if err != nil {
		// `make deps` installs it; a laptop without systemd skips.
		t.Skip("systemd-analyze not installed (Debian package systemd; make deps installs it)")
	}
	return p
}

func TestUnitVerifies(t *testing.T) {
	sa := systemdAnalyze(t)
	root := fakeRoot(t)
	out, err := exec.Command(sa, "verify", "--root="+root, "/usr/lib/systemd/system/"+unitFile).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestUnitSecurityScore keeps the sandbox from eroding: systemd-analyze rates the
// unit's exposure from 0 (tight) to 10 (none); the agent needs root's view of /proc and
// BPF, so it cannot reach 0, but it must stay "OK" or better.
func TestUnitSecurityScore(t *testing.T) {
	sa := systemdAnalyze(t)
	root := fakeRoot(t)
	out, err := exec.Command(sa, "security", "--offline=true", "--root="+root, unitFile).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+) (\S+)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("no score in:\n%s", out)
	}
	t.Logf("systemd-analyze security: %s %s", m[1], m[2])
	if m[2] != "OK" && m[2] != "SAFE" {
		t.Errorf("exposure %s %s, want OK or better:\n%s", m[1], m[2], out)
	}
}

func TestUnitOrdering(t *testing.T) {
	before := strings.Join(unitValues(t, "Before"), " ")
	for _, want := range []string{"network-pre.target", "network-online.target", "cloud-init-local.service"} {
		if !strings.Contains(before, want) {
			t.Errorf("unit is not ordered before %s (Before=%s)", want, before)
		}
	}
	// Ordering means nothing unless systemd waits for the agent to say it is guarding.
	if got := unitValues(t, "Type"); len(got) != 1 || got[0] != "notify" {
		t.Errorf("Type=%v, want notify: with simple, units ordered after imdsguard start before it guards", got)
	}
	if got := unitValues(t, "WatchdogSec"); len(got) != 1 || got[0] == "0" {
		t.Errorf("WatchdogSec=%v: a wedged agent would never be restarted", got)
	}
	if got := unitValues(t, "Restart"); len(got) != 1 || got[0] != "always" {
		t.Errorf("Restart=%v, want always", got)
	}
	pre := unitValues(t, "ExecStartPre")
	if len(pre) != 1 || !strings.Contains(pre[0], "imdsguard preflight") {
		t.Errorf("ExecStartPre=%v, want imdsguard preflight", pre)
	}
	for _, v := range unitValues(t, "ExecStart") {
		if strings.Contains(v, "--unpin-on-exit") {
			t.Errorf("ExecStart unpins on exit: a restart would leave IMDS unguarded: %s", v)
		}
	}
}

// TestUnitBPFFSWritable: systemd's ProtectKernelTunables=yes mounts /sys/fs/bpf
// read-only (it is in that option's own table; seen on systemd 252, Debian 12's) and ReadWritePaths=
// cannot undo it, so the agent could not pin and would never start
// (TestPrivilegedNspawnService shows it under a real systemd). The unit spells the
// option's paths out instead, with bpffs writable.
func TestUnitBPFFSWritable(t *testing.T) {
	if got := unitValues(t, "ProtectKernelTunables"); len(got) > 0 && got[len(got)-1] != "no" {
		t.Errorf("ProtectKernelTunables=%v: /sys/fs/bpf would be read-only whatever ReadWritePaths says", got)
	}
	ro := strings.Fields(strings.Join(unitValues(t, "ReadOnlyPaths"), " "))
	for _, want := range []string{"/sys", "-/proc/sys", "-/proc/sysrq-trigger"} {
		if !slices.Contains(ro, want) {
			t.Errorf("ReadOnlyPaths=%v lacks %s (what ProtectKernelTunables= would protect)", ro, want)
		}
	}
	if rw := unitValues(t, "ReadWritePaths"); !slices.Contains(rw, "-/sys/fs/bpf") {
		t.Errorf("ReadWritePaths=%v: the agent must be able to pin under /sys/fs/bpf", rw)
	}
}
