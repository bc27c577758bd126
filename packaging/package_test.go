package packaging

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// builtPackages are the packages `make package` made for this machine's architecture,
// by version, shared by the tests of one run (building costs seconds each).
type builtPackages struct {
	dir string // one directory per version under it
}

var (
	buildOnce sync.Once
	built     builtPackages
	buildErr  error
)

// buildPackages runs `make package` for versions 1.0.0 and 1.0.1 (for upgrades) once
// per test run, into a directory removed when the run ends.
func buildPackages(t *testing.T) builtPackages {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "imdsguard-packages-")
		if err != nil {
			buildErr = err
			return
		}
		packagesDir = dir
		built.dir = dir
		for _, v := range []string{"1.0.0", "1.0.1"} {
			if err := makePackage(filepath.Join(dir, v), v); err != nil {
				buildErr = err
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatalf("make package: %v", buildErr)
	}
	return built
}

// packagesDir is removed by TestMain once every test has run.
var packagesDir string

func TestMain(m *testing.M) {
	code := m.Run()
	if packagesDir != "" {
		os.RemoveAll(packagesDir)
	}
	os.Exit(code)
}

func makePackage(dist, version string) error {
	cmd := exec.Command("make", "-C", "..", "--no-print-directory", "package",
		"DIST="+dist, "PKG_VERSION="+version, "PKG_ARCHES="+runtime.GOARCH)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("version %s: %w\n%s", version, err, out)
	}
	return nil
}

func (b builtPackages) find(t *testing.T, version, pattern string) string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(b.dir, version, pattern))
	if err != nil || len(m) != 1 {
		t.Fatalf("%s in %s: found %v (%v)", pattern, filepath.Join(b.dir, version), m, err)
	}
	return m[0]
}

func (b builtPackages) deb(t *testing.T, version string) string {
	return b.find(t, version, "imdsguard_"+version+"-1_"+runtime.GOARCH+".deb")
}

func (b builtPackages) rpm(t *testing.T, version string) string {
	arch := map[string]string{"amd64": "x86_64", "arm64": "aarch64"}[runtime.GOARCH]
	return b.find(t, version, "imdsguard-"+version+"-1."+arch+".rpm")
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestPrivilegedPackageContents inspects the built packages with the formats' own
// tools: files, modes, the conffile, the scripts, and the reported size.
func TestPrivilegedPackageContents(t *testing.T) {
	testbed.RequirePrivileged(t)
	pkgs := buildPackages(t)
	deb, rpm := pkgs.deb(t, "1.0.0"), pkgs.rpm(t, "1.0.0")
	for _, p := range []string{deb, rpm} {
		if fi, err := os.Stat(p); err == nil {
			t.Logf("%s: %d bytes", filepath.Base(p), fi.Size())
		}
	}

	list := run(t, "dpkg-deb", "-c", deb)
	for _, want := range []string{
		"-rwxr-xr-x root/root", "./usr/bin/imdsguard",
		"./usr/lib/systemd/system/imdsguard.service",
		"-rw------- root/root", "./etc/imdsguard/config.yaml",
		"drwx------ root/root", "./var/lib/imdsguard/",
		"./usr/share/doc/imdsguard/README.md",
	} {
		if !strings.Contains(list, want) {
			t.Errorf("dpkg-deb -c lacks %q:\n%s", want, list)
		}
	}
	info := run(t, "dpkg-deb", "-I", deb)
	for _, want := range []string{"Package: imdsguard", "Version: 1.0.0-1", "Architecture: " + runtime.GOARCH, "postinst", "prerm", "postrm", "conffiles"} {
		if !strings.Contains(info, want) {
			t.Errorf("dpkg-deb -I lacks %q:\n%s", want, info)
		}
	}
	tmp := t.TempDir()
	run(t, "dpkg-deb", "-e", deb, tmp)
	if cf, _ := os.ReadFile(filepath.Join(tmp, "conffiles")); strings.TrimSpace(string(cf)) != "/etc/imdsguard/config.yaml" {
		t.Errorf("conffiles = %q, want only /etc/imdsguard/config.yaml", cf)
	}

	rpmFiles := run(t, "rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILEFLAGS:fflags} %{FILENAMES}\n]", rpm)
	for _, want := range []string{
		"-rwxr-xr-x  /usr/bin/imdsguard",
		"-rw-r--r--  /usr/lib/systemd/system/imdsguard.service",
		"-rw------- cn /etc/imdsguard/config.yaml", // %config(noreplace)
		"drwx------  /var/lib/imdsguard",
	} {
		if !strings.Contains(rpmFiles, want) {
			t.Errorf("rpm file list lacks %q:\n%s", want, rpmFiles)
		}
	}
	scripts := run(t, "rpm", "-qp", "--scripts", rpm)
	for _, want := range []string{"postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"} {
		if !strings.Contains(scripts, want) {
			t.Errorf("rpm --scripts lacks %q:\n%s", want, scripts)
		}
	}
}

// TestPrivilegedPackagesReproducible builds the same version twice and expects the
// same bytes.
func TestPrivilegedPackagesReproducible(t *testing.T) {
	testbed.RequirePrivileged(t)
	pkgs := buildPackages(t)
	again := t.TempDir()
	if err := makePackage(again, "1.0.0"); err != nil {
		t.Fatal(err)
	}
	for _, first := range []string{pkgs.deb(t, "1.0.0"), pkgs.rpm(t, "1.0.0")} {
		second := filepath.Join(again, filepath.Base(first))
		a, b := sum(t, first), sum(t, second)
		if a != b {
			t.Errorf("%s differs between two builds of one commit: %s vs %s", filepath.Base(first), a, b)
		}
	}
}

func sum(t *testing.T, p string) string {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(data)
	return hex.EncodeToString(h[:])
}

// TestPrivilegedCorrelatorPackage builds the correlator's package around a stand-in
// binary: cmd/imdsguard-correlator is written elsewhere, and its package config must be
// ready when it lands.
func TestPrivilegedCorrelatorPackage(t *testing.T) {
	testbed.RequirePrivileged(t)
	dist := t.TempDir()
	bin := filepath.Join(dist, "bin", "linux-"+runtime.GOARCH, "imdsguard-correlator")
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "tool", "nfpm", "package", "--config", "packaging/imdsguard-correlator.nfpm.yaml",
		"--packager", "deb", "--target", dist+"/")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "VERSION=1.0.0", "PKG_ARCH="+runtime.GOARCH, "DIST="+dist, "SOURCE_DATE_EPOCH=1700000000")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nfpm: %v\n%s", err, out)
	}
	deb := filepath.Join(dist, "imdsguard-correlator_1.0.0-1_"+runtime.GOARCH+".deb")
	list := run(t, "dpkg-deb", "-c", deb)
	for _, want := range []string{"-rwxr-xr-x root/root", "./usr/bin/imdsguard-correlator", "drwx------ root/root", "./var/lib/imdsguard-correlator/"} {
		if !strings.Contains(list, want) {
			t.Errorf("dpkg-deb -c lacks %q:\n%s", want, list)
		}
	}
}
