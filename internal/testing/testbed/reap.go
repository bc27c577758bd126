package testbed

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// ReapStale removes what beds of dead test processes left behind (a test binary killed
// by a timeout or SIGKILL cannot clean up after itself): their network namespaces,
// cgroups, bpf mounts and scratch directories. Beds of live processes are left alone.
func ReapStale() {
	dead := func(name string) bool {
		// imdsguard-t<pid>-<n>[...]
		rest, ok := strings.CutPrefix(name, "imdsguard-t")
		if !ok {
			return false
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			return false
		}
		return syscall.Kill(pid, 0) == syscall.ESRCH
	}
	if entries, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range entries {
			if dead(e.Name()) {
				_ = run("ip", "netns", "del", e.Name())
			}
		}
	}
	if root, err := cgroupRootNoMount(); err == nil && root != "" {
		if entries, err := os.ReadDir(root); err == nil {
			for _, e := range entries {
				if e.IsDir() && dead(e.Name()) {
					_ = removeCgroup(filepath.Join(root, e.Name()))
				}
			}
		}
	}
	// Beds that ran a service manager leave cgroups in the v1 hierarchies too.
	if hierarchies, err := os.ReadDir("/sys/fs/cgroup"); err == nil {
		for _, h := range hierarchies {
			entries, err := os.ReadDir(filepath.Join("/sys/fs/cgroup", h.Name()))
			if err != nil {
				continue
			}
			for _, e := range entries {
				if e.IsDir() && dead(e.Name()) {
					_ = removeCgroup(filepath.Join("/sys/fs/cgroup", h.Name(), e.Name()))
				}
			}
		}
	}
	reapBundles(dead)
	if entries, err := os.ReadDir(os.TempDir()); err == nil {
		for _, e := range entries {
			if e.IsDir() && dead(e.Name()) {
				dir := filepath.Join(os.TempDir(), e.Name())
				_ = syscall.Unmount(filepath.Join(dir, "bpffs"), syscall.MNT_DETACH)
				_ = os.RemoveAll(dir)
			}
		}
	}
}

// RemoveCgroupEverywhere removes the cgroup called name (and everything below it) from
// every cgroup v1 hierarchy under /sys/fs/cgroup. On a hybrid host a service manager
// started by a test (systemd in a container) makes its cgroups in the v1 name=systemd
// hierarchy too, beside the v2 one the test made.
func RemoveCgroupEverywhere(name string) error {
	var errs []error
	hierarchies, _ := os.ReadDir("/sys/fs/cgroup")
	for _, h := range hierarchies {
		dir := filepath.Join("/sys/fs/cgroup", h.Name(), name)
		if _, err := os.Stat(dir); err != nil {
			continue
		}
		errs = append(errs, removeCgroup(dir))
	}
	return errors.Join(errs...)
}
