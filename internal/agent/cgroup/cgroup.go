// Package cgroup finds the cgroup v2 hierarchy the hooks attach to, and maps the cgroup
// ids the kernel records back to paths, also after the process in them has exited.
package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// OwnMount is where the agent mounts cgroup2 itself on hosts that have none mounted
// (Amazon Linux 2 with cgroup v1 only).
const OwnMount = "/run/imdsguard/cgroup2"

// FindMount returns the mount point of the cgroup2 file system from mountinfo, or ""
// with no error when none is mounted.
func FindMount(mountinfo io.Reader) (string, error) {
	sc := bufio.NewScanner(mountinfo)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		// 41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) {
			continue
		}
		if fields[sep+1] == "cgroup2" {
			return unescape(fields[4]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	return "", nil
}

// unescape undoes mountinfo's octal escapes of space, tab, newline and backslash.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Root returns the cgroup2 mount point of this host, mounting cgroup2 at OwnMount when
// none is mounted.
func Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("open mountinfo: %w", err)
	}
	defer f.Close()
	mnt, err := FindMount(f)
	if err != nil || mnt != "" {
		return mnt, err
	}
	if err := os.MkdirAll(OwnMount, 0o700); err != nil {
		return "", fmt.Errorf("create %s: %w", OwnMount, err)
	}
	if err := unix.Mount("cgroup2", OwnMount, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return "", fmt.Errorf("mount cgroup2 at %s: %w", OwnMount, err)
	}
	return OwnMount, nil
}

// Check verifies that dir is a directory on a cgroup2 file system.
func Check(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("stat cgroup %s: %w", dir, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not on a cgroup v2 file system", dir)
	}
	return nil
}

// ID returns the cgroup id of dir: the inode number of the directory, which is what
// bpf_get_current_cgroup_id() reports.
func ID(dir string) (uint64, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", dir, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("stat cgroup %s: no inode", dir)
	}
	return st.Ino, nil
}

// Paths maps cgroup ids to paths relative to the cgroup2 root ("/system.slice/x.service").
// A miss rescans the tree once, so a cgroup created after start is still found; cgroups
// are few, so a scan is cheap compared with the connect it explains.
type Paths struct {
	root string
	mu   sync.Mutex
	byID map[uint64]string
}

// NewPaths returns a resolver for the hierarchy mounted at root.
func NewPaths(root string) *Paths {
	return &Paths{root: root, byID: map[uint64]string{}}
}

// Lookup returns the path of the cgroup with id, or false when no such cgroup exists.
func (p *Paths) Lookup(id uint64) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if path, ok := p.byID[id]; ok {
		return path, true
	}
	p.rescan()
	path, ok := p.byID[id]
	return path, ok
}

func (p *Paths) rescan() {
	byID := map[uint64]string{}
	_ = filepath.WalkDir(p.root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) {
				return nil // raced with rmdir, or not ours to read
			}
			return nil
		}
		if !d.IsDir() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			rel := strings.TrimPrefix(path, p.root)
			if rel == "" {
				rel = "/"
			}
			byID[st.Ino] = rel
		}
		return nil
	})
	p.byID = byID
}
