package packaging

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// debianMirror is where debootstrap fetches Debian from; the build machines reach it.
func debianMirror() string {
	if m := os.Getenv("IMDSGUARD_DEBIAN_MIRROR"); m != "" {
		return m
	}
	return "http://deb.debian.org/debian"
}

// debianTarball returns a tarball of a minimal Debian 12 root with systemd (and procps,
// for /bin/kill, which the unit's ExecReload runs) installed but not running, made with debootstrap on first use and kept in .cache/ (ignored by
// git), so that later runs unpack it in seconds instead of downloading again.
func debianTarball(t *testing.T) string {
	t.Helper()
	cache, err := filepath.Abs("../.cache/debootstrap")
	if err != nil {
		t.Fatal(err)
	}
	tarball := filepath.Join(cache, "bookworm-minbase-systemd-procps.tar")
	if _, err := os.Stat(tarball); err == nil {
		return tarball
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Fatalf("debootstrap not installed (make deps installs it): %v", err)
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatal(err)
	}
	build, err := os.MkdirTemp(cache, "build-")
	if err != nil {
		t.Fatal(err)
	}
	// debootstrap mounts /proc and /sys in the root while it works; it runs in a mount
	// namespace of its own so that none of them can outlive it.
	defer removeRoot(t, build)
	root := filepath.Join(build, "root")
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "--",
		"debootstrap", "--variant=minbase", "--include=systemd,procps", "bookworm", root, debianMirror()).CombinedOutput()
	if err != nil {
		t.Fatalf("debootstrap: %v\n%s", err, tail(out, 30))
	}
	tmp := tarball + ".tmp"
	if out, err := exec.Command("tar", "-C", root, "-cf", tmp, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar Debian root: %v\n%s", err, out)
	}
	if err := os.Rename(tmp, tarball); err != nil {
		t.Fatal(err)
	}
	return tarball
}

// debianRoot unpacks a fresh Debian root for t, removed when t ends.
func debianRoot(t *testing.T) string {
	t.Helper()
	tarball := debianTarball(t)
	dir, err := os.MkdirTemp(filepath.Dir(tarball), "root-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeRoot(t, dir) })
	if out, err := exec.Command("tar", "-C", dir, "-xf", tarball).CombinedOutput(); err != nil {
		t.Fatalf("unpack Debian root: %v\n%s", err, out)
	}
	return dir
}

// removeRoot unmounts anything still mounted under dir (there should be nothing: every
// command runs in a mount namespace of its own), and removes dir only when nothing is
// left mounted, so that RemoveAll can never walk into the host's /proc or /sys.
func removeRoot(t *testing.T, dir string) {
	t.Helper()
	mounts, err := mountsUnder(dir)
	if err != nil {
		t.Errorf("list mounts under %s: %v; not removing it", dir, err)
		return
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		t.Errorf("%s still mounted after the test; unmounting", mounts[i])
		if err := unix.Unmount(mounts[i], unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", mounts[i], err)
		}
	}
	if mounts, err := mountsUnder(dir); err != nil || len(mounts) > 0 {
		t.Errorf("mounts left under %s (%v): not removing it", dir, mounts)
		return
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Errorf("remove %s: %v", dir, err)
	}
}

// mountsUnder lists this mount namespace's mount points at or below dir.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && (fields[4] == dir || strings.HasPrefix(fields[4], dir+"/")) {
			out = append(out, fields[4])
		}
	}
	return out, sc.Err()
}

// inRoot runs argv chrooted into root, with /proc, /sys and a bpffs of its own mounted
// in a private mount namespace that vanishes with the command. No systemd runs there,
// as in an image build.
func inRoot(root string, argv ...string) (string, error) {
	script := `set -e; r=$1; shift
mount -t proc proc "$r/proc"
mount -t sysfs sysfs "$r/sys"
mount -t bpf bpf "$r/sys/fs/bpf"
exec chroot "$r" "$@"`
	args := append([]string{"--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", root}, argv...)
	cmd := exec.Command("unshare", args...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", "DEBIAN_FRONTEND=noninteractive", "HOME=/root"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out), nil
}

func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func mode(t *testing.T, p string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return fi.Mode().Perm()
}

func copyInto(t *testing.T, root, src string) string {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := "/tmp/" + filepath.Base(src)
	if err := os.WriteFile(filepath.Join(root, dst), data, 0o644); err != nil {
		t.Fatal(err)
	}
	return dst
}

const wantsLink = "etc/systemd/system/multi-user.target.wants/imdsguard.service"

// TestPrivilegedDebLifecycle installs, reinstalls, upgrades, removes and purges the
// .deb in a Debian root where systemd is installed but not running (an image build),
// and checks files, modes, enablement, conffile handling and state along the way.
func TestPrivilegedDebLifecycle(t *testing.T) {
	testbed.RequirePrivileged(t)
	pkgs := buildPackages(t)
	root := debianRoot(t)
	v1 := copyInto(t, root, pkgs.deb(t, "1.0.0"))
	v2 := copyInto(t, root, pkgs.deb(t, "1.0.1"))
	at := func(p string) string { return filepath.Join(root, p) }

	// Install, twice: the scripts are idempotent.
	for i := 0; i < 2; i++ {
		if out, err := inRoot(root, "dpkg", "-i", v1); err != nil {
			t.Fatalf("install (round %d): %v", i+1, err)
		} else if strings.Contains(out, "did not start") {
			t.Errorf("postinst tried to start the service without a running systemd:\n%s", out)
		}
	}
	for p, want := range map[string]os.FileMode{
		"usr/bin/imdsguard":                        0o755,
		"usr/lib/systemd/system/imdsguard.service": 0o644,
		"etc/imdsguard/config.yaml":                0o600,
		"var/lib/imdsguard":                        0o700,
	} {
		if got := mode(t, at(p)); got != want {
			t.Errorf("/%s: mode %o, want %o", p, got, want)
		}
	}
	if target, err := os.Readlink(at(wantsLink)); err != nil || !strings.HasSuffix(target, "/imdsguard.service") {
		t.Errorf("service not enabled after install: %q %v", target, err)
	}
	if out, err := inRoot(root, "imdsguard", "version"); err != nil || !strings.Contains(out, "1.0.0") {
		t.Errorf("imdsguard version after install: %q %v", out, err)
	}
	verifyBootOrder(t, root)
	if _, err := inRoot(root, "imdsguard", "check-config", "/etc/imdsguard/config.yaml"); err != nil {
		t.Errorf("shipped config is refused by the agent: %v", err)
	}
	// --no-imds: this root shares the machine's network, and no test may reach the real
	// 169.254.169.254.
	out, err := inRoot(root, "imdsguard", "preflight", "--no-imds")
	t.Logf("imdsguard preflight in the Debian root:\n%s", out)
	if err != nil {
		t.Errorf("preflight in the Debian root: %v", err)
	}
	for _, want := range []string{"ok    kernel", "ok    btf", "ok    bpf permission", "ok    bpffs"} {
		if !strings.Contains(out, want) {
			t.Errorf("preflight output lacks %q", want)
		}
	}

	// An upgrade of an enabled service leaves it enabled: prerm "upgrade" is no removal.
	if _, err := inRoot(root, "dpkg", "-i", v2); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	if out, err := inRoot(root, "imdsguard", "version"); err != nil || !strings.Contains(out, "1.0.1") {
		t.Errorf("imdsguard version after upgrade: %q %v", out, err)
	}
	if !exists(at(wantsLink)) {
		t.Error("upgrade disabled the service")
	}

	// The operator edits the config, keeps state, and disables the service; a version
	// change (here back to 1.0.0, which dpkg runs as an upgrade too) keeps all three.
	edited := "# edited by the operator\nlog:\n  level: debug\n"
	if err := os.WriteFile(at("etc/imdsguard/config.yaml"), []byte(edited), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(at("var/lib/imdsguard/state"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(at(wantsLink)); err != nil {
		t.Fatal(err)
	}
	if _, err := inRoot(root, "dpkg", "-i", v1); err != nil {
		t.Fatalf("downgrade: %v", err)
	}
	if out, err := inRoot(root, "imdsguard", "version"); err != nil || !strings.Contains(out, "1.0.0") {
		t.Errorf("imdsguard version after downgrade: %q %v", out, err)
	}
	if got, _ := os.ReadFile(at("etc/imdsguard/config.yaml")); string(got) != edited {
		t.Errorf("a version change replaced the operator's config:\n%s", got)
	}
	if exists(at(wantsLink)) {
		t.Error("a version change re-enabled a service the operator had disabled")
	}
	if !exists(at("var/lib/imdsguard/state")) {
		t.Error("a version change lost the state directory")
	}
	// Re-enable, to see removal disable it.
	if _, err := inRoot(root, "systemctl", "enable", "imdsguard.service"); err != nil {
		t.Fatalf("enable: %v", err)
	}

	// Remove: program and unit go, config and state stay; purge takes those too.
	if _, err := inRoot(root, "dpkg", "-r", "imdsguard"); err != nil {
		t.Fatalf("remove: %v", err)
	}
	for _, p := range []string{"usr/bin/imdsguard", "usr/lib/systemd/system/imdsguard.service", wantsLink} {
		if exists(at(p)) {
			t.Errorf("/%s left after remove", p)
		}
	}
	for _, p := range []string{"etc/imdsguard/config.yaml", "var/lib/imdsguard/state"} {
		if !exists(at(p)) {
			t.Errorf("/%s gone after remove (only purge may take it)", p)
		}
	}
	if _, err := inRoot(root, "dpkg", "-P", "imdsguard"); err != nil {
		t.Fatalf("purge: %v", err)
	}
	for _, p := range []string{"etc/imdsguard", "var/lib/imdsguard"} {
		if exists(at(p)) {
			t.Errorf("/%s left after purge", p)
		}
	}
	// Purging what is gone already is not an error either.
	if _, err := inRoot(root, "dpkg", "-P", "imdsguard"); err != nil {
		t.Errorf("second purge: %v", err)
	}
}

// TestPrivilegedRpmLifecycle installs, upgrades and erases the .rpm with the build
// machine's rpm into a Debian root (rpm --root runs the scriptlets chrooted there),
// which proves the scripts read rpm's numeric arguments right.
func TestPrivilegedRpmLifecycle(t *testing.T) {
	testbed.RequirePrivileged(t)
	if _, err := exec.LookPath("rpm"); err != nil {
		t.Fatalf("rpm not installed (make deps installs it): %v", err)
	}
	pkgs := buildPackages(t)
	root := debianRoot(t)
	at := func(p string) string { return filepath.Join(root, p) }
	rpm := func(args ...string) error {
		out, err := exec.Command("rpm", append([]string{"--root", root, "--dbpath", "/var/lib/rpm"}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("rpm %s: %w\n%s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := rpm("--initdb"); err != nil {
		t.Fatal(err)
	}
	// --nodeps: the Debian root's own packages are not in its rpm database.
	if err := rpm("-i", "--nodeps", pkgs.rpm(t, "1.0.0")); err != nil {
		t.Fatalf("install: %v", err)
	}
	if !exists(at(wantsLink)) {
		t.Error("service not enabled after rpm install")
	}
	// Upgrade while enabled: the old package's uninstall scripts get 1 and must not
	// act as an erase.
	if err := rpm("-U", "--nodeps", pkgs.rpm(t, "1.0.1")); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	if !exists(at("usr/bin/imdsguard")) || !exists(at(wantsLink)) {
		t.Fatal("binary gone or service disabled after upgrade: the old package's uninstall scripts (1) acted as an erase")
	}
	if out, err := inRoot(root, "imdsguard", "version"); err != nil || !strings.Contains(out, "1.0.1") {
		t.Errorf("imdsguard version after upgrade: %q %v", out, err)
	}
	// Edit the config, disable, change version (back to 1.0.0, also an upgrade: 2).
	edited := "log:\n  level: warn\n"
	if err := os.WriteFile(at("etc/imdsguard/config.yaml"), []byte(edited), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(at(wantsLink)); err != nil {
		t.Fatal(err)
	}
	if err := rpm("-U", "--nodeps", "--oldpackage", pkgs.rpm(t, "1.0.0")); err != nil {
		t.Fatalf("downgrade: %v", err)
	}
	if got, _ := os.ReadFile(at("etc/imdsguard/config.yaml")); string(got) != edited {
		t.Errorf("a version change replaced the operator's config:\n%s", got)
	}
	if exists(at(wantsLink)) {
		t.Error("a version change (post-install with 2) re-enabled a service the operator had disabled")
	}
	if _, err := inRoot(root, "systemctl", "enable", "imdsguard.service"); err != nil {
		t.Fatalf("enable: %v", err)
	}
	if err := rpm("-e", "--nodeps", "imdsguard"); err != nil {
		t.Fatalf("erase: %v", err)
	}
	if exists(at("usr/bin/imdsguard")) || exists(at(wantsLink)) {
		t.Error("erase left the binary or the enablement behind")
	}
	// rpm keeps a modified %config(noreplace) file as .rpmsave.
	if !exists(at("etc/imdsguard/config.yaml.rpmsave")) {
		t.Error("erase did not keep the operator's config as config.yaml.rpmsave")
	}
}

// cloudInitLocal stands in for Debian's cloud-init-local.service (cloud-init 22.4): the
// ordering lines that matter, so that verify sees the unit ordered before it.
const cloudInitLocal = `[Unit]
Description=Initial cloud-init job (pre-networking)
DefaultDependencies=no
Wants=network-pre.target
After=systemd-remount-fs.service
Before=NetworkManager.service network-pre.target shutdown.target sysinit.target
Conflicts=shutdown.target
RequiresMountsFor=/var/lib/cloud

[Service]
Type=oneshot
ExecStart=/bin/true
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
`

// verifyBootOrder has systemd-analyze load the installed unit with the root's own
// targets (and a cloud-init-local) and check it, and the boot transaction through
// multi-user.target, for errors and ordering cycles.
func verifyBootOrder(t *testing.T, root string) {
	t.Helper()
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze not installed (make deps installs it): %v", err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/systemd/system/cloud-init-local.service"), []byte(cloudInitLocal), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := inRoot(root, "systemctl", "enable", "cloud-init-local.service"); err != nil {
		t.Fatal(err)
	}
	for _, unit := range []string{"/usr/lib/systemd/system/imdsguard.service", "multi-user.target"} {
		out, err := exec.Command(sa, "verify", "--root="+root, unit).CombinedOutput()
		if err != nil || len(strings.TrimSpace(string(out))) > 0 {
			t.Errorf("systemd-analyze verify %s in the Debian root: %v\n%s", unit, err, out)
		}
	}
	if _, err := inRoot(root, "systemctl", "disable", "cloud-init-local.service"); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(root, "etc/systemd/system/cloud-init-local.service")); err != nil {
		t.Fatal(err)
	}
}
